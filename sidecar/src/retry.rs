//! Bounded retries with exponential backoff and jitter: every loop of the
//! sidecar that waits on a peer (the database, Stripe, a SIEM) waits through
//! this, so an outage never becomes a hot loop and many sidecars never retry
//! in step.

use std::time::Duration;

use rand::Rng;

#[derive(Clone, Debug)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Backoff {
        Backoff { base, max, attempt: 0 }
    }

    /// The wait before the next attempt: "equal jitter", half the capped
    /// exponential delay plus a random part of the other half, so it is never
    /// zero and never in step with another sidecar's.
    pub fn next_delay(&mut self) -> Duration {
        let exp = self.base.saturating_mul(1u32.checked_shl(self.attempt.min(20)).unwrap_or(u32::MAX));
        let capped = exp.min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = capped / 2;
        half + rand::thread_rng().gen_range(Duration::ZERO..=half)
    }

    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_are_capped_and_never_zero() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let delays: Vec<Duration> = (0..12).map(|_| b.next_delay()).collect();
        assert!(delays.iter().all(|d| *d >= Duration::from_millis(50)));
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(5)));
        assert!(delays[8] >= Duration::from_millis(2500), "capped at 5 s, at least half of it: {:?}", delays[8]);
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
