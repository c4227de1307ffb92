//! Leader election on a `coordination.k8s.io/v1` Lease in `kube-system`, the
//! way kube-controller-manager and kube-scheduler elect theirs, so that two
//! or more servers on one datastore never both act.
//!
//! Every write is a compare-and-swap on the Lease's resourceVersion, so of
//! two candidates racing for an expired Lease exactly one wins. A candidate
//! judges expiry by its own clock: a Lease is expired when its record has
//! not changed for `leaseDurationSeconds` since this process last saw it
//! change, so clocks need not agree between servers. The holder renews every
//! `retry_period`; if it cannot renew within `renew_deadline` (shorter than
//! the lease duration) it stops its work before any follower can take over.

use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::time::{Instant, sleep, timeout_at};

/// Where the control plane's Leases live.
pub const NAMESPACE: &str = "kube-system";

/// Upstream's defaults for kube-controller-manager and kube-scheduler.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// How long followers wait after the last renewal they saw.
    pub lease_duration: Duration,
    /// How long the holder keeps trying to renew before it steps down.
    pub renew_deadline: Duration,
    /// How often the holder renews and followers retry.
    pub retry_period: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// A unique name for this process as a candidate: the host name and a
/// random suffix, as upstream's `hostname_uuid`.
pub fn identity(hostname: &str) -> String {
    format!("{hostname}_{}", uuid::Uuid::new_v4())
}

/// Runs `work` only while this process holds the Lease `kube-system/<lease>`:
/// waits to acquire it, starts `work()`, and cancels that future as soon as
/// the Lease cannot be renewed in time. Then it campaigns again. Never
/// returns.
pub async fn run_while_leader<F, Fut>(
    client: kube::Client,
    lease: &'static str,
    identity: String,
    work: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    run_with_timing(client, lease, identity, Timing::default(), work).await
}

/// [`run_while_leader`] with explicit timing.
pub async fn run_with_timing<F, Fut>(
    client: kube::Client,
    lease: &'static str,
    identity: String,
    timing: Timing,
    mut work: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut elector = Elector {
        api: Api::namespaced(client, NAMESPACE),
        name: lease,
        identity,
        timing,
        observed: None,
    };
    loop {
        elector.acquire().await;
        tracing::info!(lease, identity = %elector.identity, "became leader");
        tokio::select! {
            () = work() => {
                // The work is meant to run for as long as we lead; if it
                // ends, hand the Lease over rather than sit on it idle.
                tracing::warn!(lease, "leader's work ended; releasing the lease");
                elector.release().await;
                sleep(elector.timing.retry_period).await;
            }
            () = elector.hold() => {
                tracing::warn!(lease, identity = %elector.identity, "lost the lease; stopped leading");
            }
        }
    }
}

/// One candidate for one Lease.
struct Elector {
    api: Api<Lease>,
    name: &'static str,
    identity: String,
    timing: Timing,
    /// The last Lease record read or written, and when it last changed.
    observed: Option<(LeaseSpec, Instant)>,
}

/// What one acquire-or-renew attempt found.
enum Attempt {
    /// We hold the Lease (again).
    Held,
    /// Someone else holds an unexpired Lease.
    HeldByOther,
    /// The API could not be reached, or another candidate won a race.
    Failed,
}

impl Elector {
    /// Returns once this candidate holds the Lease.
    async fn acquire(&mut self) {
        loop {
            let deadline = Instant::now() + self.timing.renew_deadline;
            if let Ok(Attempt::Held) = timeout_at(deadline, self.try_acquire_or_renew()).await {
                return;
            }
            sleep(self.timing.retry_period).await;
        }
    }

    /// Renews the Lease until it cannot; returns when leadership is lost.
    async fn hold(&mut self) {
        loop {
            sleep(self.timing.retry_period).await;
            // Retry a failing renewal until the deadline: past it a follower
            // may soon see the Lease expire, so we must stop first.
            let deadline = Instant::now() + self.timing.renew_deadline;
            loop {
                match timeout_at(deadline, self.try_acquire_or_renew()).await {
                    Ok(Attempt::Held) => break,
                    Ok(Attempt::HeldByOther) | Err(_) => return,
                    Ok(Attempt::Failed) => {
                        if Instant::now() + self.timing.retry_period >= deadline {
                            return;
                        }
                        sleep(self.timing.retry_period).await;
                    }
                }
            }
        }
    }

    async fn try_acquire_or_renew(&mut self) -> Attempt {
        let now = MicroTime(Timestamp::now());
        let lease_seconds = i32::try_from(self.timing.lease_duration.as_secs()).unwrap_or(15);
        let current = match self.api.get_opt(self.name).await {
            Ok(current) => current,
            Err(e) => {
                tracing::debug!(lease = self.name, error = %e, "cannot read the lease");
                return Attempt::Failed;
            }
        };
        let Some(mut lease) = current else {
            let spec = LeaseSpec {
                holder_identity: Some(self.identity.clone()),
                lease_duration_seconds: Some(lease_seconds),
                acquire_time: Some(now.clone()),
                renew_time: Some(now),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            };
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.to_owned()),
                    namespace: Some(NAMESPACE.to_owned()),
                    ..ObjectMeta::default()
                },
                spec: Some(spec),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(created) => self.observe(created.spec.unwrap_or_default(), Attempt::Held),
                Err(e) => {
                    tracing::debug!(lease = self.name, error = %e, "cannot create the lease");
                    Attempt::Failed
                }
            };
        };
        let spec = lease.spec.take().unwrap_or_default();
        let changed = self.observed.as_ref().is_none_or(|(seen, _)| *seen != spec);
        if changed {
            self.observed = Some((spec.clone(), Instant::now()));
        }
        let holder = spec.holder_identity.as_deref().filter(|h| !h.is_empty());
        let ours = holder == Some(self.identity.as_str());
        if let Some(holder) = holder
            && !ours
        {
            let duration = spec
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map_or(self.timing.lease_duration, Duration::from_secs);
            let since = self.observed.as_ref().map(|(_, at)| at.elapsed());
            if since.is_none_or(|since| since < duration) {
                tracing::trace!(lease = self.name, holder, "lease held by another candidate");
                return Attempt::HeldByOther;
            }
        }
        let transitions = spec.lease_transitions.unwrap_or(0);
        let renewed = LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(lease_seconds),
            acquire_time: if ours {
                spec.acquire_time.clone()
            } else {
                Some(now.clone())
            },
            renew_time: Some(now),
            lease_transitions: Some(if ours {
                transitions
            } else {
                transitions.saturating_add(1)
            }),
            ..spec
        };
        lease.spec = Some(renewed);
        // `lease.metadata.resourceVersion` is the one just read: the write
        // fails with a conflict if anyone wrote in between.
        match self
            .api
            .replace(self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(written) => self.observe(written.spec.unwrap_or_default(), Attempt::Held),
            Err(e) => {
                tracing::debug!(lease = self.name, error = %e, "cannot take or renew the lease");
                Attempt::Failed
            }
        }
    }

    fn observe(&mut self, spec: LeaseSpec, attempt: Attempt) -> Attempt {
        self.observed = Some((spec, Instant::now()));
        attempt
    }

    /// Gives the Lease up so that a follower need not wait for it to expire.
    async fn release(&mut self) {
        let Ok(Some(mut lease)) = self.api.get_opt(self.name).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        if let Err(e) = self
            .api
            .replace(self.name, &PostParams::default(), &lease)
            .await
        {
            tracing::debug!(lease = self.name, error = %e, "cannot release the lease");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::apiserver;

    /// Counts how many candidates are working at once, and how often any
    /// started.
    #[derive(Default)]
    struct Tally {
        working: AtomicUsize,
        most: AtomicUsize,
        terms: AtomicUsize,
    }

    struct Working(Arc<Tally>);

    impl Drop for Working {
        fn drop(&mut self) {
            self.0.working.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn work(
        tally: &Arc<Tally>,
    ) -> impl FnMut() -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> + Send + 'static {
        let tally = tally.clone();
        move || {
            let tally = tally.clone();
            Box::pin(async move {
                let now = tally.working.fetch_add(1, Ordering::SeqCst) + 1;
                tally.most.fetch_max(now, Ordering::SeqCst);
                tally.terms.fetch_add(1, Ordering::SeqCst);
                let _working = Working(tally);
                std::future::pending::<()>().await;
            })
        }
    }

    async fn holder(api: &Api<Lease>) -> Option<String> {
        api.get_opt("test").await.ok()??.spec?.holder_identity
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_candidate_leads_and_a_follower_takes_over() {
        let dir = tempfile::tempdir().unwrap();
        let client = apiserver::client::test_server(dir.path()).await;
        let timing = Timing {
            lease_duration: Duration::from_millis(1500),
            renew_deadline: Duration::from_millis(1000),
            retry_period: Duration::from_millis(200),
        };
        let tally = Arc::new(Tally::default());
        let candidates: Vec<_> = ["a", "b"]
            .into_iter()
            .map(|id| {
                let run = run_with_timing(client.clone(), "test", id.into(), timing, work(&tally));
                (id, tokio::spawn(run))
            })
            .collect();
        let api: Api<Lease> = Api::namespaced(client, NAMESPACE);
        let mut first = None;
        for _ in 0..100 {
            first = holder(&api).await;
            if first.is_some() && tally.terms.load(Ordering::SeqCst) == 1 {
                break;
            }
            sleep(Duration::from_millis(50)).await;
        }
        let first = first.unwrap();
        // Several lease durations: the leader keeps renewing, nobody else
        // ever starts.
        sleep(Duration::from_secs(4)).await;
        assert_eq!(holder(&api).await.as_deref(), Some(first.as_str()));
        assert_eq!(tally.terms.load(Ordering::SeqCst), 1);
        assert_eq!(tally.most.load(Ordering::SeqCst), 1);

        // The leader vanishes without a word: the other takes over once the
        // lease has expired.
        for (id, task) in &candidates {
            if *id == first {
                task.abort();
            }
        }
        let mut second = None;
        for _ in 0..100 {
            second = holder(&api).await.filter(|h| *h != first);
            if second.is_some() {
                break;
            }
            sleep(Duration::from_millis(100)).await;
        }
        assert!(second.is_some(), "no takeover");
        sleep(Duration::from_millis(300)).await;
        assert_eq!(tally.terms.load(Ordering::SeqCst), 2);
        assert_eq!(tally.most.load(Ordering::SeqCst), 1);
        let lease = api.get("test").await.unwrap().spec.unwrap();
        assert_eq!(lease.lease_transitions, Some(1));
        for (_, task) in candidates {
            task.abort();
        }
    }
}
