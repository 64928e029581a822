//! Closing partitions: how the monitor's closing stage (windows, alerts, rollouts) is split over
//! the monitor processes of a deployment.
//!
//! ```text
//!  pre-aggregation members ──► litert.monitor.partials.v1 ──► partition p ──► closing stage p ──► metrics, alerts,
//!  (src/monitor/pre.rs)         keyed by model; the pipeline   (owned by one     (its RocksDB, its     decisions
//!                               subject copied to every p      process)          changelog partition)
//! ```
//!
//! `monitor.closing_partitions` (K) fixes how many partitions the closing stage has: the partials
//! topic and the changelog topic both have K partitions. Partition p closes the windows of the
//! models whose name hashes to p ([`shard_of`]), evaluates their alerts and runs their rollouts; the
//! pipeline subject belongs to [`pipeline_partition`] and is also copied to every other partition,
//! where it only feeds the rollout's pipeline criteria (memory, CPU) and publishes nothing. Each
//! partition has its own RocksDB (`monitor.state_dir` for partition 0, `<state_dir>-partition-<p>`
//! for the others), its own changelog partition and its own transactional id, so its state and its
//! exactly-once outputs move with it.
//!
//! Ownership: every monitor process is one member of the consumer group `<changelog>.leader`
//! subscribed to the changelog topic (cooperative-sticky, static membership when
//! `kafka.instance_id` is set). The partitions a member is assigned are the closing partitions it
//! runs, one thread each ([`super::MonitorStage`]); the others it keeps as warm copies
//! (`monitor.standby_replicas` ≥ 1) by tailing their changelog partitions. A partition taken away
//! stops its thread; the new owner's `init_transactions` fences the old one in any case. With
//! K = 1 this is the single-leader design: one process leads, the others are warm standbys.
//!
//! Commands are routed by their rollout's key, the model (the `model` the command names, else the
//! served model its rollout id starts with, else the configured candidate's): every partition reads
//! the commands topic and applies only the commands routed to it.
//!
//! Delivery: as for one partition (see [`super`]); each partition's outputs carry event ids that
//! no other partition produces (metrics and alerts per subject, decisions per rollout).

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use rdkafka::consumer::{BaseConsumer, Consumer};

use super::{
    changelog::{Changelog, Tail},
    partial::PartialBatch,
    state::MonitorCounters,
    view::ViewHandle,
    MonitorError, MonitorStage, MonitorSummary,
};
use crate::{
    config::PipelineConfig,
    kafka::{self, rebalance::KnownProtocol, KafkaError},
    state::RocksStateStore,
    window::aggregate::{Subject, PIPELINE},
};

/// The closing partition of `key` among `partitions` (FNV-1a: stable across processes, versions
/// and platforms, unlike std's hasher).
pub fn shard_of(key: &str, partitions: u32) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in key.bytes() {
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    h % partitions.max(1)
}

/// The partition that publishes the pipeline subject's windows and alerts.
pub fn pipeline_partition(partitions: u32) -> u32 {
    shard_of(PIPELINE, partitions)
}

/// The partition that closes `subject`'s windows.
pub fn subject_partition(subject: &Subject, partitions: u32) -> u32 {
    shard_of(&subject.model, partitions)
}

/// The model a rollout command is about: the one it names, else the served model its rollout id
/// starts with (`<model>-<version>`, the longest such name), else the configured candidate's when
/// the id is its rollout id.
pub fn command_model(cfg: &PipelineConfig, cmd: &crate::rollout::RolloutCommand) -> Option<String> {
    if let Some(m) = cmd.model.as_ref().filter(|m| !m.is_empty()) {
        return Some(m.clone());
    }
    let by_prefix = cfg.models.serve.keys().filter(|m| cmd.rollout_id.starts_with(&format!("{m}-"))).max_by_key(|m| m.len());
    if let Some(m) = by_prefix {
        return Some(m.clone());
    }
    cfg.rollout.candidate.as_ref().filter(|c| c.rollout_id() == cmd.rollout_id).map(|c| c.model.clone())
}

/// The partition that answers a rollout command: its model's, or, when no model can be told, the
/// rollout id's own (which then answers that no such rollout exists, or applies it if it holds it).
pub fn command_partition(cfg: &PipelineConfig, cmd: &crate::rollout::RolloutCommand) -> u32 {
    let k = cfg.monitor.closing_partitions;
    match command_model(cfg, cmd) {
        Some(m) => shard_of(&m, k),
        None => shard_of(&cmd.rollout_id, k),
    }
}

/// Splits one pre-aggregation partial into one per closing partition: each gets its models'
/// subjects and a copy of the pipeline subject; the counts that are not per subject (results and
/// feedback per window, redeliveries, orphans, dead letters) go to the pipeline's partition only,
/// so they are counted once. Every partition gets the source's clock and its `caught_up` report,
/// so each one's watermark is the same function of the same per-partition clocks.
pub fn split(p: PartialBatch, partitions: u32) -> Vec<(u32, PartialBatch)> {
    if partitions <= 1 {
        return vec![(0, p)];
    }
    let home = pipeline_partition(partitions);
    (0..partitions)
        .map(|k| {
            let windows = p
                .windows
                .iter()
                .filter_map(|w| {
                    let subjects: Vec<_> = w.subjects.iter().filter(|(s, _)| s.is_pipeline() || subject_partition(s, partitions) == k).cloned().collect();
                    let (results, feedback) = if k == home { (w.results, w.feedback) } else { (0, 0) };
                    (!subjects.is_empty() || results + feedback > 0).then(|| super::partial::PartialWindow { start_ms: w.start_ms, results, feedback, subjects })
                })
                .collect();
            let own = k == home;
            let part = PartialBatch {
                source: p.source.clone(),
                max_event_ms: p.max_event_ms,
                windows,
                duplicates: if own { p.duplicates } else { 0 },
                orphans: if own { p.orphans } else { 0 },
                overflow: if own { p.overflow } else { 0 },
                dead_lettered: if own { p.dead_lettered } else { 0 },
                member: p.member.clone(),
                caught_up: p.caught_up,
            };
            (k, part)
        })
        .collect()
}

/// The state directory of closing partition `p`.
pub fn state_dir(cfg: &PipelineConfig, p: u32) -> std::path::PathBuf {
    if p == 0 {
        cfg.monitor.state_dir.clone()
    } else {
        let mut d = cfg.monitor.state_dir.clone().into_os_string();
        d.push(format!("-partition-{p}"));
        d.into()
    }
}

/// Checks that the changelog topic (and, scaled out, the partials topic) has exactly
/// `monitor.closing_partitions` partitions: a different count would send a model's partials and
/// its state to different partitions.
fn check_partitions(cfg: &PipelineConfig, brokers: &str) -> Result<(), MonitorError> {
    let c: BaseConsumer = kafka::client_config(brokers, &cfg.kafka.librdkafka).create().map_err(KafkaError::client("the monitor's metadata client"))?;
    let k = cfg.monitor.closing_partitions as usize;
    let mut topics = vec![cfg.topics.monitor_changelog.clone()];
    if cfg.monitor.scale_out {
        topics.push(cfg.topics.monitor_partials.clone());
    }
    for t in topics {
        let n = kafka::partitions_of(&c, &t, Duration::from_secs(30))?.len();
        if n != k {
            return Err(MonitorError::ClosingPartitions { topic: t, partitions: n, configured: k });
        }
    }
    Ok(())
}

/// A closing partition run by this process.
struct Owned {
    owned: Arc<AtomicBool>,
    handle: JoinHandle<Result<MonitorSummary, MonitorError>>,
}

/// A closing partition this process keeps a warm copy of.
struct WarmCopy {
    changelog: Changelog,
    tail: Tail,
    store: RocksStateStore,
}

/// Opens the warm copy of partition `p`: its store, tailing its changelog partition.
fn open_copy(cfg: &PipelineConfig, brokers: &str, p: u32, view: &ViewHandle) -> Result<WarmCopy, MonitorError> {
    let dir = state_dir(cfg, p);
    std::fs::create_dir_all(&dir).map_err(|e| crate::state::StateError::Rocks { path: dir.display().to_string(), message: e.to_string() })?;
    let store = RocksStateStore::open(&dir)?;
    let changelog = Changelog::new(cfg, p as i32, view.changelog_cell());
    let tail = changelog.open_tail(cfg, brokers, &store)?;
    Ok(WarmCopy { changelog, tail, store })
}

/// Runs this process's share of the closing stage until `stop`: joins the group that shares the
/// closing partitions out, runs the ones it is assigned and keeps warm copies of the others.
/// Returns the counters of the partitions it ran (each partition's latest).
pub fn run(cfg: PipelineConfig, brokers: String, view: ViewHandle, stop: Arc<AtomicBool>) -> Result<MonitorSummary, MonitorError> {
    check_partitions(&cfg, &brokers)?;
    let k = cfg.monitor.closing_partitions;
    let topic = cfg.topics.monitor_changelog.clone();
    let group = format!("{topic}.leader");
    let mut cc = kafka::client_config(&brokers, &cfg.kafka.librdkafka);
    cc.set("group.id", &group)
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "1000")
        // a joining process must not take a partition from a live owner before it let it go
        .set("partition.assignment.strategy", "cooperative-sticky");
    // a restarted process with the same instance id gets its partitions back without a rebalance
    if let Some(id) = cfg.kafka.instance_id.as_ref().filter(|s| !s.trim().is_empty()) {
        cc.set("group.instance.id", format!("{id}-monitor-lead"));
    }
    let election: BaseConsumer<KnownProtocol> = cc.create_with_context(KnownProtocol::of(&cc)).map_err(KafkaError::client("the closing partitions' group consumer"))?;
    election.subscribe(&[&topic]).map_err(KafkaError::broker(format!("subscribe {topic}")))?;
    let warm = cfg.monitor.standby_replicas > 0;
    let views: Vec<ViewHandle> = (0..k).map(|p| view.partition(p)).collect();
    for v in &views {
        let cell = v.changelog_cell();
        cell.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(super::changelog::Progress { warm, ..Default::default() });
    }
    let mut owned: BTreeMap<u32, Owned> = BTreeMap::new();
    let mut copies: BTreeMap<u32, WarmCopy> = BTreeMap::new();
    let mut latest: BTreeMap<u32, MonitorCounters> = BTreeMap::new();
    let mut said: BTreeSet<u32> = BTreeSet::new();
    tracing::info!(topic = %topic, partitions = k, warm, "monitor: joining the group of the closing partitions");
    let result = loop {
        if stop.load(Ordering::Relaxed) {
            break Ok(());
        }
        // polling serves the group protocol; the changelog itself is read by the owners and copies
        let _ = election.poll(if warm && !copies.is_empty() { Duration::ZERO } else { Duration::from_millis(100) });
        let assigned: BTreeSet<u32> = match election.assignment() {
            Ok(a) => {
                if a.count() > 0 {
                    let _ = election.pause(&a);
                }
                a.elements().iter().map(|e| e.partition() as u32).collect()
            }
            Err(_) => BTreeSet::new(),
        };
        for (p, o) in &owned {
            if !assigned.contains(p) {
                o.owned.store(false, Ordering::Relaxed);
            }
        }
        // partitions whose thread ended: taken away, stopped, or failed
        let ended: Vec<u32> = owned.iter().filter(|(_, o)| o.handle.is_finished()).map(|(p, _)| *p).collect();
        let mut failed = None;
        for p in ended {
            let o = owned.remove(&p).expect("listed");
            let still = o.owned.load(Ordering::Relaxed);
            let joined = o.handle.join();
            // the view held the ended stage's store open for live checkpoints
            views[p as usize].clear_checkpointer();
            match joined {
                Ok(Ok(c)) => {
                    latest.insert(p, c);
                }
                Ok(Err(MonitorError::LostLeadership)) => tracing::info!(partition = p, "monitor: closing partition handed to another process"),
                // an owner that lost the partition fails when the new one fences it: that is the hand-over
                Ok(Err(e)) if !still => tracing::info!(partition = p, error = %e, "monitor: closing partition handed to another process (its writer was fenced)"),
                Ok(Err(e)) => {
                    failed = Some(e);
                    break;
                }
                Err(_) => {
                    failed = Some(MonitorError::Thread { what: "closing partition", message: format!("partition {p} panicked") });
                    break;
                }
            }
            said.remove(&p);
        }
        if let Some(e) = failed {
            break Err(e);
        }
        for &p in &assigned {
            if owned.contains_key(&p) {
                continue;
            }
            // the warm copy's store goes to the owner as it is (its tail is closed)
            let store = copies.remove(&p).map(|c| c.store);
            let flag = Arc::new(AtomicBool::new(true));
            let (cfg, brokers, v, f, s) = (cfg.clone(), brokers.clone(), views[p as usize].clone(), flag.clone(), stop.clone());
            let handle = std::thread::Builder::new().name(format!("monitor-close-{p}")).spawn(move || MonitorStage::open_partition(cfg, brokers, p, v, f, store)?.run(s));
            match handle {
                Ok(handle) => {
                    owned.insert(p, Owned { owned: flag, handle });
                }
                Err(e) => {
                    failed = Some(MonitorError::Thread { what: "closing partition", message: format!("cannot start it: {e}") });
                    break;
                }
            }
        }
        if let Some(e) = failed {
            break Err(e);
        }
        for p in (0..k).filter(|p| !owned.contains_key(p)) {
            if said.insert(p) {
                views[p as usize].set_role(super::view::Role::Standby);
                tracing::info!(partition = p, warm, "monitor standby: waiting for leadership");
            }
            if !warm {
                continue;
            }
            if let std::collections::btree_map::Entry::Vacant(slot) = copies.entry(p) {
                match open_copy(&cfg, &brokers, p, &views[p as usize]) {
                    Ok(c) => {
                        slot.insert(c);
                    }
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
        }
        if let Some(e) = failed {
            break Err(e);
        }
        let wait = Duration::from_millis(100 / k.max(1) as u64);
        if let Some(e) = copies.values_mut().find_map(|c| c.changelog.pump(&mut c.tail, &c.store, wait).err()) {
            break Err(e);
        }
    };
    // stop every owner (they see `stop`, or a failure of one stops the rest), then leave the group
    stop.store(true, Ordering::Relaxed);
    for (p, o) in std::mem::take(&mut owned) {
        match o.handle.join() {
            Ok(Ok(c)) => {
                latest.insert(p, c);
            }
            Ok(Err(MonitorError::LostLeadership)) => {}
            Ok(Err(e)) => tracing::error!(partition = p, error = %e, "monitor: a closing partition failed while stopping"),
            Err(_) => tracing::error!(partition = p, "monitor: a closing partition's thread panicked"),
        }
    }
    drop(copies);
    kafka::rebalance::close_within(election, Duration::from_secs(15), "the closing partitions' group consumer");
    result?;
    let mut total = MonitorCounters::default();
    for c in latest.values() {
        total.add(c);
    }
    tracing::info!(summary = ?total, "monitor stage stopped");
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject(model: &str) -> Subject {
        Subject { model: model.into(), version: "1.0.0".into(), cohort: "baseline".into() }
    }

    #[test]
    fn a_partial_splits_into_each_models_partition_with_the_pipeline_copied_and_counts_once() {
        use crate::window::aggregate::WindowAggregate;
        let models = ["document_classifier", "table_detection", "text_recognition"];
        let agg = |n: u64| WindowAggregate { count: n, ..Default::default() };
        let mut subjects: Vec<(Subject, WindowAggregate)> = models.iter().map(|m| (subject(m), agg(10))).collect();
        subjects.push((Subject::pipeline(), agg(10)));
        let p = PartialBatch {
            source: "results/4".into(),
            max_event_ms: Some(42),
            windows: vec![super::super::partial::PartialWindow { start_ms: 0, results: 10, feedback: 2, subjects }],
            duplicates: 3,
            orphans: 1,
            overflow: 0,
            dead_lettered: 5,
            member: "m".into(),
            caught_up: true,
        };
        let parts = split(p, 3);
        assert_eq!(parts.iter().map(|(k, _)| *k).collect::<Vec<_>>(), vec![0, 1, 2]);
        let home = pipeline_partition(3);
        for (k, part) in &parts {
            // every partition gets the clock and the report, and the pipeline subject
            assert_eq!((part.source.as_str(), part.max_event_ms, part.caught_up), ("results/4", Some(42), true));
            let w = &part.windows[0];
            assert!(w.subjects.iter().any(|(s, _)| s.is_pipeline()));
            for (s, _) in w.subjects.iter().filter(|(s, _)| !s.is_pipeline()) {
                assert_eq!(subject_partition(s, 3), *k, "{s:?}");
            }
            let own = *k == home;
            assert_eq!((w.results, w.feedback, part.duplicates, part.orphans, part.dead_lettered), if own { (10, 2, 3, 1, 5) } else { (0, 0, 0, 0, 0) });
        }
        // each model's subject in exactly one partition
        for m in models {
            assert_eq!(parts.iter().filter(|(_, p)| p.windows[0].subjects.iter().any(|(s, _)| s.model == m)).count(), 1, "{m}");
        }
        // one partition: the partial as it is
        assert_eq!(split(PartialBatch::default(), 1).len(), 1);
    }

    #[test]
    fn a_command_goes_to_its_models_partition() {
        let cfg = PipelineConfig::from_yaml("models:\n  metadata: Cargo.toml\n  serve: {document_classifier: '1.0.0', text_recognition: '1.0.0'}\nmonitor:\n  scale_out: true\n  closing_partitions: 3\n").unwrap();
        let cmd = |id: &str, model: Option<&str>| crate::rollout::RolloutCommand { command_id: "c".into(), rollout_id: id.into(), action: "PAUSE".into(), operator: "ops".into(), reason: None, model: model.map(Into::into), version: None, issued_at: 0 };
        let classifier = shard_of("document_classifier", 3);
        assert_eq!(command_partition(&cfg, &cmd("document_classifier-1.1.0", None)), classifier);
        assert_eq!(command_partition(&cfg, &cmd("custom", Some("document_classifier"))), classifier);
        assert_eq!(command_partition(&cfg, &cmd("text_recognition-2.0.0", None)), shard_of("text_recognition", 3));
        assert_eq!(command_partition(&cfg, &cmd("unknown", None)), shard_of("unknown", 3));
        // more than one closing partition needs the partials keyed by model
        let e = PipelineConfig::from_yaml("models:\n  metadata: Cargo.toml\n  serve: {document_classifier: '1.0.0'}\nmonitor:\n  closing_partitions: 2\n").unwrap_err().to_string();
        assert!(e.contains("monitor.closing_partitions") && e.contains("scale_out"), "{e}");
    }

    #[test]
    fn the_partition_of_a_key_is_stable_and_every_partition_is_reached() {
        assert_eq!(shard_of("document_classifier", 1), 0);
        assert_eq!(shard_of("document_classifier", 7), shard_of("document_classifier", 7));
        let hit: BTreeSet<u32> = (0..200).map(|i| shard_of(&format!("model-{i}"), 3)).collect();
        assert_eq!(hit.len(), 3);
    }
}
