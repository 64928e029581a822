//! Event-time tumbling windows: assignment, watermark, lateness and idle partitions. Pure logic,
//! no I/O; the monitor stage persists [`WatermarkTracker`] with its window state.
//!
//! - A window is `[start, start + size)`, `start = floor(ts / size) * size` (also for negative `ts`).
//!   The arithmetic saturates, so no `i64` can overflow it: the outermost windows are clamped to
//!   `i64::MIN` / `i64::MAX` (the stages reject such event times before they get here anyway).
//! - The watermark is the lowest "highest event time seen" over the active input partitions, minus
//!   the allowed lateness. It never moves backwards.
//! - A window closes when the watermark reaches its end. An event whose window is still open is
//!   applied even if it is behind the watermark (late, within lateness); an event whose window has
//!   closed is too late: counted as dropped, never applied.
//! - A partition with no input for `idle_timeout_ms` of processing time stops holding the watermark
//!   back; when every partition is idle the highest of them counts, so windows still close. (The
//!   monitor keeps a partition it has not yet read to its end from going idle: `touch_where`.)

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub mod aggregate;

/// Window and watermark settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowConfig {
    pub size_ms: i64,
    pub allowed_lateness_ms: i64,
    pub idle_timeout_ms: i64,
}

/// A half-open event-time range `[start_ms, end_ms)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct WindowRange {
    pub start_ms: i64,
    pub end_ms: i64,
}

/// The window an event at `ts_ms` belongs to.
pub fn assign(ts_ms: i64, size_ms: i64) -> WindowRange {
    let start = ts_ms.saturating_sub(ts_ms.rem_euclid(size_ms));
    WindowRange { start_ms: start, end_ms: start.saturating_add(size_ms) }
}

/// What to do with an event, given the current watermark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// At or ahead of the watermark.
    OnTime,
    /// Behind the watermark but its window is still open: applied.
    Late,
    /// Its window has closed: counted as dropped.
    TooLate,
}

pub fn admit(ts_ms: i64, size_ms: i64, watermark: Option<i64>) -> Admission {
    match watermark {
        None => Admission::OnTime,
        Some(wm) if ts_ms >= wm => Admission::OnTime,
        Some(wm) if assign(ts_ms, size_ms).end_ms > wm => Admission::Late,
        Some(_) => Admission::TooLate,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct PartitionClock {
    max_event_ms: i64,
    last_input_wall_ms: i64,
}

/// Watermark over input partitions; serialisable so it is checkpointed with the windows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct WatermarkTracker {
    partitions: BTreeMap<String, PartitionClock>,
    emitted: Option<i64>,
}

impl WatermarkTracker {
    /// Registers an assigned partition before its first event: until it delivers one or goes idle,
    /// it holds the watermark back (so a slow first fetch cannot make its events late).
    pub fn register(&mut self, key: &str, wall_ms: i64) {
        self.partitions.entry(key.to_string()).or_insert(PartitionClock { max_event_ms: i64::MIN, last_input_wall_ms: wall_ms });
    }

    /// Records an event of partition `key` (e.g. `topic/3`) at event time `ts_ms`, seen at `wall_ms`.
    pub fn observe(&mut self, key: &str, ts_ms: i64, wall_ms: i64) {
        // (looked up before inserting: this runs for every input, and the key is new only once)
        match self.partitions.get_mut(key) {
            Some(c) => {
                c.max_event_ms = c.max_event_ms.max(ts_ms);
                c.last_input_wall_ms = c.last_input_wall_ms.max(wall_ms);
            }
            None => {
                self.partitions.insert(key.to_string(), PartitionClock { max_event_ms: ts_ms, last_input_wall_ms: wall_ms });
            }
        }
    }

    /// Treats every known partition as having had input at `wall_ms` (after a restart nothing is idle yet).
    pub fn touch_all(&mut self, wall_ms: i64) {
        for c in self.partitions.values_mut() {
            c.last_input_wall_ms = wall_ms;
        }
    }

    /// Treats the partitions `which` selects as having had input at `wall_ms`: they hold the
    /// watermark at their clock instead of going idle.
    pub fn touch_where(&mut self, wall_ms: i64, which: impl Fn(&str) -> bool) {
        for (k, c) in self.partitions.iter_mut() {
            if which(k) {
                c.last_input_wall_ms = c.last_input_wall_ms.max(wall_ms);
            }
        }
    }

    /// Forgets a partition (revoked from this process).
    pub fn remove(&mut self, key: &str) {
        self.partitions.remove(key);
    }

    /// Advances and returns the watermark as of processing time `wall_ms`.
    pub fn advance(&mut self, cfg: &WindowConfig, wall_ms: i64) -> Option<i64> {
        let active: Vec<i64> = self
            .partitions
            .values()
            .filter(|c| wall_ms.saturating_sub(c.last_input_wall_ms) < cfg.idle_timeout_ms)
            .map(|c| c.max_event_ms)
            .collect();
        let basis = if active.is_empty() { self.partitions.values().map(|c| c.max_event_ms).max() } else { active.into_iter().min() };
        if let Some(b) = basis.filter(|&b| b != i64::MIN) {
            let wm = b.saturating_sub(cfg.allowed_lateness_ms);
            self.emitted = Some(self.emitted.map_or(wm, |e| e.max(wm)));
        }
        self.emitted
    }

    pub fn current(&self) -> Option<i64> {
        self.emitted
    }

    /// Highest event time up to which the partitions whose key starts with `prefix` are complete:
    /// the lowest maximum among the active ones (the highest when all are idle), no lateness.
    pub fn frontier(&self, prefix: &str, cfg: &WindowConfig, wall_ms: i64) -> Option<i64> {
        let clocks: Vec<&PartitionClock> = self.partitions.iter().filter(|(k, _)| k.starts_with(prefix)).map(|(_, c)| c).collect();
        let active: Vec<i64> = clocks.iter().filter(|c| wall_ms.saturating_sub(c.last_input_wall_ms) < cfg.idle_timeout_ms).map(|c| c.max_event_ms).collect();
        let basis = if active.is_empty() { clocks.iter().map(|c| c.max_event_ms).max() } else { active.into_iter().min() };
        basis.filter(|&b| b != i64::MIN)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CFG: WindowConfig = WindowConfig { size_ms: 60_000, allowed_lateness_ms: 5_000, idle_timeout_ms: 30_000 };

    #[test]
    fn assignment_is_half_open() {
        assert_eq!(assign(0, 60_000), WindowRange { start_ms: 0, end_ms: 60_000 });
        assert_eq!(assign(59_999, 60_000).start_ms, 0);
        assert_eq!(assign(60_000, 60_000).start_ms, 60_000);
        assert_eq!(assign(-1, 60_000), WindowRange { start_ms: -60_000, end_ms: 0 });
    }

    #[test]
    fn lateness_keeps_windows_open_then_drops() {
        let mut w = WatermarkTracker::default();
        w.observe("t/0", 64_000, 0);
        let wm = w.advance(&CFG, 0); // 59_000: window [0, 60000) still open
        assert_eq!(wm, Some(59_000));
        assert_eq!(admit(30_000, CFG.size_ms, wm), Admission::Late);
        w.observe("t/0", 65_000, 1);
        let wm = w.advance(&CFG, 1); // 60_000: [0, 60000) closed
        assert_eq!(admit(30_000, CFG.size_ms, wm), Admission::TooLate);
        assert_eq!(admit(61_000, CFG.size_ms, wm), Admission::OnTime);
    }

    #[test]
    fn slowest_active_partition_holds_the_watermark_until_idle() {
        let mut w = WatermarkTracker::default();
        w.observe("t/0", 100_000, 0);
        w.observe("t/1", 10_000, 0);
        assert_eq!(w.advance(&CFG, 1_000), Some(5_000));
        // t/1 silent for the idle timeout: t/0 alone decides
        w.observe("t/0", 120_000, 31_000);
        assert_eq!(w.advance(&CFG, 31_000), Some(115_000));
        // everything idle: the highest partition still counts, so windows close
        assert_eq!(w.advance(&CFG, 10_000_000), Some(115_000));
    }

    #[test]
    fn an_assigned_partition_without_events_holds_until_idle() {
        let mut w = WatermarkTracker::default();
        w.register("t/0", 0);
        w.register("t/1", 0);
        w.observe("t/0", 100_000, 10);
        assert_eq!(w.advance(&CFG, 10), None);
        assert_eq!(w.advance(&CFG, 30_001), Some(95_000));
    }

    proptest! {
        #[test]
        fn every_timestamp_is_in_exactly_its_window(ts in -10_000_000_000i64..10_000_000_000, size in 1i64..10_000_000) {
            let r = assign(ts, size);
            prop_assert!(r.start_ms <= ts && ts < r.end_ms);
            prop_assert_eq!(r.end_ms - r.start_ms, size);
            prop_assert_eq!(r.start_ms.rem_euclid(size), 0);
        }

        #[test]
        fn window_arithmetic_holds_over_the_whole_i64_range(ts in any::<i64>(), size in 1i64..=i64::MAX, wm in any::<i64>()) {
            let r = assign(ts, size);
            prop_assert!(r.start_ms <= ts);
            prop_assert!(ts < r.end_ms || r.end_ms == i64::MAX, "{ts} outside [{}, {})", r.start_ms, r.end_ms);
            prop_assert!(r.end_ms >= r.start_ms);
            // admission never panics and agrees with the window's end
            match admit(ts, size, Some(wm)) {
                Admission::TooLate => prop_assert!(r.end_ms <= wm),
                Admission::Late => prop_assert!(ts < wm && r.end_ms > wm),
                Admission::OnTime => prop_assert!(ts >= wm),
            }
            let mut w = WatermarkTracker::default();
            w.observe("t/0", ts, 0);
            let cfg = WindowConfig { size_ms: size, allowed_lateness_ms: size, idle_timeout_ms: 1 };
            let advanced = w.advance(&cfg, i64::MAX);
            prop_assert!(advanced.is_none_or(|v| v <= ts));
        }

        #[test]
        fn watermark_never_goes_back(events in proptest::collection::vec((0u8..4, 0i64..1_000_000, 0i64..100_000), 1..200)) {
            let mut w = WatermarkTracker::default();
            let mut last = None;
            let mut wall = 0;
            for (p, ts, dt) in events {
                wall += dt;
                w.observe(&format!("t/{p}"), ts, wall);
                let wm = w.advance(&CFG, wall);
                prop_assert!(wm >= last);
                last = wm;
            }
        }

        #[test]
        fn admitted_events_never_land_in_closed_windows(ts in 0i64..1_000_000, wm in 0i64..1_000_000) {
            match admit(ts, CFG.size_ms, Some(wm)) {
                Admission::TooLate => prop_assert!(assign(ts, CFG.size_ms).end_ms <= wm),
                _ => prop_assert!(assign(ts, CFG.size_ms).end_ms > wm),
            }
        }
    }
}
