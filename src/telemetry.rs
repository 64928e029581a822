//! Tracing set-up and the infer stage's counters.
//!
//! Counters are monotonic and named `<namespace>_<name>_<unit>_total` as they will appear on the
//! Prometheus endpoint; every dropped, rejected or dead-lettered document is counted here.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
};

/// Installs the global tracing subscriber: `RUST_LOG` filter (default `info`), JSON when
/// `PAYSLIP_LOG_FORMAT=json`. Colours only on a terminal (and not with `NO_COLOR`): a log written
/// to a file, a pipe or journald stays plain text.
pub fn init_tracing() {
    use tracing_subscriber::{fmt, EnvFilter};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,rdkafka=warn,ort=warn"));
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none();
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).with_ansi(colour);
    let _ = if std::env::var("PAYSLIP_LOG_FORMAT").as_deref() == Ok("json") { builder.json().try_init() } else { builder.try_init() };
}

/// Counters of the infer stage.
#[derive(Default, Debug)]
pub struct InferCounters {
    /// payslip_infer_documents_consumed_total
    pub consumed: AtomicU64,
    /// payslip_infer_results_produced_total
    pub results: AtomicU64,
    /// payslip_infer_results_with_error_total (a result whose error_code is set)
    pub results_with_error: AtomicU64,
    /// payslip_infer_dead_letters_total{class}
    pub dead_letters: Mutex<BTreeMap<&'static str, u64>>,
    /// payslip_infer_batches_total
    pub batches: AtomicU64,
    /// payslip_infer_offsets_stored_total (exactly once: batches committed with their offsets)
    pub offsets_stored: AtomicU64,
    /// payslip_infer_transactions_aborted_total (exactly once: batches rolled back and read again)
    pub transactions_aborted: AtomicU64,
    /// payslip_infer_transactions_committed_total (exactly once: one per batch, or one per commit
    /// interval while the stage is busy)
    pub transactions_committed: AtomicU64,
    /// Memory and CPU of this process, read once per batch, from `/proc` at most every
    /// [`SAMPLE_INTERVAL`].
    pub process: ProcessSampler,
    /// Model time of answered documents, microseconds (sum over each document's model outputs).
    pub inference_us: AtomicU64,
    /// Documents that went through the models (the denominator of `inference_us`).
    pub inferred_documents: AtomicU64,
    /// Messages between the infer consumer's position and the end of each assigned documents
    /// partition (the last stable offset under read_committed), refreshed every 5 s.
    pub consumer_lag: Mutex<BTreeMap<i32, i64>>,
    /// librdkafka's latest statistics of the infer producer (every 5 s).
    pub producer_stats: crate::kafka::stats::StatsCell,
    /// Records queued in the producer, not yet delivered (after the latest batch).
    pub producer_queue: AtomicU64,
    /// Batches waiting for their delivery reports (at least once; at most 8).
    pub ack_queue: AtomicU64,
    /// Set once the stage is ready for documents (served models loaded, the decisions topic read,
    /// transactions initialised, subscribed); cleared when it stops.
    pub ready: std::sync::atomic::AtomicBool,
    /// payslip_infer_loop_seconds_total{phase}: where the stage's batch loop spent its time,
    /// microseconds per [`LoopPhase`] (what holds a stage that is neither CPU- nor input-bound).
    pub loop_us: [AtomicU64; LoopPhase::ALL.len()],
}

/// A phase of the infer stage's batch loop (one task; the models run beside it on other threads).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoopPhase {
    /// Waiting for documents and collecting the next batch (also while a batch runs its models).
    Collect,
    /// Waiting for the oldest batch's models to finish before it can be published.
    Models,
    /// Queueing a batch's results and dead letters in the producer.
    Send,
    /// Exactly once: sending the transaction's input offsets (AddOffsetsToTxn, TxnOffsetCommit).
    CommitOffsets,
    /// Exactly once: waiting for the transaction's delivery reports.
    CommitDeliveries,
    /// Exactly once: EndTxn (`commit_transaction`).
    CommitEnd,
}

impl LoopPhase {
    pub const ALL: [LoopPhase; 6] = [LoopPhase::Collect, LoopPhase::Models, LoopPhase::Send, LoopPhase::CommitOffsets, LoopPhase::CommitDeliveries, LoopPhase::CommitEnd];

    pub fn label(self) -> &'static str {
        match self {
            LoopPhase::Collect => "collect",
            LoopPhase::Models => "models",
            LoopPhase::Send => "send",
            LoopPhase::CommitOffsets => "commit_offsets",
            LoopPhase::CommitDeliveries => "commit_deliveries",
            LoopPhase::CommitEnd => "commit_end",
        }
    }
}

/// Resident memory and CPU use of this process, from `/proc/self` (None elsewhere).
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessSample {
    /// The highest resident memory since the previous sample taken from `/proc` (the kernel's
    /// high-water mark, reset at each such sample), so a batch that peaked between two samples is
    /// reported at its peak; where the mark cannot be reset, the resident memory then. Within
    /// [`SAMPLE_INTERVAL`] of that sample, the same figure again.
    pub rss_bytes: Option<u64>,
    /// The share of one core used since the previous CPU reading, at most one per
    /// [`SAMPLE_INTERVAL`]; None for the samples in between.
    pub cpu_percent: Option<f64>,
}

/// How often [`ProcessSampler`] reads `/proc`. One reading costs about 0.2 ms in the infer stage:
/// the kernel sums the times of every thread (ONNX Runtime's, librdkafka's, tokio's) for
/// `/proc/self/stat`, and resetting the memory high-water mark walks the page tables. Once per
/// batch that was 1.3 % of the stage's CPU draining a backlog and more at moderate load, where
/// batches are small (BENCHMARKS.md, "Who is busy at half load"). Batches closer together than
/// this share a reading. The CPU figure needs at least 50 ms between readings anyway (the clock
/// ticks are 10 ms).
pub const SAMPLE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// Samples `/proc/self` at most every `min_interval` ([`SAMPLE_INTERVAL`] by default); CPU is the
/// share of one core used since the previous CPU reading.
#[derive(Debug)]
pub struct ProcessSampler {
    min_interval: std::time::Duration,
    state: Mutex<SamplerState>,
}

#[derive(Debug, Default)]
struct SamplerState {
    /// When `/proc` was last read, and the memory figure it gave.
    taken: Option<(std::time::Instant, Option<u64>)>,
    /// The CPU baseline: when and at how many clock ticks CPU was last measured from.
    cpu_base: Option<(std::time::Instant, u64)>,
}

impl Default for ProcessSampler {
    fn default() -> Self {
        Self::with_interval(SAMPLE_INTERVAL)
    }
}

pub(crate) fn clock_ticks_of_self() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // fields after the parenthesised command name; utime and stime are fields 14 and 15
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

pub(crate) fn rss_bytes_of_self() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// The peak resident memory since the last reset (`VmHWM`), and resets it to the current one
/// (`/proc/self/clear_refs` ← 5, Linux 4.0+). None when either step is not possible here.
fn peak_rss_bytes_since_last() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: u64 = status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?.split_whitespace().next()?.parse().ok()?;
    std::fs::write("/proc/self/clear_refs", "5").ok()?;
    Some(kib * 1024)
}

impl ProcessSampler {
    /// A sampler that reads `/proc` at most every `min_interval` (zero: at every sample).
    pub fn with_interval(min_interval: std::time::Duration) -> Self {
        Self { min_interval, state: Mutex::new(SamplerState::default()) }
    }

    pub fn sample(&self) -> ProcessSample {
        let now = std::time::Instant::now();
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, rss_bytes)) = st.taken {
            if now.duration_since(at) < self.min_interval {
                return ProcessSample { rss_bytes, cpu_percent: None };
            }
        }
        let ticks = clock_ticks_of_self();
        let cpu_percent = match (st.cpu_base, ticks) {
            (Some((t0, k0)), Some(k1)) if now.duration_since(t0).as_secs_f64() > 0.05 => {
                // Linux reports 100 ticks per second (USER_HZ) on every architecture we run on
                Some((k1.saturating_sub(k0)) as f64 / 100.0 / now.duration_since(t0).as_secs_f64() * 100.0)
            }
            _ => None,
        };
        if let Some(k) = ticks {
            if st.cpu_base.is_none() || cpu_percent.is_some() {
                st.cpu_base = Some((now, k));
            }
        }
        let rss_bytes = peak_rss_bytes_since_last().or_else(rss_bytes_of_self);
        st.taken = Some((now, rss_bytes));
        ProcessSample { rss_bytes, cpu_percent }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_memory_sample_is_the_peak_since_the_previous_one() {
        let sampler = ProcessSampler::with_interval(std::time::Duration::ZERO);
        let before = sampler.sample().rss_bytes;
        if peak_rss_bytes_since_last().is_none() {
            return; // no /proc or no clear_refs here: the current RSS is reported instead
        }
        // 64 MiB touched and freed between two samples
        let big = vec![1u8; 64 << 20];
        std::hint::black_box(&big);
        drop(big);
        let peak = sampler.sample().rss_bytes.unwrap();
        assert!(peak >= before.unwrap_or(0) + (60 << 20) || peak >= 64 << 20, "peak {peak} after a 64 MiB buffer");
        let after = sampler.sample().rss_bytes.unwrap();
        assert!(after < peak, "the mark was reset: {after} < {peak}");
    }

    #[test]
    fn samples_within_the_interval_repeat_the_last_reading() {
        let sampler = ProcessSampler::with_interval(std::time::Duration::from_secs(3600));
        let first = sampler.sample();
        if first.rss_bytes.is_none() {
            return; // no /proc here
        }
        // 64 MiB touched and freed: not read again within the hour, so not reported yet
        let big = vec![1u8; 64 << 20];
        std::hint::black_box(&big);
        drop(big);
        let second = sampler.sample();
        assert_eq!(second.rss_bytes, first.rss_bytes);
        assert_eq!(second.cpu_percent, None);
    }

    #[test]
    fn a_reading_after_the_interval_measures_cpu_since_the_previous_one() {
        let sampler = ProcessSampler::with_interval(std::time::Duration::from_millis(60));
        if sampler.sample().rss_bytes.is_none() {
            return; // no /proc here
        }
        // work until a reading is due again and the process's clock ticks have moved on
        let (started, ticks) = (std::time::Instant::now(), clock_ticks_of_self().expect("ticks"));
        let mut x = 0u64;
        while started.elapsed() < std::time::Duration::from_millis(70) || clock_ticks_of_self().expect("ticks") <= ticks {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let cpu = sampler.sample().cpu_percent.expect("a CPU reading after the interval");
        assert!(cpu > 0.0, "spinning used CPU: {cpu}");
    }
}

impl InferCounters {
    /// Adds the time since `since` to `phase` and returns now (the next phase's start).
    pub fn phase(&self, phase: LoopPhase, since: std::time::Instant) -> std::time::Instant {
        let now = std::time::Instant::now();
        self.loop_us[phase as usize].fetch_add(now.duration_since(since).as_micros() as u64, Ordering::Relaxed);
        now
    }

    /// Seconds spent in each loop phase so far.
    pub fn loop_seconds(&self) -> Vec<(&'static str, f64)> {
        LoopPhase::ALL.iter().map(|&p| (p.label(), self.loop_us[p as usize].load(Ordering::Relaxed) as f64 / 1e6)).collect()
    }

    pub fn dead_letter(&self, class: &'static str) {
        *self.dead_letters.lock().unwrap_or_else(|p| p.into_inner()).entry(class).or_default() += 1;
    }

    pub fn snapshot(&self) -> InferSummary {
        let dl = self.dead_letters.lock().unwrap_or_else(|p| p.into_inner()).clone();
        InferSummary {
            consumed: self.consumed.load(Ordering::Relaxed),
            results: self.results.load(Ordering::Relaxed),
            results_with_error: self.results_with_error.load(Ordering::Relaxed),
            dead_letters: dl.values().sum(),
            dead_letters_by_class: dl.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            batches: self.batches.load(Ordering::Relaxed),
            transactions_aborted: self.transactions_aborted.load(Ordering::Relaxed),
            transactions_committed: self.transactions_committed.load(Ordering::Relaxed),
        }
    }
}

/// What a stage did, printed at shutdown.
#[derive(Debug, Clone, Default, serde::Serialize, PartialEq, Eq)]
pub struct InferSummary {
    pub consumed: u64,
    pub results: u64,
    pub results_with_error: u64,
    pub dead_letters: u64,
    pub dead_letters_by_class: BTreeMap<String, u64>,
    pub batches: u64,
    /// Exactly once: transactions aborted (their batches were read again).
    pub transactions_aborted: u64,
    /// Exactly once: transactions committed (fewer than batches when a busy stage commits the
    /// batches of a `kafka.commit_interval_ms` together).
    pub transactions_committed: u64,
}
