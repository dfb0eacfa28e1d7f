//! Per-key rate limits that mean what they say (issue 12, item 2): at most
//! `rate_limit_per_minute` (N) requests in any 60 s window, of which at most
//! `rate_limit_burst` (b) at once.
//!
//! The limiter is GCRA (governor) with burst b and one cell every
//! T = 60 s / (N - b + 1), T rounded *up* to the nanosecond. Why that holds
//! the invariant: GCRA admits a request at t only if t >= TAT - (b - 1)T,
//! and every admitted request moves TAT to max(TAT, t) + T. So for admitted
//! requests t_1 < ... < t_k, TAT before the k-th is at least t_1 + (k - 1)T
//! and t_k - t_1 >= (k - b)T. In a window [s, s + 60 s), t_k - t_1 < 60 s,
//! so (k - b)T < 60 s; with T >= 60 s / (N - b + 1) that gives
//! k - b < N - b + 1, i.e. k <= N. The sustained rate is N - b + 1 per
//! minute. (The old quota, `Quota::per_minute(N)`, had burst N and T =
//! 60 s / N: up to 2N - 1 in a window; 199 of 100 were measured.)
//!
//! `Retry-After` is the wait until the limiter would admit the next request,
//! rounded up to whole seconds (at least 1).
//!
//! The GCRA state is kept per key *identity* (the key itself, held in memory
//! like the key list, never logged), in a store that a reload's limiter
//! shares with the one it replaces (review of issue 12, item 2: a reload that
//! changed the key list or the limits gave every key a fresh burst). Keys
//! that survive a reload keep their state; removed keys' state is dropped
//! once the new limiter is in use. When N or b change, a key's state is
//! re-scaled on its next request. With r the time of that request, T and T'
//! the old and new periods: every old admit since any s in [r - 60 s, r] is
//! counted in TAT >= s + m_s T (the proof above), so
//! TAT' = max over those s of s + (TAT - s) T'/T (the larger of the two
//! ends) keeps TAT' >= s + m_s T' and the proof goes on in the new units: a
//! request admitted after the change never finds more than the new N in a
//! 60 s window. Since no admit before r can share a window with one at
//! r + 60 s or later, TAT' is capped so that the key waits at most until
//! r + 60 s, and the earliest admission the old state allowed is never
//! brought forward.

use std::collections::{HashMap, HashSet};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock, Reference};
use governor::Quota;

/// The quota for "at most `per_minute` in any 60 s window, `burst` at once"
/// (`burst` is clamped to 1..=`per_minute`).
pub fn quota(per_minute: u32, burst: u32) -> Quota {
    let n = per_minute.max(1);
    let b = burst.clamp(1, n);
    let cells = u64::from(n - b + 1);
    let period = Duration::from_nanos(60_000_000_000u64.div_ceil(cells));
    let burst = NonZeroU32::new(b).unwrap_or(NonZeroU32::MIN);
    Quota::with_period(period)
        // tidy: infallible (60 s / at most 1,000,000 cells is at least 60 us, never zero)
        .expect("a rate limit period is never zero")
        .allow_burst(burst)
}

/// Whole seconds to wait, rounded up, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

/// 60 s in nanoseconds.
const WINDOW: i128 = 60_000_000_000;

/// One key's GCRA state: its theoretical arrival time (nanoseconds since the
/// store's origin) in the units of the quota it was last checked under.
#[derive(Debug, Clone, Copy)]
struct Cell {
    tat: i128,
    period: i128,
    burst: u32,
}

/// `ceil(a / b)` for `b > 0`.
fn div_ceil(a: i128, b: i128) -> i128 {
    a.div_euclid(b) + i128::from(a.rem_euclid(b) != 0)
}

impl Cell {
    /// The earliest time this state admits a request.
    fn earliest(&self) -> i128 {
        self.tat - i128::from(self.burst.saturating_sub(1)) * self.period
    }

    /// The state in the units of `period`/`burst` at `now` (see the module
    /// documentation for why this keeps the window bound).
    fn rescaled(self, now: i128, period: i128, burst: u32) -> Cell {
        if self.period == period && self.burst == burst {
            return self;
        }
        let scaled = |s: i128| s + div_ceil((self.tat - s) * period, self.period);
        let slack = i128::from(burst.saturating_sub(1)) * period;
        let bound = scaled(now).max(scaled(now - WINDOW));
        let tat = bound
            .min(now + WINDOW + slack)
            .max(self.earliest().min(now + WINDOW) + slack);
        Cell { tat, period, burst }
    }
}

/// The GCRA states of every key, shared by a limiter and the limiters of the
/// reloads that follow it.
struct Store<I> {
    origin: I,
    cells: Mutex<HashMap<Vec<u8>, Cell>>,
    /// The generation of the newest limiter made on this store.
    newest: AtomicU64,
    /// The generation whose key list the store was last pruned to.
    pruned: AtomicU64,
}

/// A rate limit per API key (by the key itself).
pub struct KeyLimiter<C: Clock + Clone = DefaultClock> {
    store: Arc<Store<C::Instant>>,
    clock: C,
    period: i128,
    burst: u32,
    generation: u64,
    /// The keys whose state survives, once this limiter is in use (`None`:
    /// every key is kept).
    keep: Option<HashSet<Vec<u8>>>,
}

impl KeyLimiter<DefaultClock> {
    pub fn new(per_minute: u32, burst: u32) -> Self {
        Self::with_clock(per_minute, burst, DefaultClock::default())
    }
}

impl<C: Clock + Clone> KeyLimiter<C> {
    pub fn with_clock(per_minute: u32, burst: u32, clock: C) -> Self {
        let store = Arc::new(Store {
            origin: clock.now(),
            cells: Mutex::new(HashMap::new()),
            newest: AtomicU64::new(0),
            pruned: AtomicU64::new(0),
        });
        Self::on(store, clock, per_minute, burst, None)
    }

    fn on(
        store: Arc<Store<C::Instant>>,
        clock: C,
        per_minute: u32,
        burst: u32,
        keep: Option<HashSet<Vec<u8>>>,
    ) -> Self {
        let q = quota(per_minute, burst);
        let generation = store.newest.fetch_add(1, Relaxed) + 1;
        KeyLimiter {
            period: i128::try_from(q.replenish_interval().as_nanos()).unwrap_or(i128::MAX),
            burst: q.burst_size().get(),
            store,
            clock,
            generation,
            keep,
        }
    }

    /// The limiter after a reload to `per_minute`/`burst` and `keys`: it
    /// shares this one's state (changing nothing until it is used); once it
    /// admits its first request, the state of keys not in `keys` is dropped.
    pub fn reloaded<'a>(
        &self,
        per_minute: u32,
        burst: u32,
        keys: impl IntoIterator<Item = &'a [u8]>,
    ) -> Self {
        let keep = keys.into_iter().map(<[u8]>::to_vec).collect();
        Self::on(
            self.store.clone(),
            self.clock.clone(),
            per_minute,
            burst,
            Some(keep),
        )
    }

    fn now(&self) -> i128 {
        i128::from(self.clock.now().duration_since(self.store.origin).as_u64())
    }

    /// Admits one request of key `key`, or says how many seconds until the
    /// next one would be admitted (rounded up).
    pub fn check(&self, key: &[u8]) -> Result<(), u64> {
        let now = self.now();
        let mut cells = self.store.cells.lock().unwrap_or_else(|e| e.into_inner());
        let pruned = self.store.pruned.load(Relaxed);
        if let Some(keep) = &self.keep {
            if self.generation > pruned {
                cells.retain(|k, _| keep.contains(k));
                self.store.pruned.store(self.generation, Relaxed);
            }
        }
        let stale = self.generation < self.store.pruned.load(Relaxed);
        let cell = match cells.get(key) {
            Some(c) => c.rescaled(now, self.period, self.burst),
            None => Cell {
                tat: now,
                period: self.period,
                burst: self.burst,
            },
        };
        let earliest = cell.earliest();
        if now < earliest {
            let wait = u64::try_from(earliest - now).unwrap_or(u64::MAX);
            return Err(retry_after_secs(Duration::from_nanos(wait)));
        }
        let next = Cell {
            tat: cell.tat.max(now) + self.period,
            ..cell
        };
        // A replaced limiter (a request verified just before a reload) does
        // not bring back the state of a key the reload removed.
        if !stale || cells.contains_key(key) {
            cells.insert(key.to_vec(), next);
        }
        Ok(())
    }

    /// How many keys have state (for tests).
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.store
            .cells
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;
    use governor::RateLimiter;
    use proptest::prelude::*;

    const MIN: Duration = Duration::from_secs(60);

    /// Sends at `times` (sorted), returns the admitted ones.
    fn admitted(per_minute: u32, burst: u32, times: &[Duration]) -> Vec<Duration> {
        let clock = FakeRelativeClock::default();
        let l = KeyLimiter::with_clock(per_minute, burst, clock.clone());
        let mut now = Duration::ZERO;
        let mut out = Vec::new();
        for &t in times {
            clock.advance(t - now);
            now = t;
            if l.check(b"0").is_ok() {
                out.push(t);
            }
        }
        out
    }

    /// The most admitted requests in any window [s, s + 60 s).
    fn max_in_any_minute(adm: &[Duration]) -> usize {
        let mut best = 0;
        let mut j = 0;
        for i in 0..adm.len() {
            while adm[i] - adm[j] >= MIN {
                j += 1;
            }
            best = best.max(i - j + 1);
        }
        best
    }

    /// `n` requests `every` apart from 0.
    fn steady(every: Duration, n: u32) -> Vec<Duration> {
        (0..n).map(|i| every * i).collect()
    }

    /// Issue 12, item 2: with `rate_limit_per_minute = 100` one key at 5 req/s
    /// got 199 answers in the first 60 s. Now at most 100, with the default
    /// burst (10) and with the burst as large as the limit.
    #[test]
    fn issue12_rate_limit_first_minute() {
        let times = steady(Duration::from_millis(200), 300);
        for burst in [10, 1, 100] {
            let adm = admitted(100, burst, &times);
            let first = adm.iter().filter(|t| **t < MIN).count();
            assert!(first <= 100, "burst {burst}: {first} in the first minute");
            // The budget is used, not starved: N - b + 1 refills plus the burst.
            assert!(first >= 100 - 1, "burst {burst}: only {first}");
            assert!(max_in_any_minute(&adm) <= 100, "burst {burst}");
        }
        // What the old quota (burst N, T = 60 s / N) admitted: the finding.
        let clock = FakeRelativeClock::default();
        let old = RateLimiter::hashmap_with_clock(
            Quota::per_minute(NonZeroU32::new(100).unwrap()),
            clock.clone(),
        );
        let mut first = 0;
        for i in 0..300 {
            if i > 0 {
                clock.advance(Duration::from_millis(200));
            }
            if i < 300 && Duration::from_millis(200) * i < MIN {
                first += usize::from(old.check_key(&0usize).is_ok());
            }
        }
        assert!(first > 150, "the old quota admitted {first}");
    }

    /// ... and in the steady state: every 60 s window of ten minutes at
    /// 5 req/s holds at most 100, and each minute after the first gets the
    /// sustained rate, N - b + 1 = 91.
    #[test]
    fn issue12_rate_limit_steady_state() {
        let times = steady(Duration::from_millis(200), 3000);
        let adm = admitted(100, 10, &times);
        assert!(max_in_any_minute(&adm) <= 100);
        for minute in 1..9u32 {
            let (a, b) = (MIN * minute, MIN * (minute + 1));
            let n = adm.iter().filter(|t| **t >= a && **t < b).count();
            assert!((90..=92).contains(&n), "minute {minute}: {n}");
        }
    }

    /// `Retry-After` is exact: refused one second before it, admitted at it.
    #[test]
    fn issue12_retry_after_is_exact() {
        for (n, b) in [(100, 10), (3, 3), (7, 2), (1, 1), (1_000_000, 10)] {
            let clock = FakeRelativeClock::default();
            let l = KeyLimiter::with_clock(n, b, clock.clone());
            let mut refused = None;
            for _ in 0..=b {
                if let Err(s) = l.check(b"0") {
                    refused = Some(s);
                    break;
                }
            }
            let secs = refused.unwrap_or_else(|| panic!("{n}/{b}: never refused"));
            let period = quota(n, b).replenish_interval();
            assert_eq!(secs, retry_after_secs(period), "{n}/{b}");
            if secs > 1 {
                clock.advance(Duration::from_secs(secs - 1));
                assert!(
                    l.check(b"0").is_err(),
                    "{n}/{b}: admitted before Retry-After"
                );
                clock.advance(Duration::from_secs(1));
            } else {
                clock.advance(Duration::from_secs(1));
            }
            assert!(l.check(b"0").is_ok(), "{n}/{b}: refused at Retry-After");
        }
    }

    /// Keys have their own budgets.
    #[test]
    fn keys_are_independent() {
        let clock = FakeRelativeClock::default();
        let l = KeyLimiter::with_clock(2, 2, clock);
        assert!(l.check(b"0").is_ok() && l.check(b"0").is_ok());
        assert!(l.check(b"0").is_err());
        assert!(l.check(b"1").is_ok());
    }

    /// Review of issue 12, item 2: a reload that added a key gave every key a
    /// fresh burst (the state was keyed by position and dropped on any
    /// change). A surviving key keeps its state, a new key gets its burst, a
    /// removed key's state is dropped once the new limiter is used, and a
    /// reload that was never used changes nothing.
    #[test]
    fn review_reload_keeps_surviving_keys_state() {
        let clock = FakeRelativeClock::default();
        let l = KeyLimiter::with_clock(100, 10, clock.clone());
        let burst = |l: &KeyLimiter<FakeRelativeClock>, key: &[u8]| {
            (0..12).filter(|_| l.check(key).is_ok()).count()
        };
        assert_eq!(burst(&l, b"alice"), 10);
        assert_eq!(burst(&l, b"gone"), 10);
        // A reload that fails after building its limiter changes nothing.
        let unused = l.reloaded(100, 10, [&b"alice"[..]]);
        assert_eq!(l.tracked(), 2);
        drop(unused);
        clock.advance(Duration::from_millis(100));
        let l2 = l.reloaded(100, 10, [&b"alice"[..], &b"bob"[..]]);
        assert_eq!(burst(&l2, b"alice"), 0);
        assert_eq!(burst(&l2, b"bob"), 10);
        assert_eq!(l2.tracked(), 2, "the removed key's state is dropped");
        // The replaced limiter (a request verified before the swap) neither
        // resets a key nor brings back a removed one.
        assert_eq!(burst(&l, b"alice"), 0);
        assert!(l.check(b"gone").is_ok());
        assert_eq!(l2.tracked(), 2);
        // Changing the limits carries the state over: after 10 at once, a
        // larger limit with the same burst admits nothing more at once, and
        // a smaller one waits at most 60 s.
        let l3 = l2.reloaded(200, 10, [&b"alice"[..], &b"bob"[..]]);
        assert_eq!(burst(&l3, b"bob"), 0);
        let l4 = l3.reloaded(10, 10, [&b"alice"[..], &b"bob"[..]]);
        match l4.check(b"bob") {
            Err(secs) => assert!((1..=60).contains(&secs), "{secs}"),
            Ok(()) => panic!("admitted right after 10 of 10"),
        }
        clock.advance(Duration::from_secs(60));
        assert!(l4.check(b"bob").is_ok(), "waited more than 60 s");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Review of issue 12, item 2: across reloads that change N and the
        /// burst (and requests still checked by the replaced limiters), a
        /// request admitted under limit N never finds more than N admitted
        /// in the 60 s before it, itself included.
        #[test]
        fn review_reloads_keep_at_most_n_in_any_window(
            limits in prop::collection::vec((1u32..150, 0.0f64..=1.0), 1..5),
            events in prop::collection::vec((0u64..2_000, 0usize..8), 1..500),
        ) {
            let clock = FakeRelativeClock::default();
            let mut limiters = Vec::new();
            let mut ns = Vec::new();
            for (n, frac) in &limits {
                let b = ((f64::from(*n) * frac) as u32).clamp(1, *n);
                let l = match limiters.last() {
                    None => KeyLimiter::with_clock(*n, b, clock.clone()),
                    Some(prev) => KeyLimiter::reloaded(prev, *n, b, [&b"k"[..]]),
                };
                limiters.push(l);
                ns.push(*n);
            }
            let mut now = Duration::ZERO;
            let mut adm: Vec<(Duration, u32)> = Vec::new();
            let mut current = 0;
            for (gap, pick) in events {
                clock.advance(Duration::from_millis(gap));
                now += Duration::from_millis(gap);
                // Mostly the newest reload so far; sometimes a replaced one.
                current = current.max(pick % limiters.len()).min(limiters.len() - 1);
                let i = if pick == 7 { pick % (current + 1) } else { current };
                if limiters[i].check(b"k").is_ok() {
                    adm.push((now, ns[i]));
                }
            }
            for (k, &(t, n)) in adm.iter().enumerate() {
                let inside = adm[..=k].iter().filter(|(u, _)| t - *u < MIN).count();
                prop_assert!(inside <= n as usize, "{} admitted by {:?} under N = {}", inside, t, n);
            }
        }

        /// The invariant for any arrival pattern and any limit and burst:
        /// no 60 s window holds more than N admitted requests.
        #[test]
        fn issue12_at_most_n_in_any_window(
            n in 1u32..200,
            burst_frac in 0.0f64..=1.0,
            gaps in prop::collection::vec(0u64..3_000, 1..600),
        ) {
            let b = ((f64::from(n) * burst_frac) as u32).clamp(1, n);
            let mut t = Duration::ZERO;
            let times: Vec<Duration> = gaps
                .iter()
                .map(|g| {
                    t += Duration::from_millis(*g);
                    t
                })
                .collect();
            let adm = admitted(n, b, &times);
            prop_assert!(max_in_any_minute(&adm) <= n as usize, "n {} b {}", n, b);
        }
    }
}
