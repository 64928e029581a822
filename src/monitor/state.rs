//! The monitor's working state and how input changes it. No I/O: [`MonitorState::apply_result`],
//! [`MonitorState::apply_feedback`] and [`MonitorState::close_windows`] record what changed, and the
//! stage writes exactly those changes to RocksDB in one batch with the input offsets.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::{
    alert::{self, AlertEvent, AlertInstance, AlertRule, Severity},
    document::{DocumentFeedback, InferenceResult},
    inference::{codes, CLASSIFIER},
    rollout::{Controller, RolloutConfig, RolloutDecision},
    window::{
        admit,
        aggregate::{Subject, WindowAggregate},
        assign, Admission, WatermarkTracker, WindowConfig, WindowRange,
    },
};

use super::records::WindowMetrics;

/// A prediction kept for joining feedback.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    pub subject: Subject,
    pub label: Option<String>,
    pub event_ms: i64,
    /// The result it came from: a second result with this id is a redelivery, not a new document.
    #[serde(default)]
    pub result_id: Option<String>,
}

impl Prediction {
    /// Whether `r` is the result this prediction was taken from, delivered again: the same result
    /// id and the same event time (a document submitted again, at another time, counts again).
    pub fn is_from(&self, r: &InferenceResult) -> bool {
        self.result_id.as_deref() == Some(r.result_id.as_str()) && self.event_ms == r.submitted_at
    }
}

/// An open window as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredWindow {
    pub subject: Subject,
    pub range: WindowRange,
    pub agg: WindowAggregate,
}

/// Counters kept with the state (so they survive restarts exactly).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MonitorCounters {
    pub results_applied: u64,
    pub feedback_applied: u64,
    pub dropped_late: u64,
    pub feedback_orphans: u64,
    /// Inputs the monitor could not use (undecodable, or an event time outside the limits),
    /// each dead-lettered to `litert.monitor.dlq.v1`.
    pub undecodable: u64,
    pub windows_closed: u64,
    pub alerts_emitted: u64,
    pub outbox_seq: u64,
    /// Results not applied because the same result (by `result_id`) was applied before: a
    /// redelivery by an at-least-once producer upstream.
    #[serde(default)]
    pub duplicates_ignored: u64,
    /// Feedback counted as orphan because `monitor.max_pending_feedback` were already waiting
    /// (also included in `feedback_orphans`).
    #[serde(default)]
    pub feedback_overflow: u64,
    /// Alert events published, by `CODE|STATUS` (e.g. `LITERT_HIGH_ERROR_RATE|FIRING`).
    #[serde(default)]
    pub alert_events: std::collections::BTreeMap<String, u64>,
}

impl MonitorCounters {
    /// Adds another closing partition's counters to these (the process's totals).
    pub fn add(&mut self, o: &MonitorCounters) {
        self.results_applied += o.results_applied;
        self.feedback_applied += o.feedback_applied;
        self.dropped_late += o.dropped_late;
        self.feedback_orphans += o.feedback_orphans;
        self.undecodable += o.undecodable;
        self.windows_closed += o.windows_closed;
        self.alerts_emitted += o.alerts_emitted;
        self.outbox_seq += o.outbox_seq;
        self.duplicates_ignored += o.duplicates_ignored;
        self.feedback_overflow += o.feedback_overflow;
        for (k, v) in &o.alert_events {
            *self.alert_events.entry(k.clone()).or_default() += v;
        }
    }
}

/// Default cap of feedback waiting for its prediction.
pub const DEFAULT_MAX_PENDING_FEEDBACK: usize = 100_000;

/// RocksDB key of a pending feedback: `given_at (16 hex digits, order-preserving) | document id`,
/// so the due ones are a prefix of the column family.
pub fn pending_key(given_at: i64, document_id: &str) -> Vec<u8> {
    time_key(given_at, document_id.as_bytes())
}

/// `time (16 lowercase hex digits, order-preserving: the sign bit flipped) | rest`: byte order is
/// time order over the whole `i64` range. Written digit by digit, without `format!`: the
/// predictions' expiry index builds one per result (`format!` was 1.8 % of the monitor's applying
/// thread in `perf`).
pub fn time_key(ms: i64, rest: &[u8]) -> Vec<u8> {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let v = (ms as u64) ^ 0x8000_0000_0000_0000;
    let mut k = Vec::with_capacity(17 + rest.len());
    k.extend((0..16).rev().map(|i| HEX[((v >> (i * 4)) & 0xf) as usize]));
    k.push(b'|');
    k.extend_from_slice(rest);
    k
}

/// What closing windows produced, in publication order.
#[derive(Debug, Clone)]
pub enum Emitted {
    Metrics(WindowMetrics),
    Alert(AlertEvent),
    Decision(RolloutDecision),
}

impl Emitted {
    /// Unique per message: used to recognise what was already published after a crash.
    pub fn event_id(&self) -> String {
        match self {
            Emitted::Metrics(m) => format!("metrics:{}", m.metrics_id),
            Emitted::Alert(a) => format!("alert:{}:{}", a.alert_id, a.status),
            Emitted::Decision(d) => format!("decision:{}", d.decision_id),
        }
    }
}

pub fn window_key(subject: &Subject, start_ms: i64) -> Vec<u8> {
    time_key(start_ms, subject.key().as_bytes())
}

/// Where result and feedback counts go: the monitor's open windows, or one batch's partial
/// aggregates ([`super::partial`]). Both count through [`add_result`] and [`add_feedback`], so a
/// window merged from partials equals the window counted directly.
pub(crate) trait WindowSink {
    /// The aggregate of `subject` in `range`, created empty when new. Takes the subject by value:
    /// this runs for every model of every result, and a key built once is not cloned again.
    fn window(&mut self, subject: Subject, range: WindowRange) -> &mut WindowAggregate;
}

impl WindowSink for MonitorState {
    fn window(&mut self, subject: Subject, range: WindowRange) -> &mut WindowAggregate {
        self.window_mut(subject, range)
    }
}

/// The classifier's prediction in `r`, kept to join the document's feedback.
pub(crate) fn prediction_of(r: &InferenceResult) -> Option<Prediction> {
    let c = r.outputs.iter().find(|o| o.model == CLASSIFIER)?;
    let subject = Subject { model: c.model.clone(), version: c.version.clone(), cohort: r.cohort.clone() };
    Some(Prediction { subject, label: c.label.clone(), event_ms: r.submitted_at, result_id: Some(r.result_id.clone()) })
}

/// Counts one admitted result into its window (each model's subject and the pipeline's).
pub(crate) fn add_result(sink: &mut impl WindowSink, r: &InferenceResult, range: WindowRange) {
    for o in &r.outputs {
        let subject = Subject { model: o.model.clone(), version: o.version.clone(), cohort: r.cohort.clone() };
        let a = sink.window(subject, range);
        a.count += 1;
        match o.error_code.as_deref() {
            Some(code) => {
                a.errors += 1;
                a.unavailable += (code == codes::MODEL_UNAVAILABLE) as u64;
            }
            None => {
                a.latency.record_ms(o.latency_ms);
                a.record_run(o.latency_ms, o.batch_size);
            }
        }
        if let Some(l) = o.load_ms {
            a.max_load_ms = a.max_load_ms.max(l);
        }
        if o.model == CLASSIFIER {
            if let (Some(truth), Some(label)) = (&r.true_format, &o.label) {
                a.score(truth, label);
            }
        }
    }
    let p = sink.window(Subject::pipeline(), range);
    p.count += 1;
    p.errors += r.error_code.is_some() as u64;
    p.gpu_results += crate::inference::runtime::is_gpu_provider(&r.provider) as u64;
    p.latency.record_ms(r.end_to_end_ms);
    if let Some(rss) = r.process_rss_bytes {
        p.max_rss_bytes = p.max_rss_bytes.max(rss.max(0) as u64);
    }
    if let Some(cpu) = r.process_cpu_percent {
        p.max_cpu_percent = p.max_cpu_percent.max(cpu);
        p.cpu_samples += 1;
    }
}

/// Counts one admitted feedback into its prediction's window.
pub(crate) fn add_feedback(sink: &mut impl WindowSink, f: &DocumentFeedback, pred: &Prediction, range: WindowRange) {
    let a = sink.window(pred.subject.clone(), range);
    if let Some(r) = f.rating {
        a.ratings += 1;
        a.ratings_positive += (r >= 4) as u64;
    }
    if let (Some(truth), Some(label)) = (&f.corrected_format, &pred.label) {
        a.score(truth, label);
    }
}

#[derive(Default)]
pub struct MonitorState {
    pub windows: BTreeMap<(i64, Subject), StoredWindow>,
    pub alerts: BTreeMap<String, AlertInstance>,
    pub watermark: WatermarkTracker,
    pub counters: MonitorCounters,
    /// Info events already announced (MODEL_UPDATE_AVAILABLE), by alert id.
    pub announced: BTreeSet<String>,
    /// Changed since the last write.
    pub dirty_windows: BTreeSet<(i64, Subject)>,
    pub closed_windows: Vec<(i64, Subject)>,
    pub dirty_alerts: BTreeSet<String>,
    pub new_predictions: BTreeMap<String, Prediction>,
    /// Feedback whose prediction was not seen yet, with its input partition, by (given_at,
    /// document id); resolved once the results topic is complete up to the feedback's time (then
    /// applied, or counted as orphan). Stored one key per entry (see [`pending_key`]).
    pub pending_feedback: BTreeMap<(i64, String), (String, DocumentFeedback)>,
    /// Pending entries added or removed since the last write.
    pub dirty_pending: BTreeSet<(i64, String)>,
    /// At most this many feedbacks wait for their prediction; more are counted as orphans at once
    /// (0: the default, [`DEFAULT_MAX_PENDING_FEEDBACK`]).
    pub max_pending_feedback: usize,
    /// The rollout controller (its decisions are evaluated as windows close).
    pub rollout: Controller,
    pub rollout_dirty: bool,
    /// A closing partition other than the pipeline's ([`super::shard`]): its pipeline windows are
    /// copies kept for the rollout's pipeline criteria; their metrics and alerts are published by
    /// the pipeline's partition only.
    pub pipeline_copy: bool,
}

impl MonitorState {
    fn window_mut(&mut self, subject: Subject, range: WindowRange) -> &mut WindowAggregate {
        let key = (range.start_ms, subject);
        if !self.dirty_windows.contains(&key) {
            self.dirty_windows.insert(key.clone());
        }
        &mut self
            .windows
            .entry(key)
            .or_insert_with_key(|(_, subject)| StoredWindow { subject: subject.clone(), range, agg: WindowAggregate::default() })
            .agg
    }

    /// Applies one inference result observed on `partition` at processing time `wall_ms`.
    pub fn apply_result(&mut self, r: &InferenceResult, partition: &str, wall_ms: i64, cfg: &WindowConfig) {
        let ts = r.submitted_at;
        self.watermark.observe(partition, ts, wall_ms);
        if let Some(p) = prediction_of(r) {
            self.new_predictions.insert(r.document_id.clone(), p);
        }
        if admit(ts, cfg.size_ms, self.watermark.current()) == Admission::TooLate {
            self.counters.dropped_late += 1;
            return;
        }
        self.counters.results_applied += 1;
        add_result(self, r, assign(ts, cfg.size_ms));
    }

    /// Takes feedback in: applied at once when its prediction is known, else kept pending.
    pub fn receive_feedback(&mut self, f: DocumentFeedback, prediction: Option<Prediction>, partition: &str, wall_ms: i64, cfg: &WindowConfig) {
        self.watermark.observe(partition, f.given_at, wall_ms);
        match prediction {
            Some(p) => self.apply_feedback(&f, p, cfg),
            None => {
                let key = (f.given_at, f.document_id.clone());
                let cap = if self.max_pending_feedback == 0 { DEFAULT_MAX_PENDING_FEEDBACK } else { self.max_pending_feedback };
                // the same feedback delivered twice waits once
                if !self.pending_feedback.contains_key(&key) && self.pending_feedback.len() >= cap {
                    self.counters.feedback_orphans += 1;
                    self.counters.feedback_overflow += 1;
                    return;
                }
                self.dirty_pending.insert(key.clone());
                self.pending_feedback.insert(key, (partition.to_string(), f));
            }
        }
    }

    /// Pending feedback the results are complete for (`results_frontier` ≥ its time), oldest first.
    pub fn due_feedback(&mut self, results_frontier: Option<i64>) -> Vec<DocumentFeedback> {
        let Some(fr) = results_frontier else { return vec![] };
        let mut due = Vec::new();
        while let Some(entry) = self.pending_feedback.first_entry() {
            if entry.key().0 > fr {
                break;
            }
            let (key, (_, f)) = entry.remove_entry();
            self.dirty_pending.insert(key);
            due.push(f);
        }
        due
    }

    /// Resolves due feedback: applied with its prediction, or counted as an orphan.
    pub fn resolve_feedback(&mut self, f: &DocumentFeedback, prediction: Option<Prediction>, cfg: &WindowConfig) {
        match prediction {
            Some(p) => self.apply_feedback(f, p, cfg),
            None => self.counters.feedback_orphans += 1,
        }
    }

    fn apply_feedback(&mut self, f: &DocumentFeedback, pred: Prediction, cfg: &WindowConfig) {
        if admit(f.given_at, cfg.size_ms, self.watermark.current()) == Admission::TooLate {
            self.counters.dropped_late += 1;
            return;
        }
        self.counters.feedback_applied += 1;
        add_feedback(self, f, &pred, assign(f.given_at, cfg.size_ms));
    }

    /// MODEL_UPDATE_AVAILABLE for each (model, served, candidate) not announced before.
    pub fn announce_updates(&mut self, updates: &[(String, String, String)], at_ms: i64) -> Vec<Emitted> {
        let mut out = Vec::new();
        for (model, served, candidate) in updates {
            let e = alert::update_available(model, served, candidate, at_ms);
            if self.announced.insert(e.alert_id.clone()) {
                self.counters.alerts_emitted += 1;
                out.push(Emitted::Alert(e));
            }
        }
        self.count_alert_events(&out);
        out
    }

    /// Closes every window the watermark has passed, in (end, subject) order, evaluating the alert
    /// rules on each and, once all subjects of a window range are closed, the rollout criteria.
    /// Returns what to publish.
    /// `resolve_silent_after`: window ranges without a window of a firing subject after which its
    /// alert resolves as "no data" (0: never).
    pub fn close_windows(&mut self, rules: &[AlertRule], resolve_silent_after: u32, rollout: &RolloutConfig, cfg: &WindowConfig, wall_ms: i64) -> Vec<Emitted> {
        let Some(wm) = self.watermark.advance(cfg, wall_ms) else { return vec![] };
        let due: Vec<(i64, Subject)> = self.windows.iter().filter(|(_, w)| w.range.end_ms <= wm).map(|(k, _)| k.clone()).collect();
        let mut out = Vec::new();
        // windows of one range (same start) are consecutive in `due`
        let mut group: Vec<StoredWindow> = Vec::new();
        let mut group_alerts: Vec<AlertEvent> = Vec::new();
        for (n, key) in due.iter().enumerate() {
            let Some(w) = self.windows.remove(key) else { continue };
            self.dirty_windows.remove(key);
            self.closed_windows.push(key.clone());
            if self.pipeline_copy && w.subject.is_pipeline() {
                let range = w.range;
                group.push(w);
                if due.get(n + 1).is_none_or(|next| next.0 != key.0) {
                    self.close_range(rules, resolve_silent_after, rollout, range, &mut group, &mut group_alerts, &mut out);
                }
                continue;
            }
            self.counters.windows_closed += 1;
            out.push(Emitted::Metrics(WindowMetrics::from_window(&w.subject, w.range, &w.agg, &self.counters)));
            for rule in rules.iter().filter(|r| r.applies_to(&w.subject)) {
                let wk = alert::instance_key(&rule.name, Severity::Warning, &w.subject);
                let ck = alert::instance_key(&rule.name, Severity::Critical, &w.subject);
                let mut wi = self.alerts.get(&wk).cloned().unwrap_or_default();
                let mut ci = self.alerts.get(&ck).cloned().unwrap_or_default();
                let events = alert::evaluate(rule, &w.subject, w.range, &w.agg, &mut wi, &mut ci);
                for (k, v) in [(wk, wi), (ck, ci)] {
                    if self.alerts.get(&k) != Some(&v) {
                        self.alerts.insert(k.clone(), v);
                        self.dirty_alerts.insert(k);
                    }
                }
                self.counters.alerts_emitted += events.len() as u64;
                group_alerts.extend(events.iter().cloned());
                out.extend(events.into_iter().map(Emitted::Alert));
            }
            let infos = alert::info_events(rules, &w.subject, w.range, &w.agg);
            self.counters.alerts_emitted += infos.len() as u64;
            out.extend(infos.into_iter().map(Emitted::Alert));
            let range = w.range;
            group.push(w);
            if due.get(n + 1).is_none_or(|next| next.0 != key.0) {
                self.close_range(rules, resolve_silent_after, rollout, range, &mut group, &mut group_alerts, &mut out);
            }
        }
        self.count_alert_events(&out);
        out
    }

    /// The end of one window range: silent alerts resolve, and the rollout sees the range's windows.
    #[allow(clippy::too_many_arguments)]
    fn close_range(&mut self, rules: &[AlertRule], resolve_silent_after: u32, rollout: &RolloutConfig, range: crate::window::WindowRange, group: &mut Vec<StoredWindow>, group_alerts: &mut Vec<AlertEvent>, out: &mut Vec<Emitted>) {
        let silent = self.resolve_silent_alerts(rules, group, range, resolve_silent_after);
        self.counters.alerts_emitted += silent.len() as u64;
        group_alerts.extend(silent.iter().cloned());
        out.extend(silent.into_iter().map(Emitted::Alert));
        let closed: Vec<(&Subject, &WindowAggregate)> = group.iter().map(|w| (&w.subject, &w.agg)).collect();
        let decisions = self.rollout.on_window(rollout, range, &closed, group_alerts);
        if !decisions.is_empty() || self.rollout.rollouts.values().any(|r| r.status.is_active()) {
            self.rollout_dirty = true;
        }
        out.extend(decisions.into_iter().map(Emitted::Decision));
        group.clear();
        group_alerts.clear();
    }

    /// `alert_events` by `CODE|STATUS` (what `/metrics` shows as alerts by code and state).
    fn count_alert_events(&mut self, emitted: &[Emitted]) {
        for e in emitted {
            if let Emitted::Alert(a) = e {
                *self.counters.alert_events.entry(format!("{}|{}", a.code, a.status)).or_default() += 1;
            }
        }
    }

    /// Firing alerts whose subject has no window in the range that just closed count one silent
    /// window; those silent long enough resolve with the reason "no data".
    fn resolve_silent_alerts(&mut self, rules: &[AlertRule], group: &[StoredWindow], range: crate::window::WindowRange, after: u32) -> Vec<AlertEvent> {
        let present: std::collections::BTreeSet<String> = group.iter().map(|w| w.subject.key()).collect();
        let firing: Vec<String> = self.alerts.iter().filter(|(_, i)| i.state == alert::InstanceState::Firing).map(|(k, _)| k.clone()).collect();
        let mut out = Vec::new();
        for key in firing {
            // instance keys are `rule|Severity|model/version/cohort`
            let mut parts = key.splitn(3, '|');
            let (Some(rule_name), Some(sev), Some(subject_key)) = (parts.next(), parts.next(), parts.next()) else { continue };
            if present.contains(subject_key) {
                continue;
            }
            let mut s = subject_key.splitn(3, '/');
            let (Some(model), Some(version), Some(cohort)) = (s.next(), s.next(), s.next()) else { continue };
            let subject = Subject { model: model.into(), version: version.into(), cohort: cohort.into() };
            let sev = if sev == "Critical" { Severity::Critical } else { Severity::Warning };
            let Some(rule) = rules.iter().find(|r| r.name == rule_name) else { continue };
            let Some(inst) = self.alerts.get_mut(&key) else { continue };
            if let Some(e) = alert::resolve_silent(rule, sev, &subject, range, inst, after) {
                out.push(e);
            }
            self.dirty_alerts.insert(key);
        }
        out
    }

    /// Applies an operator command; returns its decision (none for a command answered before).
    pub fn apply_command(&mut self, rollout: &RolloutConfig, serve: &std::collections::BTreeMap<String, String>, cmd: &crate::rollout::RolloutCommand) -> Option<Emitted> {
        if self.rollout.answered(&cmd.command_id) {
            tracing::info!(command = %cmd.command_id, rollout = %cmd.rollout_id, "rollout command answered before; skipped");
            return None;
        }
        self.rollout_dirty = true;
        Some(Emitted::Decision(self.rollout.apply_command(rollout, serve, cmd)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: WindowConfig = WindowConfig { size_ms: 10_000, allowed_lateness_ms: 0, idle_timeout_ms: 3_000 };

    fn fb(doc: &str, at: i64) -> DocumentFeedback {
        DocumentFeedback { document_id: doc.into(), user_id: "u".into(), given_at: at, corrected_format: None, corrected_net_pay: None, rating: Some(5) }
    }

    #[test]
    fn pending_feedback_is_capped_deduplicated_and_released_oldest_first() {
        let mut st = MonitorState { max_pending_feedback: 3, ..Default::default() };
        for (doc, at) in [("c", 300), ("a", 100), ("b", 200), ("a", 100), ("d", 400)] {
            st.receive_feedback(fb(doc, at), None, "fb/0", 0, &CFG);
        }
        // "a" twice waits once; "d" finds the three places taken
        assert_eq!(st.pending_feedback.len(), 3);
        assert_eq!((st.counters.feedback_orphans, st.counters.feedback_overflow), (1, 1));
        assert_eq!(st.dirty_pending.len(), 3);
        st.dirty_pending.clear();
        let due: Vec<String> = st.due_feedback(Some(250)).into_iter().map(|f| f.document_id).collect();
        assert_eq!(due, vec!["a", "b"]);
        assert_eq!(st.dirty_pending.iter().map(|(_, d)| d.as_str()).collect::<Vec<_>>(), vec!["a", "b"], "both deleted with the next write");
        assert!(st.due_feedback(None).is_empty());
        assert_eq!(st.pending_feedback.len(), 1);
    }

    #[test]
    fn time_keys_are_the_formatted_keys_they_replace() {
        // the keys are stored (and in the changelog): the same bytes as the `format!` before
        let mut times = vec![i64::MIN, i64::MIN + 1, -1_700_000_000_000, -1, 0, 1, 15, 16, 1_700_000_000_000, i64::MAX - 1, i64::MAX];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..1000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            times.push(x as i64);
        }
        for t in times {
            for rest in ["", "doc-1", "pipeline/-/all"] {
                assert_eq!(time_key(t, rest.as_bytes()), format!("{:016x}|{rest}", (t as u64) ^ 0x8000_0000_0000_0000).into_bytes(), "{t} {rest}");
            }
        }
    }

    #[test]
    fn pending_keys_sort_by_time_over_the_whole_range() {
        let times = [i64::MIN, -1, 0, 1, 1_700_000_000_000, i64::MAX];
        let keys: Vec<Vec<u8>> = times.iter().map(|t| pending_key(*t, "x")).collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
    }
}
