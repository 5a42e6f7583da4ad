//! Waiting for the broker to come back: bounded retries with exponential backoff.
//!
//! A broker restart (kill and start, or `membroker upgrade`) drops every connection. A
//! [`Client`](crate::Client) that notices retries the connection every 10 ms, doubling to at
//! most 200 ms between attempts, until it succeeds or the reconnect timeout (default
//! [`DEFAULT_RECONNECT_TIMEOUT`]) has passed.

use std::time::{Duration, Instant};

/// How long a client waits for the broker by default before a call fails with
/// [`Error::Unavailable`](crate::Error::Unavailable).
pub const DEFAULT_RECONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// First pause between two connection attempts.
pub const FIRST_DELAY: Duration = Duration::from_millis(10);

/// Longest pause between two connection attempts.
pub const MAX_DELAY: Duration = Duration::from_millis(200);

/// Pauses between retries: [`FIRST_DELAY`], doubling each time up to [`MAX_DELAY`].
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
}

impl Backoff {
    pub fn new() -> Backoff {
        Backoff { next: FIRST_DELAY }
    }

    /// The pause before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (delay * 2).min(MAX_DELAY);
        delay
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new()
    }
}

/// Time as the retry loop sees it (a fake one in the unit tests).
pub(crate) trait Clock {
    fn now(&self) -> Instant;
    fn sleep(&mut self, pause: Duration);
}

/// The real clock.
#[derive(Debug)]
pub(crate) struct RealClock;

impl Clock for RealClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn sleep(&mut self, pause: Duration) {
        std::thread::sleep(pause);
    }
}

/// What one attempt came to.
#[derive(Debug)]
pub(crate) enum Step<T, E> {
    /// Done: stop with this value.
    Done(T),
    /// Failed in a way that may pass (the broker is not there yet): try again after a pause.
    Retry(E),
    /// Failed for good (the broker answers but refuses): stop with this error.
    Fail(E),
}

/// Why [`retry_until`] stopped without a value.
#[derive(Debug)]
pub(crate) enum GaveUp<E> {
    /// An attempt failed for good.
    Failed(E),
    /// The deadline passed; `last` is the last attempt's error.
    TimedOut { waited: Duration, last: Option<E> },
}

/// Shortest time an attempt is given for its blocking steps, even at or past the deadline:
/// a socket timeout derived from it is never zero (which would mean "no timeout"), and one
/// attempt (a zero timeout, or the last one at the deadline) has a real chance on a loaded
/// host. A call may so overrun its reconnect timeout by up to this much, and only when a
/// broker accepts the connection but is slow to answer.
pub(crate) const MIN_ATTEMPT: Duration = Duration::from_millis(500);

/// Runs `attempt` until it is done or fails for good, pausing with [`Backoff`] between tries,
/// for at most `timeout`. The pause before the deadline is cut short so that one last attempt
/// runs at the deadline. `attempt` gets the time left (at least [`MIN_ATTEMPT`]) to bound its
/// own blocking calls. A zero `timeout` means exactly one attempt.
pub(crate) fn retry_until<T, E>(
    timeout: Duration,
    clock: &mut impl Clock,
    mut attempt: impl FnMut(Duration) -> Step<T, E>,
) -> Result<T, GaveUp<E>> {
    let start = clock.now();
    let deadline = start + timeout;
    let mut backoff = Backoff::new();
    loop {
        let left = deadline
            .saturating_duration_since(clock.now())
            .max(MIN_ATTEMPT);
        let last = match attempt(left) {
            Step::Done(value) => return Ok(value),
            Step::Fail(err) => return Err(GaveUp::Failed(err)),
            Step::Retry(err) => err,
        };
        let now = clock.now();
        if now >= deadline {
            return Err(GaveUp::TimedOut {
                waited: now.duration_since(start),
                last: Some(last),
            });
        }
        clock.sleep(backoff.next_delay().min(deadline - now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A clock that moves only when slept on, or by `per_attempt` at each attempt.
    struct FakeClock {
        now: Instant,
        sleeps: Vec<Duration>,
    }

    impl FakeClock {
        fn new() -> FakeClock {
            FakeClock {
                now: Instant::now(),
                sleeps: Vec::new(),
            }
        }
    }

    impl Clock for FakeClock {
        fn now(&self) -> Instant {
            self.now
        }
        fn sleep(&mut self, pause: Duration) {
            self.sleeps.push(pause);
            self.now += pause;
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let mut b = Backoff::new();
        let got: Vec<Duration> = (0..8).map(|_| b.next_delay()).collect();
        assert_eq!(
            got,
            [10, 20, 40, 80, 160, 200, 200, 200].map(ms).to_vec(),
            "pauses"
        );
    }

    #[test]
    fn gives_up_at_the_deadline_after_a_last_attempt() {
        let mut clock = FakeClock::new();
        let mut attempts = 0;
        let r: Result<(), _> = retry_until(ms(1000), &mut clock, |_| {
            attempts += 1;
            Step::Retry(attempts)
        });
        // 10+20+40+80+160 = 310, then 200 ms pauses: 510, 710, 910, then 90 to the deadline.
        assert_eq!(
            clock.sleeps,
            [10, 20, 40, 80, 160, 200, 200, 200, 90].map(ms).to_vec()
        );
        assert_eq!(
            attempts, 10,
            "one attempt before each pause and one at the deadline"
        );
        match r {
            Err(GaveUp::TimedOut { waited, last }) => {
                assert_eq!(waited, ms(1000));
                assert_eq!(last, Some(10), "the last attempt's error");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(clock.sleeps.iter().sum::<Duration>(), ms(1000));
    }

    #[test]
    fn attempts_get_the_time_left_but_never_less_than_the_minimum() {
        let mut clock = FakeClock::new();
        let mut lefts = Vec::new();
        let _: Result<(), _> = retry_until(ms(1000), &mut clock, |left| {
            lefts.push(left);
            Step::Retry(())
        });
        // Attempts at 0, 10, 30, 70, 150, 310, 510, 710, 910 and 1000 ms.
        assert_eq!(
            lefts,
            [1000, 990, 970, 930, 850, 690, 500, 500, 500, 500]
                .map(ms)
                .to_vec()
        );
        assert_eq!(MIN_ATTEMPT, ms(500));
    }

    #[test]
    fn slow_attempts_count_against_the_deadline() {
        // Each attempt blocks for up to 300 ms (a connect or Hello bounded by its socket
        // timeout), which the attempt adds to the shared clock.
        let mut clock = FakeClock::new();
        let start = clock.now;
        let spent = std::cell::Cell::new(Duration::ZERO);
        let mut attempts = 0;
        let r: Result<(), GaveUp<()>> =
            retry_until(ms(1000), &mut SlowClock(&mut clock, &spent), |left| {
                attempts += 1;
                spent.set(spent.get() + ms(300).min(left));
                Step::Retry(())
            });
        let total = clock.now.duration_since(start) + spent.get();
        // The last attempt may start just before the deadline and use its MIN_ATTEMPT.
        assert!(total <= ms(1000) + MIN_ATTEMPT, "waited {total:?}");
        match r {
            Err(GaveUp::TimedOut { waited, .. }) => assert_eq!(waited, total),
            other => panic!("{other:?}"),
        }
        assert!(attempts >= 3, "{attempts} attempts");

        struct SlowClock<'a>(&'a mut FakeClock, &'a std::cell::Cell<Duration>);
        impl Clock for SlowClock<'_> {
            fn now(&self) -> Instant {
                self.0.now + self.1.get()
            }
            fn sleep(&mut self, pause: Duration) {
                self.0.sleep(pause);
            }
        }
    }

    #[test]
    fn done_and_fail_stop_at_once() {
        let mut clock = FakeClock::new();
        let mut n = 0;
        let r: Result<u32, GaveUp<&str>> = retry_until(ms(1000), &mut clock, |_| {
            n += 1;
            if n < 3 {
                Step::Retry("not yet")
            } else {
                Step::Done(n)
            }
        });
        assert_eq!(r.unwrap(), 3);
        assert_eq!(clock.sleeps, [10, 20].map(ms).to_vec());

        let mut clock = FakeClock::new();
        let r: Result<(), GaveUp<&str>> =
            retry_until(ms(1000), &mut clock, |_| Step::Fail("refused"));
        assert!(matches!(r, Err(GaveUp::Failed("refused"))));
        assert!(clock.sleeps.is_empty());
    }

    #[test]
    fn zero_timeout_is_one_attempt() {
        let mut clock = FakeClock::new();
        let mut n = 0;
        let r: Result<(), GaveUp<()>> = retry_until(Duration::ZERO, &mut clock, |left| {
            n += 1;
            assert_eq!(left, MIN_ATTEMPT);
            Step::Retry(())
        });
        assert_eq!(n, 1);
        assert!(clock.sleeps.is_empty());
        assert!(matches!(r, Err(GaveUp::TimedOut { waited, .. }) if waited.is_zero()));
    }
}
