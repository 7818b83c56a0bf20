//! ICMP errors the datapath sends (port unreachable for a frontend without
//! endpoints, fragmentation needed) are rate-limited as the kernel limits
//! its own (`icmp_msgs_per_sec`, `icmp_msgs_burst`): a token bucket, one
//! per CPU so the packet path shares no counter. Without it, a spoofed
//! 28-byte packet to a frontend without endpoints reflects 70 bytes at
//! line rate at whoever's address was forged.

/// Tokens a second and the bucket's depth, per CPU; set by the agent at
/// load time (a global of the eBPF object). `per_sec == 0`: no limit.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct IcmpLimit {
    pub per_sec: u32,
    pub burst: u32,
}

impl IcmpLimit {
    /// The kernel's defaults for its own ICMP errors.
    pub const DEFAULT: Self = Self {
        per_sec: 1000,
        burst: 50,
    };

    /// Checked: a limit with no burst could never send an error (0 per
    /// second, no limit, is the way to turn it off).
    pub fn new(per_sec: u32, burst: u32) -> Result<Self, &'static str> {
        if per_sec != 0 && burst == 0 {
            return Err("--icmp-errors-burst 0: must be at least 1 while --icmp-errors-per-second is not 0 (no error could be sent; 0 per second turns the limit off)");
        }
        Ok(Self { per_sec, burst })
    }
}

/// One CPU's bucket (a per-CPU array of one entry; starts empty, is
/// filled on first use).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct IcmpBucket {
    pub credit: u32,
    pub _pad: u32,
    /// When tokens were last added (ns, monotonic).
    pub stamp_ns: u64,
}

const NS_PER_SEC: u64 = 1_000_000_000;

impl IcmpBucket {
    /// Whether an error may be sent at `now_ns`, taking a token if so.
    /// Tokens earned since the last refill are added first, up to the
    /// burst (the stamp moves by whole tokens, so no fraction is lost to
    /// frequent calls).
    #[inline(always)]
    pub fn take(&mut self, now_ns: u64, limit: &IcmpLimit) -> bool {
        if limit.per_sec == 0 {
            return true;
        }
        let per_sec = limit.per_sec as u64;
        let elapsed = now_ns.saturating_sub(self.stamp_ns);
        // Long enough to fill an empty bucket: full (no overflow however
        // long the idle; burst × 10^9 fits in 64 bits).
        if elapsed >= limit.burst as u64 * NS_PER_SEC / per_sec {
            self.credit = limit.burst;
            self.stamp_ns = now_ns;
        } else {
            let earned = elapsed * per_sec / NS_PER_SEC;
            if earned > 0 {
                let credit = self.credit as u64 + earned;
                self.credit = if credit > limit.burst as u64 {
                    limit.burst
                } else {
                    credit as u32
                };
                // Forward by the tokens' worth, keeping the fraction earned.
                self.stamp_ns += earned * NS_PER_SEC / per_sec;
            }
        }
        if self.credit == 0 {
            return false;
        }
        self.credit -= 1;
        true
    }
}

const _: () = assert!(core::mem::size_of::<IcmpLimit>() == 8);
const _: () = assert!(core::mem::size_of::<IcmpBucket>() == 16);

crate::user_pod!(IcmpLimit, IcmpBucket);

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn a_burst_then_one_token_per_interval() {
        let limit = IcmpLimit {
            per_sec: 1000,
            burst: 5,
        };
        let mut b = IcmpBucket::default();
        let t0 = 10 * NS_PER_SEC;
        let sent = (0..20).filter(|_| b.take(t0, &limit)).count();
        assert_eq!(sent, 5, "the burst, then nothing at the same instant");
        assert!(!b.take(t0 + MS / 2, &limit), "half a token is not a token");
        assert!(b.take(t0 + MS, &limit), "one token a millisecond");
        assert!(!b.take(t0 + MS, &limit));
        // Calls every 0.4 ms keep no fraction back: 10 ms earn 10 tokens.
        let sent = (1..=25)
            .filter(|i| b.take(t0 + MS + i * 4 * MS / 10, &limit))
            .count();
        assert_eq!(sent, 10);
    }

    #[test]
    fn an_idle_bucket_refills_to_the_burst_only() {
        let limit = IcmpLimit {
            per_sec: 1000,
            burst: 50,
        };
        let mut b = IcmpBucket::default();
        let t = 3600 * NS_PER_SEC;
        assert_eq!((0..100).filter(|_| b.take(t, &limit)).count(), 50);
        let later = t + 3600 * NS_PER_SEC; // an hour idle
        assert_eq!((0..100).filter(|_| b.take(later, &limit)).count(), 50);
    }

    #[test]
    fn a_burst_larger_than_a_seconds_worth_fills_too() {
        let limit = IcmpLimit {
            per_sec: 1,
            burst: 3,
        };
        let mut b = IcmpBucket::default();
        let t = 100 * NS_PER_SEC;
        assert_eq!((0..10).filter(|_| b.take(t, &limit)).count(), 3);
        assert!(!b.take(t + NS_PER_SEC - 1, &limit));
        assert!(b.take(t + NS_PER_SEC, &limit));
        assert!(!b.take(t + NS_PER_SEC, &limit));
    }

    #[test]
    fn a_limit_without_a_burst_is_refused() {
        assert!(IcmpLimit::new(1000, 0)
            .unwrap_err()
            .starts_with("--icmp-errors-burst 0: must be at least 1"));
        assert_eq!(
            IcmpLimit::new(0, 0),
            Ok(IcmpLimit {
                per_sec: 0,
                burst: 0
            })
        );
        assert_eq!(IcmpLimit::new(1000, 50), Ok(IcmpLimit::DEFAULT));
    }

    #[test]
    fn zero_per_second_is_no_limit() {
        let limit = IcmpLimit {
            per_sec: 0,
            burst: 0,
        };
        let mut b = IcmpBucket::default();
        assert!((0..10_000).all(|_| b.take(1, &limit)));
    }
}
