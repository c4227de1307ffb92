//! Table responses (`meta.k8s.io/v1` Table) for `kubectl get`.
