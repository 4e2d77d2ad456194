//! Rate limits for log lines a guest can trigger.
//!
//! A hostile or broken guest can hit an out-of-protocol path (a write to a read-only MMIO
//! register, a malformed descriptor chain) millions of times a second. Each such path logs a
//! warning, and kiln's log is a file on the host: unlimited, the guest could fill the host's
//! disk (or tmpfs) through it. Every guest-triggered warning therefore goes through a
//! [`WarnLimiter`], a token bucket: a burst of [`WARN_BURST`] lines, then [`WARN_PER_SEC`]
//! lines a second. What the bucket refuses is counted, and the next line it lets through is
//! preceded by one saying how many were dropped.
//!
//! Use [`guest_warn!`](crate::guest_warn) with a limiter the device owns (one per device,
//! so one noisy device does not silence another), or with `static` for paths shared by
//! every device (a limiter per call site).

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Lines a limiter lets through at once after a quiet period.
pub const WARN_BURST: u32 = 64;
/// Lines a limiter lets through per second once the burst is spent.
pub const WARN_PER_SEC: u32 = 2;

/// A token bucket for one source of guest-triggered log lines.
#[derive(Debug)]
pub struct WarnLimiter {
    /// Tokens left; one line costs one.
    tokens: u32,
    /// When the bucket was last refilled; `None` until first used (so that `new` is const).
    refilled: Option<Instant>,
    /// Lines refused since the last one let through.
    dropped: u64,
}

impl Default for WarnLimiter {
    fn default() -> Self {
        Self::new()
    }
}

impl WarnLimiter {
    /// A full bucket.
    pub const fn new() -> Self {
        Self {
            tokens: WARN_BURST,
            refilled: None,
            dropped: 0,
        }
    }

    /// Whether a line may be logged now. `Some(n)`: yes, and `n` lines were refused since the
    /// last one let through (log that first when non-zero); `None`: drop this line.
    pub fn admit(&mut self) -> Option<u64> {
        self.admit_at(Instant::now())
    }

    /// [`admit`](Self::admit) at time `now` (tests drive the clock).
    pub fn admit_at(&mut self, now: Instant) -> Option<u64> {
        let last = *self.refilled.get_or_insert(now);
        let elapsed = now.saturating_duration_since(last);
        let earned = elapsed.as_millis() * u128::from(WARN_PER_SEC) / 1000;
        if earned > 0 {
            let earned = u32::try_from(earned).unwrap_or(u32::MAX);
            self.tokens = self.tokens.saturating_add(earned).min(WARN_BURST);
            // Keep the remainder of a partly earned token: advance by what was paid for.
            let paid = Duration::from_millis(u64::from(earned) * 1000 / u64::from(WARN_PER_SEC));
            self.refilled = Some(if self.tokens == WARN_BURST {
                now
            } else {
                last + paid
            });
        }
        if self.tokens == 0 {
            self.dropped = self.dropped.saturating_add(1);
            return None;
        }
        self.tokens -= 1;
        Some(std::mem::take(&mut self.dropped))
    }

    /// [`admit`](Self::admit) through a shared limiter (a `static` per call site).
    pub fn admit_shared(shared: &Mutex<WarnLimiter>) -> Option<u64> {
        shared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .admit()
    }
}

/// `tracing::warn!` for a line the guest can trigger, through a [`WarnLimiter`]:
/// `guest_warn!(self.warns, "...", ...)` with a limiter the device owns (a `&mut` place),
/// or `guest_warn!(static, "...", ...)` for a limiter of this call site alone.
#[macro_export]
macro_rules! guest_warn {
    (static, $($arg:tt)+) => {{
        static LIMIT: ::std::sync::Mutex<$crate::guest_warn::WarnLimiter> =
            ::std::sync::Mutex::new($crate::guest_warn::WarnLimiter::new());
        if let Some(dropped) = $crate::guest_warn::WarnLimiter::admit_shared(&LIMIT) {
            $crate::guest_warn::report_dropped(dropped);
            ::tracing::warn!($($arg)+);
        }
    }};
    ($limiter:expr, $($arg:tt)+) => {{
        if let Some(dropped) = $limiter.admit() {
            $crate::guest_warn::report_dropped(dropped);
            ::tracing::warn!($($arg)+);
        }
    }};
}

/// The line that says how many guest-triggered lines a limiter refused (none if `dropped`
/// is 0).
pub fn report_dropped(dropped: u64) {
    if dropped > 0 {
        tracing::warn!(
            dropped,
            "{dropped} guest-triggered warnings were suppressed (rate limit: {WARN_BURST} at once, \
             then {WARN_PER_SEC} a second)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refused_then_counts_what_was_dropped() {
        let t0 = Instant::now();
        let mut l = WarnLimiter::new();
        for _ in 0..WARN_BURST {
            assert_eq!(l.admit_at(t0), Some(0));
        }
        for _ in 0..1000 {
            assert_eq!(l.admit_at(t0), None);
        }
        // Half a token's time: still nothing.
        let half = Duration::from_millis(500 / u64::from(WARN_PER_SEC));
        assert_eq!(l.admit_at(t0 + half), None);
        // One token's time: one line, reporting the 1001 refused before it.
        let one = Duration::from_millis(1000 / u64::from(WARN_PER_SEC));
        assert_eq!(l.admit_at(t0 + one), Some(1001));
        assert_eq!(l.admit_at(t0 + one), None);
    }

    #[test]
    fn sustained_rate_is_bounded() {
        // A guest hammering for 30 s gets the burst plus the rate, not a line per access.
        let t0 = Instant::now();
        let mut l = WarnLimiter::new();
        let mut let_through = 0u64;
        let mut reported_dropped = 0u64;
        let mut attempts = 0u64;
        for ms in 0..30_000u64 {
            for _ in 0..10 {
                attempts += 1;
                if let Some(d) = l.admit_at(t0 + Duration::from_millis(ms)) {
                    let_through += 1;
                    reported_dropped += d;
                }
            }
        }
        let max = u64::from(WARN_BURST) + 30 * u64::from(WARN_PER_SEC);
        assert!(let_through <= max, "{let_through} lines, at most {max}");
        assert!(
            let_through >= max - 1,
            "{let_through} lines, expected ~{max}"
        );
        // Every refused line is accounted for, except those after the last one let through.
        assert!(reported_dropped + let_through <= attempts);
        assert!(attempts - reported_dropped - let_through < 10 * 1000 / u64::from(WARN_PER_SEC));
    }

    #[test]
    fn refills_to_the_burst_after_quiet() {
        let t0 = Instant::now();
        let mut l = WarnLimiter::new();
        while l.admit_at(t0).is_some() {}
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..WARN_BURST {
            assert!(l.admit_at(later).is_some());
        }
        assert_eq!(l.admit_at(later), None);
    }
}
