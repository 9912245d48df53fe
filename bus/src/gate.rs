//! The staleness gate: whether this node's caches may serve a read, decided on a monotonic clock
//! from the evidence the receiver gathers.
//!
//! # The rule
//! A node serves from its caches at time `t` only if it holds *evidence*, gathered at some time
//! `t0 >= t - window`, that it had applied every invalidation accepted before `t0`. Evidence is
//! recorded as its `t0` with [`Gate::evidence`]; every read calls [`Gate::serving`], which
//! compares the clock with the freshest `t0` (a few nanoseconds: no lock, no task involved, so a
//! node whose watchdog or receiver is late, paused or starved stops serving on time anyway).
//! What counts as evidence is the receiver's business (see `receiver`); this module only keeps
//! time honestly:
//! - all of it runs on a monotonic clock ([`Monotonic`], `Instant`), never the wall clock, so a
//!   clock step (NTP, an operator, a VM migration) can neither extend nor cut serving;
//! - and should a clock ever read lower than before (an injected clock in a test, a platform
//!   bug), the gate keeps the highest reading it has seen, so going back in time never makes old
//!   evidence look fresh (`a_clock_that_steps_back_never_extends_serving` below fails without it).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A source of monotonic time, in nanoseconds since an origin of its own (never 0).
pub(crate) trait Clock: Send + Sync + 'static {
    fn now_ns(&self) -> u64;
}

/// The process's monotonic clock (`Instant`).
pub(crate) struct Monotonic {
    origin: Instant,
}

impl Monotonic {
    pub fn new() -> Self {
        Monotonic {
            // One second before now, so that no reading is ever 0 (0 means "no evidence").
            origin: Instant::now()
                .checked_sub(Duration::from_secs(1))
                .unwrap_or_else(Instant::now),
        }
    }
}

impl Clock for Monotonic {
    #[inline]
    fn now_ns(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }
}

/// Whether the caches may serve, from the freshest evidence and the clock.
pub(crate) struct Gate<C: Clock = Monotonic> {
    clock: C,
    window_ns: u64,
    /// When the freshest evidence was gathered (clock ns; 0: none yet).
    evidence_ns: AtomicU64,
    /// The highest clock reading seen by `poll` and `evidence`.
    high_ns: AtomicU64,
    /// The gate is switched off (for tests that show what it prevents).
    disabled: AtomicBool,
    /// The state the last `poll` saw, to report transitions and time spent not serving.
    polled: AtomicBool,
    suspect_since_ns: AtomicU64,
    suspect_total_ns: AtomicU64,
}

impl<C: Clock> Gate<C> {
    /// A closed gate (no evidence yet) that lets evidence serve for `window`.
    pub fn new(clock: C, window: Duration) -> Self {
        let now = clock.now_ns();
        Gate {
            clock,
            window_ns: window.as_nanos() as u64,
            evidence_ns: AtomicU64::new(0),
            high_ns: AtomicU64::new(now),
            disabled: AtomicBool::new(false),
            polled: AtomicBool::new(false),
            suspect_since_ns: AtomicU64::new(now.max(1)),
            suspect_total_ns: AtomicU64::new(0),
        }
    }

    /// The clock, never below a reading seen before.
    #[inline]
    pub fn now(&self) -> u64 {
        self.clock.now_ns().max(self.high_ns.load(Ordering::Relaxed))
    }

    /// Whether the caches may serve now.
    #[inline]
    pub fn serving(&self) -> bool {
        if self.disabled.load(Ordering::Relaxed) {
            return true;
        }
        let t0 = self.evidence_ns.load(Ordering::Acquire);
        t0 != 0 && self.now().saturating_sub(t0) <= self.window_ns
    }

    /// How much longer the caches may serve without new evidence (`None`: not now).
    pub fn vouched_for(&self) -> Option<Duration> {
        if self.disabled.load(Ordering::Relaxed) {
            return Some(Duration::from_nanos(self.window_ns));
        }
        let t0 = self.evidence_ns.load(Ordering::Acquire);
        let age = self.now().saturating_sub(t0);
        (t0 != 0 && age <= self.window_ns).then(|| Duration::from_nanos(self.window_ns - age))
    }

    /// When the freshest evidence was gathered (clock ns; 0: none yet).
    pub fn evidence_at(&self) -> u64 {
        self.evidence_ns.load(Ordering::Acquire)
    }

    /// Records evidence gathered at `t0` (a reading of this gate's clock): every invalidation
    /// accepted before `t0` has been applied.
    pub fn evidence(&self, t0: u64) {
        self.high_ns.fetch_max(self.clock.now_ns(), Ordering::Relaxed);
        self.evidence_ns.fetch_max(t0, Ordering::AcqRel);
    }

    /// Forgets all evidence: the caches stop serving until new evidence comes.
    #[cfg(test)]
    pub fn revoke(&self) {
        self.evidence_ns.store(0, Ordering::Release);
    }

    pub fn disable(&self) {
        self.disabled.store(true, Ordering::SeqCst);
    }

    /// Re-reads the state (the watchdog calls it every few ms); returns `Some(new)` when it
    /// changed since the last poll, and keeps the time spent not serving.
    pub fn poll(&self) -> Option<bool> {
        let now = self.clock.now_ns();
        self.high_ns.fetch_max(now, Ordering::Relaxed);
        let ok = self.serving();
        let was = self.polled.swap(ok, Ordering::AcqRel);
        if was == ok {
            return None;
        }
        let now = self.now();
        if ok {
            let since = self.suspect_since_ns.swap(0, Ordering::AcqRel);
            if since > 0 {
                self.suspect_total_ns
                    .fetch_add(now.saturating_sub(since), Ordering::Relaxed);
            }
        } else {
            self.suspect_since_ns.store(now.max(1), Ordering::Release);
        }
        Some(ok)
    }

    /// Total time spent not serving so far (from the start, until the first evidence included).
    pub fn suspect_time(&self) -> Duration {
        let since = self.suspect_since_ns.load(Ordering::Acquire);
        let open = if since > 0 { self.now().saturating_sub(since) } else { 0 };
        Duration::from_nanos(self.suspect_total_ns.load(Ordering::Relaxed) + open)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A clock the test sets by hand, forwards or backwards.
    #[derive(Clone)]
    struct Manual(Arc<AtomicU64>);

    impl Clock for Manual {
        fn now_ns(&self) -> u64 {
            self.0.load(Ordering::SeqCst)
        }
    }

    const MS: u64 = 1_000_000;

    fn gate() -> (Gate<Manual>, Arc<AtomicU64>) {
        let t = Arc::new(AtomicU64::new(1000 * MS));
        (Gate::new(Manual(t.clone()), Duration::from_millis(500)), t)
    }

    #[test]
    fn serves_only_within_the_window_of_the_freshest_evidence() {
        let (g, t) = gate();
        assert!(!g.serving(), "no evidence yet");
        g.evidence(1000 * MS);
        assert!(g.serving());
        t.store(1500 * MS, Ordering::SeqCst);
        assert!(g.serving(), "exactly the window");
        assert_eq!(g.vouched_for(), Some(Duration::ZERO));
        t.store(1500 * MS + 1, Ordering::SeqCst);
        assert!(!g.serving(), "past the window");
        // Older evidence arriving late never moves the gate back.
        g.evidence(900 * MS);
        assert!(!g.serving());
        g.evidence(1400 * MS);
        assert!(g.serving());
        assert_eq!(
            g.vouched_for(),
            Some(Duration::from_millis(400) - Duration::from_nanos(1))
        );
        g.revoke();
        assert!(!g.serving());
    }

    #[test]
    fn a_clock_that_steps_back_never_extends_serving() {
        let (g, t) = gate();
        g.evidence(1000 * MS);
        assert_eq!(g.poll(), Some(true));
        t.store(1600 * MS, Ordering::SeqCst);
        assert_eq!(g.poll(), Some(false), "the window passed");
        // The clock steps back by a second: the evidence of t=1000 ms must not look 400 ms old.
        t.store(600 * MS, Ordering::SeqCst);
        assert!(!g.serving(), "a backward step revived old evidence");
        assert_eq!(g.poll(), None);
        // Fresh evidence, stamped by the stepped-back clock, does not serve beyond the highest
        // reading seen plus nothing: it is older than what the gate already knows is now.
        g.evidence(700 * MS);
        assert!(!g.serving());
        // Once the clock catches up, new evidence serves as usual.
        t.store(1700 * MS, Ordering::SeqCst);
        g.evidence(1700 * MS);
        assert!(g.serving());
    }

    #[test]
    fn poll_reports_transitions_and_keeps_the_time_not_serving() {
        let (g, t) = gate();
        assert_eq!(g.poll(), None, "starts not serving");
        g.evidence(1000 * MS);
        assert_eq!(g.poll(), Some(true));
        t.store(2000 * MS, Ordering::SeqCst);
        assert_eq!(g.poll(), Some(false));
        t.store(2300 * MS, Ordering::SeqCst);
        g.evidence(2300 * MS);
        assert_eq!(g.poll(), Some(true));
        // Not serving from 1000 (start, no evidence: 0 ms) and from 2000 to 2300.
        assert_eq!(g.suspect_time(), Duration::from_millis(300));
        g.disable();
        t.store(9000 * MS, Ordering::SeqCst);
        assert!(g.serving(), "a disabled gate always serves");
    }
}
