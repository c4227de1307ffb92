//! Benchmarks live in `src/bin/`, one binary each; every one measures a
//! named peer in the same run and prints the ratio. This library holds what
//! they share.

use std::time::Duration;

/// Latencies of one workload and the wall time it took.
pub struct Samples {
    sorted: Vec<Duration>,
    wall: Duration,
}

impl Samples {
    pub fn new(mut latencies: Vec<Duration>, wall: Duration) -> Self {
        latencies.sort_unstable();
        Samples {
            sorted: latencies,
            wall,
        }
    }

    /// Operations per second over the wall time.
    pub fn rate(&self) -> f64 {
        self.sorted.len() as f64 / self.wall.as_secs_f64().max(f64::MIN_POSITIVE)
    }

    /// The latency at percentile `p` (0–100), nearest rank.
    pub fn percentile(&self, p: f64) -> Duration {
        if self.sorted.is_empty() {
            return Duration::ZERO;
        }
        let rank = ((p / 100.0) * self.sorted.len() as f64).ceil() as usize;
        self.sorted[rank.clamp(1, self.sorted.len()) - 1]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let ms = |n| Duration::from_millis(n);
        let samples = Samples::new((1..=100).rev().map(ms).collect(), Duration::from_secs(1));
        assert_eq!(samples.percentile(50.0), ms(50));
        assert_eq!(samples.percentile(99.0), ms(99));
        assert_eq!(samples.percentile(100.0), ms(100));
        assert_eq!(samples.rate(), 100.0);
    }
}
