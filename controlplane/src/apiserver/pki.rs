//! The cluster CA, serving and client certificates, the node join token and kubeconfig files.
