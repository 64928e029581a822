//! Canary routing in the infer stage, following the decisions topic.
//!
//! A user is canary for a rollout when `bucket(rollout_id, user_id) < traffic_percent × 100`, where
//! the bucket is the first 8 bytes of sha256(`rollout_id` NUL `user_id`) mod 10 000. The bucket does
//! not depend on the percentage, so the canary users at 1 % are a subset of those at 10 %, and salting
//! with the rollout id gives each rollout an independent sample of users.
//!
//! [`Follower`] reads `litert.rollout.decisions.v1` from the beginning (compacted: the latest decision
//! per rollout) before the stage consumes its first document, then keeps reading on its own thread,
//! so an EMERGENCY_ROLLBACK reaches routing as soon as the broker delivers it (typically well under a
//! second). If the topic cannot be read at start (broker slow, topic just created), the stage still
//! starts, routing every document to the baseline (never to a candidate it has not seen a decision
//! for), says so in its log, and keeps retrying in the background.
//!
//! Candidate versions are loaded, and warmed up at the batcher's shapes, before the split that needs
//! them is applied, so no document waits for a load. A version nothing routes to any more (a
//! candidate rolled back, a baseline replaced by a promoted candidate) is unloaded once it has gone
//! `models.unload_after_ms` unrouted, time for batches routed before the decision to finish on it.
//! Routing is per document at the moment its batch runs; each result records the cohort, the
//! versions that ran and the decision it was routed under (`rollout` header).

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, RwLock,
    },
    time::{Duration, Instant},
};

use rdkafka::{
    consumer::BaseConsumer,
    message::Message,
};
use sha2::{Digest, Sha256};

use super::{RolloutDecision, RolloutError, Status, COHORT_BASELINE, COHORT_CANARY};
use crate::{
    codec,
    config::PipelineConfig,
    inference::ModelRegistry,
    kafka::{self, headers as h, KafkaError, RangeCursor},
};

/// The user's bucket in 0..10 000 for a rollout.
pub fn bucket(rollout_id: &str, user_id: &str) -> u32 {
    let mut hsh = Sha256::new();
    hsh.update(rollout_id.as_bytes());
    hsh.update([0u8]);
    hsh.update(user_id.as_bytes());
    let d = hsh.finalize();
    (u64::from_be_bytes(d[..8].try_into().expect("8 bytes")) % 10_000) as u32
}

pub fn is_canary(rollout_id: &str, user_id: &str, traffic_percent: f64) -> bool {
    (bucket(rollout_id, user_id) as f64) < (traffic_percent * 100.0).round()
}

/// How one document is served.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub cohort: &'static str,
    /// Model → version to run.
    pub versions: BTreeMap<String, String>,
    /// `rollout_id@seq:traffic` of each active rollout the document was routed under.
    pub stamp: String,
}

/// The split every infer process applies, built from decisions.
#[derive(Debug, Clone, Default)]
pub struct Routing {
    latest: BTreeMap<String, RolloutDecision>,
    promoted: BTreeMap<String, String>,
}

impl Routing {
    /// Takes a decision in (older or repeated sequence numbers are ignored).
    pub fn apply(&mut self, d: RolloutDecision) {
        if d.seq == 0 || self.latest.get(&d.rollout_id).is_some_and(|l| l.seq >= d.seq) {
            return;
        }
        if d.status == Status::Promoted {
            self.promoted.insert(d.model.clone(), d.candidate_version.clone());
        }
        self.latest.insert(d.rollout_id.clone(), d);
    }

    /// Rollouts that currently send traffic to a candidate.
    pub fn active(&self) -> impl Iterator<Item = &RolloutDecision> {
        self.latest.values().filter(|d| d.status.is_active() && d.traffic_percent > 0.0)
    }

    pub fn latest(&self, rollout_id: &str) -> Option<&RolloutDecision> {
        self.latest.get(rollout_id)
    }

    /// Every (model, version) a document can be routed to now: the baselines (promoted versions in
    /// place of the configured ones) and the candidate of each rollout sending traffic.
    pub fn versions_in_use(&self, serve: &BTreeMap<String, String>) -> std::collections::BTreeSet<(String, String)> {
        let mut v: std::collections::BTreeSet<(String, String)> = serve.iter().map(|(m, v)| (m.clone(), self.promoted.get(m).unwrap_or(v).clone())).collect();
        v.extend(self.active().map(|d| (d.model.clone(), d.candidate_version.clone())));
        v
    }

    /// The route of a document of `user_id`, given the configured baseline versions.
    pub fn route(&self, serve: &BTreeMap<String, String>, user_id: &str) -> Route {
        let mut versions = serve.clone();
        for (m, v) in &self.promoted {
            if versions.contains_key(m) {
                versions.insert(m.clone(), v.clone());
            }
        }
        let mut cohort = COHORT_BASELINE;
        let mut stamp = Vec::new();
        for d in self.active() {
            stamp.push(format!("{}@{}:{}", d.rollout_id, d.seq, d.traffic_percent));
            if is_canary(&d.rollout_id, user_id, d.traffic_percent) {
                versions.insert(d.model.clone(), d.candidate_version.clone());
                cohort = COHORT_CANARY;
            }
        }
        Route { cohort, versions, stamp: stamp.join(",") }
    }
}

/// Reads decisions and keeps a shared [`Routing`] current.
pub struct Follower {
    routing: Arc<RwLock<Routing>>,
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

/// Reads every decision on the topic up to its end offsets at the time of the call.
pub fn read_decisions(cfg: &PipelineConfig, brokers: &str) -> Result<Vec<RolloutDecision>, RolloutError> {
    let mut out = Vec::new();
    catch_up(cfg, brokers, |d| out.push(d))?;
    Ok(out)
}

/// Reads the decisions topic from its beginning to its end now, calling `f` with each decision,
/// and returns the consumer positioned there (to follow what comes next).
fn catch_up(cfg: &PipelineConfig, brokers: &str, f: impl FnMut(RolloutDecision)) -> Result<BaseConsumer, KafkaError> {
    catch_up_topic(cfg, brokers, &cfg.topics.decisions, f)
}

/// Takes a model version announced on the registry topic into the registry's metadata.
fn announced(registry: &ModelRegistry, a: crate::inference::announce::ModelAnnouncement) {
    registry.announce(a.entry());
}

/// [`catch_up`] for any compacted control topic of records `R`.
pub(crate) fn catch_up_topic<R: codec::Record>(cfg: &PipelineConfig, brokers: &str, topic: &str, mut f: impl FnMut(R)) -> Result<BaseConsumer, KafkaError> {
    let mut c = kafka::reader_config(brokers, "payslip-rollout-follower", &cfg.kafka.librdkafka);
    c.set("fetch.wait.max.ms", "100");
    let consumer: BaseConsumer = c.create().map_err(KafkaError::client("the decisions reader"))?;
    // assign every partition from its beginning: what follows the captured end is followed later
    let mut cursor = RangeCursor::to_end(consumer, topic, |_, lo, _| lo, format!("reading {topic}"))?.including_past_end();
    let mut last = Instant::now();
    while !cursor.done() {
        match cursor.next(Duration::from_millis(200))? {
            Some(m) => {
                if let Some(d) = decode(&m) {
                    f(d);
                }
                last = Instant::now();
            }
            None if last.elapsed() > Duration::from_secs(60) => return Err(KafkaError::Timeout { what: format!("reading {topic} to its end"), seconds: 60 }),
            None => {}
        }
    }
    // every partition stays assigned past its end: what comes next is followed
    Ok(cursor.into_consumer())
}

pub(crate) fn decode<R: codec::Record>(m: &rdkafka::message::BorrowedMessage<'_>) -> Option<R> {
    let ct = h::get(m.headers(), h::CONTENT_TYPE);
    match codec::decode::<R>(m.payload()?, ct.as_deref()) {
        Ok(d) => Some(d),
        Err(e) => {
            tracing::warn!(error = %e, topic = m.topic(), partition = m.partition(), offset = m.offset(), record = R::SCHEMA_NAME, "undecodable record skipped");
            None
        }
    }
}

/// Applies a decision to the routing. A decision that sends traffic to a version not loaded yet is
/// applied by a loader thread once the version is loaded, so the follower goes straight on to the
/// next decision: a slow load never delays an EMERGENCY_ROLLBACK behind it (decisions carry
/// sequence numbers, so a rollback applied meanwhile is not undone by the late START).
/// With `wait` (the catch-up before the first document) the load happens here, so the first
/// document is already routed right.
fn take(routing: &Arc<RwLock<Routing>>, registry: &Arc<ModelRegistry>, d: RolloutDecision, wait: bool) {
    tracing::info!(rollout = %d.rollout_id, seq = d.seq, action = %d.action, traffic_percent = d.traffic_percent, "routing follows decision");
    let needs_candidate = d.status.is_active() || d.status == Status::Promoted;
    if !needs_candidate || registry.is_loaded(&d.model, &d.candidate_version) {
        routing.write().unwrap_or_else(|p| p.into_inner()).apply(d);
        return;
    }
    let load_then_apply = {
        let (routing, registry) = (routing.clone(), registry.clone());
        move || {
            if !registry.ensure_loaded(&d.model, &d.candidate_version) {
                tracing::error!(rollout = %d.rollout_id, model = %d.model, version = %d.candidate_version, "candidate version could not be loaded; its documents report MODEL_UNAVAILABLE");
            }
            routing.write().unwrap_or_else(|p| p.into_inner()).apply(d);
        }
    };
    if wait {
        load_then_apply();
        return;
    }
    let spawned = std::thread::Builder::new().name("candidate-loader".into()).spawn(load_then_apply);
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start a loader thread; the decision waits for the next one");
    }
}

impl Follower {
    /// Reads the decisions topic to its end (so the first document is routed right), then follows it
    /// on a thread until dropped. Never fails: see the module doc for what happens when it cannot read.
    pub fn start(cfg: &PipelineConfig, brokers: &str, registry: Arc<ModelRegistry>) -> Self {
        let routing = Arc::new(RwLock::new(Routing::default()));
        // versions announced on the registry topic first: a decision may route to one of them
        let models_first = catch_up_topic(cfg, brokers, &cfg.topics.models, |a| announced(&registry, a))
            .map_err(|e| tracing::error!(error = %e, "cannot read the model registry topic yet: only model_metadata.json's versions are known until it can"));
        let first = catch_up(cfg, brokers, |d| take(&routing, &registry, d, true)).map_err(|e| tracing::error!(error = %e, "cannot read the rollout decisions yet: routing every document to the baseline until it can"));
        let stop = Arc::new(AtomicBool::new(false));
        let handle = {
            let (routing, stop, cfg, brokers) = (routing.clone(), stop.clone(), cfg.clone(), brokers.to_string());
            let grace = Duration::from_millis(cfg.models.unload_after_ms);
            std::thread::Builder::new().name("rollout-follower".into()).spawn(move || {
                let mut consumer = first.ok();
                let (mut models, mut models_retry) = (models_first.ok(), Instant::now());
                while !stop.load(Ordering::Relaxed) {
                    match &models {
                        Some(mc) => {
                            while let Some(r) = mc.poll(Duration::ZERO) {
                                match r {
                                    Ok(m) => {
                                        if let Some(a) = decode(&m) {
                                            announced(&registry, a);
                                        }
                                    }
                                    Err(e) => tracing::warn!(error = %e, "model registry reader"),
                                }
                            }
                        }
                        None if models_retry.elapsed() > Duration::from_secs(2) => {
                            models_retry = Instant::now();
                            models = catch_up_topic(&cfg, &brokers, &cfg.topics.models, |a| announced(&registry, a)).map_err(|e| tracing::warn!(error = %e, "model registry topic still unreadable")).ok();
                        }
                        None => {}
                    }
                    // versions nothing routes to any more are unloaded once batches routed before
                    // the decision had time to finish on them
                    let in_use = routing.read().unwrap_or_else(|p| p.into_inner()).versions_in_use(registry.served_versions());
                    registry.retire_unrouted(&in_use, grace);
                    let Some(c) = &consumer else {
                        std::thread::sleep(Duration::from_secs(2));
                        match catch_up(&cfg, &brokers, |d| take(&routing, &registry, d, false)) {
                            Ok(c) => {
                                tracing::info!("rollout decisions read: routing follows them again");
                                consumer = Some(c);
                            }
                            Err(e) => tracing::warn!(error = %e, "rollout decisions still unreadable; routing stays on the baseline"),
                        }
                        continue;
                    };
                    match c.poll(Duration::from_millis(100)) {
                        Some(Ok(m)) => {
                            if let Some(d) = decode::<RolloutDecision>(&m) {
                                // a decision for a version published a moment ago may arrive before
                                // its announcement: give the registry topic a few seconds to catch up
                                let known = |r: &ModelRegistry| r.listed_versions().iter().any(|(m, v)| *m == d.model && *v == d.candidate_version);
                                // (only for decisions that route to it: a rollback is never delayed)
                                let routes_to_it = d.status.is_active() || d.status == Status::Promoted;
                                if let (Some(mc), true, false) = (&models, routes_to_it, known(&registry)) {
                                    let until = Instant::now() + Duration::from_secs(3);
                                    while !known(&registry) && Instant::now() < until {
                                        if let Some(Ok(m)) = mc.poll(Duration::from_millis(100)) {
                                            if let Some(a) = decode(&m) {
                                                announced(&registry, a);
                                            }
                                        }
                                    }
                                }
                                take(&routing, &registry, d, false);
                            }
                        }
                        Some(Err(e)) => tracing::warn!(error = %e, "decisions reader"),
                        None => {}
                    }
                }
            })
        };
        let handle = match handle {
            Ok(h) => Some(h),
            Err(e) => {
                tracing::error!(error = %e, "cannot start the decisions follower thread; routing stays as read at start");
                None
            }
        };
        Self { routing, stop, handle }
    }

    pub fn routing(&self) -> Arc<RwLock<Routing>> {
        self.routing.clone()
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canary_users_at_a_lower_share_stay_canary_at_every_higher_share() {
        let users: Vec<String> = (0..20_000).map(|i| format!("user-{i:05}")).collect();
        let mut previous: Option<std::collections::BTreeSet<&String>> = None;
        for pct in [1.0, 10.0, 25.0, 50.0, 100.0] {
            let set: std::collections::BTreeSet<&String> = users.iter().filter(|u| is_canary("r1", u, pct)).collect();
            let share = set.len() as f64 / users.len() as f64;
            assert!((share - pct / 100.0).abs() < 0.01, "{pct} %: observed {share}");
            if let Some(p) = &previous {
                assert!(p.is_subset(&set), "canary users at the lower share must stay canary at {pct} %");
            }
            previous = Some(set);
        }
        // another rollout draws an independent sample
        let a: Vec<bool> = users.iter().map(|u| is_canary("r1", u, 10.0)).collect();
        let b: Vec<bool> = users.iter().map(|u| is_canary("r2", u, 10.0)).collect();
        let both = a.iter().zip(&b).filter(|(x, y)| **x && **y).count() as f64 / users.len() as f64;
        assert!(both < 0.02, "overlap {both}");
    }
}
