//! Partial window aggregates: what a pre-aggregation member ([`super::pre`]) makes of one batch of
//! one input partition, and how the closing stage merges it into its windows.
//!
//! Every field of a [`WindowAggregate`] is mergeable (counts add, maxima take the maximum, HDR
//! histograms add bucket by bucket), so a window merged from any split of its inputs into partials
//! holds the same counts and the same histogram as the window counted result by result; the
//! results go through the same [`add_result`] / [`add_feedback`] either way. Lateness is decided
//! where the windows close: a partial window whose range the watermark has passed is counted as
//! dropped (its results and feedback), exactly as each of its inputs would have been.
//!
//! A partial carries the highest event time its partition delivered, which the closing stage feeds
//! to its watermark under the input partition's own name (`topic/partition`): the watermark is the
//! same function of the same per-partition clocks as when one process reads every partition.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::state::{add_feedback, add_result, MonitorState, Prediction, WindowSink};
use crate::{
    document::{DocumentFeedback, InferenceResult},
    window::{
        admit,
        aggregate::{Subject, WindowAggregate},
        assign, Admission, WindowConfig, WindowRange,
    },
};

/// What one pre-aggregation batch made of one input partition (the value on the partials topic).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PartialBatch {
    /// The input partition, `topic/partition`.
    pub source: String,
    /// The highest event time applied from it in this batch (the watermark's input).
    pub max_event_ms: Option<i64>,
    pub windows: Vec<PartialWindow>,
    /// Results recognised as redeliveries of a result applied before.
    pub duplicates: u64,
    /// Feedback without a prediction once the results were complete up to its time.
    pub orphans: u64,
    /// Of those, feedback counted as orphan because `monitor.max_pending_feedback` were waiting.
    pub overflow: u64,
    /// Inputs sent to the monitor's dead-letter topic.
    pub dead_lettered: u64,
    /// The member that aggregated it (instance id), for diagnostics.
    pub member: String,
    /// The member had read all it could fetch of the partition when it sent this: the partition
    /// may go idle. Partitions whose owner does not say so (a member that died, one still
    /// restoring, no member yet) hold the watermark at their clock, so a failover in the group
    /// does not make their results late.
    #[serde(default)]
    pub caught_up: bool,
}

/// One window's share of a batch.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PartialWindow {
    pub start_ms: i64,
    /// Results and feedback counted into it (what counts as applied, or as dropped when late).
    pub results: u64,
    pub feedback: u64,
    pub subjects: Vec<(Subject, WindowAggregate)>,
}

#[derive(Default)]
struct Subjects(BTreeMap<Subject, WindowAggregate>);

impl WindowSink for Subjects {
    fn window(&mut self, subject: Subject, _range: WindowRange) -> &mut WindowAggregate {
        self.0.entry(subject).or_default()
    }
}

#[derive(Default)]
struct Source {
    max_event_ms: Option<i64>,
    windows: BTreeMap<i64, (u64, u64, Subjects)>,
    duplicates: u64,
    orphans: u64,
    overflow: u64,
    dead_lettered: u64,
}

impl Source {
    fn seen(&mut self, ts: i64) {
        self.max_event_ms = Some(self.max_event_ms.map_or(ts, |m| m.max(ts)));
    }
}

/// Collects one batch's partials, per input partition.
#[derive(Default)]
pub struct PartialBuilder {
    size_ms: i64,
    sources: BTreeMap<String, Source>,
}

impl PartialBuilder {
    pub fn new(size_ms: i64) -> Self {
        Self { size_ms, sources: BTreeMap::new() }
    }

    fn source(&mut self, source: &str) -> &mut Source {
        self.sources.entry(source.to_string()).or_default()
    }

    /// Counts a result (not a redelivery) read from `source`.
    pub fn result(&mut self, source: &str, r: &InferenceResult) {
        let range = assign(r.submitted_at, self.size_ms);
        let s = self.source(source);
        s.seen(r.submitted_at);
        let w = s.windows.entry(range.start_ms).or_default();
        w.0 += 1;
        add_result(&mut w.2, r, range);
    }

    /// Counts a feedback joined with its prediction.
    pub fn feedback(&mut self, source: &str, f: &DocumentFeedback, pred: &Prediction) {
        let range = assign(f.given_at, self.size_ms);
        let s = self.source(source);
        s.seen(f.given_at);
        let w = s.windows.entry(range.start_ms).or_default();
        w.1 += 1;
        add_feedback(&mut w.2, f, pred, range);
    }

    /// A feedback read from `source` whose prediction is not known: it still moves the clock.
    pub fn orphan(&mut self, source: &str, given_at: i64, overflow: bool) {
        let s = self.source(source);
        s.seen(given_at);
        s.orphans += 1;
        s.overflow += overflow as u64;
    }

    pub fn duplicate(&mut self, source: &str, ts: i64) {
        let s = self.source(source);
        s.seen(ts);
        s.duplicates += 1;
    }

    pub fn dead_letter(&mut self, source: &str) {
        self.source(source).dead_lettered += 1;
    }

    /// A partial for `source` even without input: the member's report that it owns the partition
    /// (and, with `caught_up`, that it has read what it could fetch).
    pub fn heartbeat(&mut self, source: &str) {
        self.source(source);
    }

    pub fn is_empty(&self) -> bool {
        self.sources.is_empty()
    }

    /// The batch's partials, one per input partition that contributed; `caught_up(source)` is the
    /// member's report for each.
    pub fn finish(self, member: &str, caught_up: impl Fn(&str) -> bool) -> Vec<PartialBatch> {
        self.sources
            .into_iter()
            .map(|(source, s)| PartialBatch {
                caught_up: caught_up(&source),
                source,
                max_event_ms: s.max_event_ms,
                windows: s.windows.into_iter().map(|(start_ms, (results, feedback, subj))| PartialWindow { start_ms, results, feedback, subjects: subj.0.into_iter().collect() }).collect(),
                duplicates: s.duplicates,
                orphans: s.orphans,
                overflow: s.overflow,
                dead_lettered: s.dead_lettered,
                member: member.to_string(),
            })
            .collect()
    }
}

impl MonitorState {
    /// Merges a partial into the open windows: each of its windows is admitted (or counted as
    /// dropped) against the watermark as it stands, then its partition's clock moves.
    pub fn apply_partial(&mut self, p: &PartialBatch, wall_ms: i64, cfg: &WindowConfig) {
        for w in &p.windows {
            if admit(w.start_ms, cfg.size_ms, self.watermark.current()) == Admission::TooLate {
                self.counters.dropped_late += w.results + w.feedback;
                continue;
            }
            self.counters.results_applied += w.results;
            self.counters.feedback_applied += w.feedback;
            let range = assign(w.start_ms, cfg.size_ms);
            for (subject, agg) in &w.subjects {
                self.window(subject.clone(), range).merge(agg);
            }
        }
        if let Some(ts) = p.max_event_ms {
            self.watermark.observe(&p.source, ts, wall_ms);
        }
        let c = &mut self.counters;
        c.duplicates_ignored += p.duplicates;
        c.feedback_orphans += p.orphans;
        c.feedback_overflow += p.overflow;
        c.undecodable += p.dead_lettered;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        document::ModelOutput,
        monitor::records::WindowMetrics,
        window::WatermarkTracker,
    };

    const CFG: WindowConfig = WindowConfig { size_ms: 10_000, allowed_lateness_ms: 0, idle_timeout_ms: 60_000 };

    fn result(n: i64) -> InferenceResult {
        let out = |model: &str, lat: f64, err: bool| ModelOutput {
            model: model.into(),
            version: "1.0.0".into(),
            provider: "cpu".into(),
            latency_ms: lat,
            batch_size: 1 + (n % 4) as i32,
            error_code: err.then(|| "INFERENCE_FAILED".into()),
            label: (model == crate::inference::CLASSIFIER).then(|| if n % 3 == 0 { "PCDA".into() } else { "SIMPLE".into() }),
            confidence: None,
            regions: vec![],
            lines: vec![],
            load_ms: None,
        };
        InferenceResult {
            result_id: format!("r{n}"),
            document_id: format!("d{n}"),
            user_id: "u".into(),
            tenant: "t".into(),
            cohort: if n % 5 == 0 { "canary".into() } else { "baseline".into() },
            submitted_at: 1_000 * n,
            processed_at: 1_000 * n,
            provider: "cpu".into(),
            model_versions: Default::default(),
            outputs: vec![out("table_detector", 1.0 + (n % 7) as f64, n % 11 == 0), out(crate::inference::CLASSIFIER, 0.5 + (n % 5) as f64, false)],
            inference_ms: 1.0,
            end_to_end_ms: 3.0 + (n % 17) as f64,
            error_code: None,
            true_format: Some("PCDA".into()),
            source: "test".into(),
            process_rss_bytes: Some(1_000_000 + n),
            process_cpu_percent: None,
        }
    }

    /// Every window of `st`, closed.
    fn closed(st: &mut MonitorState) -> Vec<WindowMetrics> {
        st.watermark = WatermarkTracker::default();
        st.watermark.observe("end", i64::MAX / 2, 0);
        st.close_windows(&[], 0, &Default::default(), &CFG, 0)
            .into_iter()
            .filter_map(|e| match e {
                super::super::state::Emitted::Metrics(mut m) => {
                    m.emitted_at = 0;
                    Some(m)
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn windows_merged_from_partials_of_any_split_equal_windows_counted_one_by_one() {
        let results: Vec<InferenceResult> = (0..200).map(result).collect();
        let mut direct = MonitorState::default();
        for r in &results {
            direct.apply_result(r, "inference/0", 0, &CFG);
        }
        for split in [1usize, 7, 64] {
            let mut merged = MonitorState::default();
            for (n, chunk) in results.chunks(split).enumerate() {
                let mut b = PartialBuilder::new(CFG.size_ms);
                for r in chunk {
                    b.result(&format!("inference/{}", n % 3), r);
                }
                for p in b.finish("m", |_| true) {
                    merged.apply_partial(&p, 0, &CFG);
                }
            }
            assert_eq!(merged.counters.results_applied, 200);
            let mut d = MonitorState { windows: direct.windows.clone(), ..Default::default() };
            let expected = closed(&mut d);
            // 20 windows, each with the pipeline and four model subjects (two models, two cohorts)
            assert_eq!(expected.len(), 100);
            assert_eq!(closed(&mut merged), expected, "split {split}");
        }
    }

    #[test]
    fn a_partial_window_the_watermark_passed_counts_its_results_and_feedback_as_dropped() {
        let mut st = MonitorState { watermark: WatermarkTracker::default(), ..Default::default() };
        st.watermark.observe("inference/1", 50_000, 0);
        st.watermark.advance(&CFG, 0);
        let mut b = PartialBuilder::new(CFG.size_ms);
        b.result("inference/0", &result(5));
        b.result("inference/0", &result(55));
        let pred = super::super::state::prediction_of(&result(5)).unwrap();
        b.feedback("inference/0", &DocumentFeedback { document_id: "d5".into(), user_id: "u".into(), given_at: 6_000, corrected_format: None, corrected_net_pay: None, rating: Some(5) }, &pred);
        for p in b.finish("m", |_| true) {
            st.apply_partial(&p, 0, &CFG);
        }
        assert_eq!((st.counters.dropped_late, st.counters.results_applied, st.counters.feedback_applied), (2, 1, 0));
    }
}
