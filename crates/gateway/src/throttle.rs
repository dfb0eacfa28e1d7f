//! Throttling of failed authentication per client address (issue 12, item 4:
//! 1,000 wrong keys on one connection took 0.03 s, all 401).
//!
//! An address may fail [`FREE_FAILURES`] times per [`WINDOW`] (a leaky
//! bucket: each failure is a debt of `WINDOW / FREE_FAILURES` that time pays
//! off; ten failures at once are a full window of debt). The failure that
//! fills the bucket blocks the address for [`FIRST_BLOCK`], and every further
//! failure after a block (until the address has been quiet for a [`WINDOW`]
//! after its last block) blocks it for twice as long as the last time, up to
//! [`MAX_BLOCK`]. While
//! blocked, every request that needs a key gets 429 with `Retry-After`
//! without its key being looked at: a blocked address learns nothing, so
//! guessing costs time whatever the guess. Other addresses are not affected.
//!
//! IPv6 clients are grouped by their /64 (one host usually has a whole /64);
//! IPv4-mapped IPv6 addresses count as the IPv4 address. The table holds at
//! most [`MAX_ENTRIES`] addresses: when it is full, entries that have nothing
//! left to remember go first, then the least recently active.
//!
//! Time is passed in (`now`), so tests drive it.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failed keys an address may send within [`WINDOW`] before it is blocked.
pub const FREE_FAILURES: u32 = 10;
/// [`FREE_FAILURES`] failures per this much are free; also how long an
/// address must stay quiet after its last block for its back-off to start
/// again from [`FIRST_BLOCK`].
pub const WINDOW: Duration = Duration::from_secs(60);
/// The first block.
pub const FIRST_BLOCK: Duration = Duration::from_secs(1);
/// The longest block.
pub const MAX_BLOCK: Duration = Duration::from_secs(15 * 60);
/// Addresses remembered at most.
pub const MAX_ENTRIES: usize = 10_000;

#[derive(Debug, Clone, Copy)]
struct Entry {
    /// When the failures so far are paid off (each costs `WINDOW / FREE_FAILURES`).
    debt_until: Instant,
    /// Blocks since the address was last quiet for a [`WINDOW`].
    strikes: u32,
    blocked_until: Option<Instant>,
    last_failure: Instant,
}

impl Entry {
    /// The last failure or the end of the last block, whichever is later.
    fn last_active(&self) -> Instant {
        self.blocked_until
            .map_or(self.last_failure, |b| b.max(self.last_failure))
    }
    /// Nothing left to remember at `now`: debt paid, not blocked, and quiet
    /// for a window.
    fn expired(&self, now: Instant) -> bool {
        now >= self.debt_until && now.saturating_duration_since(self.last_active()) >= WINDOW
    }
}

/// Whole seconds, rounded up, at least 1.
fn secs_up(d: Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}

/// The address as counted: IPv4, or an IPv6 /64.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// What [`AuthFailures::failed`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Counted; the address may still try.
    Counted,
    /// This failure blocked the address for that long (seconds, rounded up).
    Blocked { secs: u64 },
}

/// Failed authentication per client address.
#[derive(Debug, Default)]
pub struct AuthFailures {
    table: Mutex<HashMap<IpAddr, Entry>>,
}

impl AuthFailures {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Entry>> {
        match self.table.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Addresses remembered now.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// When `ip` is blocked at `now`: the seconds until it is not (`Retry-After`).
    pub fn blocked(&self, ip: IpAddr, now: Instant) -> Option<u64> {
        let t = self.lock();
        let until = t.get(&client_key(ip))?.blocked_until?;
        (until > now).then(|| secs_up(until - now))
    }

    /// Records a failed key from `ip` at `now`.
    pub fn failed(&self, ip: IpAddr, now: Instant) -> Verdict {
        let key = client_key(ip);
        let mut t = self.lock();
        if !t.contains_key(&key) && t.len() >= MAX_ENTRIES {
            make_room(&mut t, now);
        }
        let e = t.entry(key).or_insert(Entry {
            debt_until: now,
            strikes: 0,
            blocked_until: None,
            last_failure: now,
        });
        if now.saturating_duration_since(e.last_active()) >= WINDOW {
            e.strikes = 0;
        }
        e.debt_until = e.debt_until.max(now) + WINDOW / FREE_FAILURES;
        e.last_failure = now;
        let debt = e.debt_until.saturating_duration_since(now);
        if e.strikes == 0 && debt < WINDOW {
            return Verdict::Counted;
        }
        let block = FIRST_BLOCK
            .saturating_mul(1u32 << e.strikes.min(20))
            .min(MAX_BLOCK);
        e.strikes = e.strikes.saturating_add(1);
        e.blocked_until = Some(now + block);
        Verdict::Blocked {
            secs: secs_up(block),
        }
    }
}

/// Drops what has nothing left to remember; when that is not enough, the
/// least recently active address.
fn make_room(t: &mut HashMap<IpAddr, Entry>, now: Instant) {
    t.retain(|_, e| !e.expired(now));
    while t.len() >= MAX_ENTRIES {
        let oldest = t
            .iter()
            .min_by_key(|(_, e)| e.last_active())
            .map(|(k, _)| *k);
        match oldest {
            Some(k) => {
                t.remove(&k);
            }
            None => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// Issue 12, item 4: ten free failures, then a block that doubles with
    /// every further failure, capped; others unaffected; a quiet window resets.
    #[test]
    fn issue12_failed_keys_back_off_exponentially() {
        let f = AuthFailures::new();
        let a = ip("192.0.2.1");
        let t0 = Instant::now();
        for i in 1..FREE_FAILURES {
            assert_eq!(f.failed(a, t0), Verdict::Counted, "failure {i}");
            assert_eq!(f.blocked(a, t0), None);
        }
        assert_eq!(f.failed(a, t0), Verdict::Blocked { secs: 1 });
        assert_eq!(f.blocked(a, t0), Some(1));
        assert_eq!(f.blocked(ip("192.0.2.2"), t0), None);
        // Each failure after a block doubles the next one.
        let mut t = t0;
        for want in [2u64, 4, 8, 16, 32, 64, 128, 256, 512, 900, 900] {
            t = t + Duration::from_secs(f.blocked(a, t).unwrap());
            assert_eq!(f.blocked(a, t), None);
            match f.failed(a, t) {
                Verdict::Blocked { secs, .. } => assert_eq!(secs, want),
                v => panic!("{v:?}"),
            }
        }
        // A quiet window after the block: back to ten free failures.
        let later = t + MAX_BLOCK + WINDOW;
        assert_eq!(f.blocked(a, later), None);
        for _ in 1..FREE_FAILURES {
            assert_eq!(f.failed(a, later), Verdict::Counted);
        }
        assert!(matches!(
            f.failed(a, later),
            Verdict::Blocked { secs: 1, .. }
        ));
    }

    /// Failures spread over more than a window are never blocked.
    #[test]
    fn slow_failures_are_not_blocked() {
        let f = AuthFailures::new();
        let a = ip("192.0.2.1");
        let t0 = Instant::now();
        for i in 0..100u32 {
            let t = t0 + (WINDOW / FREE_FAILURES + Duration::from_millis(10)) * i;
            assert_eq!(f.failed(a, t), Verdict::Counted, "failure {i}");
        }
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_v4_as_v4() {
        assert_eq!(
            client_key(ip("2001:db8:1:2:aaaa::1")),
            client_key(ip("2001:db8:1:2:bbbb::2"))
        );
        assert_ne!(
            client_key(ip("2001:db8:1:2::1")),
            client_key(ip("2001:db8:1:3::1"))
        );
        assert_eq!(client_key(ip("::ffff:192.0.2.1")), ip("192.0.2.1"));
    }

    /// The table stays bounded whatever the addresses, and a blocked address
    /// that is still active survives an eviction of idle ones.
    #[test]
    fn issue12_failure_table_is_bounded() {
        let f = AuthFailures::new();
        let t0 = Instant::now();
        let bad = ip("198.51.100.7");
        for _ in 0..FREE_FAILURES {
            f.failed(bad, t0);
        }
        for i in 0..(MAX_ENTRIES as u32 + 5000) {
            let a = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            f.failed(a, t0 + Duration::from_micros(u64::from(i)));
            // The blocked address keeps being active (its block renews).
            if i % 1000 == 0 {
                f.failed(bad, t0 + Duration::from_micros(u64::from(i)));
            }
            assert!(f.len() <= MAX_ENTRIES);
        }
        assert!(f.blocked(bad, t0 + Duration::from_millis(15)).is_some());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Any sequence of failures from one address: never a panic,
        /// Retry-After within 1 s..=MAX_BLOCK, and few keys looked at in any
        /// 60 s window.
        #[test]
        fn issue12_throttle_bounds_guesses(gaps in prop::collection::vec(0u64..2_000, 1..400)) {
            let f = AuthFailures::new();
            let a = ip("192.0.2.9");
            let t0 = Instant::now();
            let mut t = t0;
            let mut tried: Vec<Instant> = Vec::new();
            for g in gaps {
                t += Duration::from_millis(g);
                if let Some(s) = f.blocked(a, t) {
                    prop_assert!((1..=MAX_BLOCK.as_secs()).contains(&s));
                    continue;
                }
                tried.push(t);
                if let Verdict::Blocked { secs, .. } = f.failed(a, t) {
                    prop_assert!((1..=MAX_BLOCK.as_secs()).contains(&secs));
                }
            }
            // Keys looked at in any 60 s window: a full bucket (10), what
            // drains meanwhile (10), and one per block (1, 2, 4, 8, 16, 32 s).
            let mut j = 0;
            for i in 0..tried.len() {
                while tried[i] - tried[j] >= WINDOW {
                    j += 1;
                }
                prop_assert!(
                    i - j < (2 * FREE_FAILURES + 6) as usize,
                    "{} keys looked at in a window",
                    i - j + 1
                );
            }
        }
    }
}
