//! The infer stage: `payslip.documents.v1` → decode, validate → batched ONNX Runtime inference →
//! one `InferenceResult` per document on `payslip.inference.v1`; bad input → dead-letter topic.
//!
//! ```text
//! consumer ──► batcher (max_batch / max_wait_ms) ──► blocking thread: decode, validate, infer, encode
//!                                                          │
//!     offsets stored ◄── ack task (delivery reports, FIFO) ◄── producer (results + dead letters)
//! ```
//!
//! Delivery semantics: at least once. A message's offset is stored only after everything it caused
//! (its result or its dead letter) has a successful delivery report; the ack task handles batches in
//! consumption order, so stored offsets only move forward. If a delivery fails after librdkafka's own
//! retries, the stage stops with an error without storing that offset, and the document is consumed
//! again after restart. Redelivered documents produce results with the same `result_id`
//! (derived from the document id), so duplicates are recognisable downstream.
//!
//! Shutdown (SIGTERM/SIGINT or the shutdown channel): stop consuming, finish the batch in hand, wait
//! for every delivery report, store and synchronously commit offsets, then return.

use std::{
    collections::BTreeMap,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use rdkafka::{
    consumer::{CommitMode, Consumer, StreamConsumer},
    message::{Message, OwnedMessage},
    producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer},
    util::Timeout,
};
use tokio::sync::{mpsc, watch};

use crate::{
    codec::{self, Record},
    config::PipelineConfig,
    document::{InferenceResult, PayslipDocument},
    inference::ModelRegistry,
    kafka::{self, headers as h, headers::HeaderSet},
    rollout::routing::{Follower, Route, Routing},
    telemetry::{InferCounters, InferSummary, ProcessSample},
};

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// Cannot reach or use Kafka (retry after fixing connectivity).
    #[error("kafka: {0}")]
    Kafka(String),
    /// A result or dead letter could not be delivered; offsets after it were not stored, so a
    /// restart reprocesses from the last durable point.
    #[error("delivery failed, stopping without storing the offset: {0}")]
    Delivery(String),
    /// A bug (e.g. a panic on a blocking thread).
    #[error("internal: {0}")]
    Internal(String),
}

/// One message to produce, with where it goes.
pub(crate) struct Outgoing {
    pub topic: String,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: HeaderSet,
    pub is_result: bool,
    pub has_error: bool,
}

/// What one input message became, and its position.
pub(crate) struct Processed {
    pub out: Outgoing,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// Work whose offsets may be stored once its deliveries succeed.
struct Pending {
    deliveries: Vec<(DeliveryFuture, bool, bool)>,
    positions: Vec<(String, i32, i64)>,
}

/// A configured infer stage.
pub struct InferStage {
    cfg: PipelineConfig,
    brokers: String,
    registry: Arc<ModelRegistry>,
    counters: Arc<InferCounters>,
}

impl InferStage {
    pub fn new(cfg: PipelineConfig, brokers: String, registry: Arc<ModelRegistry>) -> Self {
        Self { cfg, brokers, registry, counters: Arc::new(InferCounters::default()) }
    }

    pub fn counters(&self) -> Arc<InferCounters> {
        self.counters.clone()
    }

    /// Runs until `shutdown` turns true (or its sender is dropped), then drains and returns what it did.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) -> Result<InferSummary, StageError> {
        let cfg = &self.cfg;
        // the canary split: read the decisions topic to its end before the first document
        let follower = {
            let (cfg, brokers, registry) = (cfg.clone(), self.brokers.clone(), self.registry.clone());
            tokio::task::spawn_blocking(move || Follower::start(&cfg, &brokers, registry)).await.map_err(|e| StageError::Internal(format!("decisions follower panicked: {e}")))?
        };
        let routing = follower.routing();
        let consumer: StreamConsumer = kafka::consumer_config(&self.brokers, &cfg.kafka.infer_group, &cfg.kafka.librdkafka)
            .create()
            .map_err(|e| StageError::Kafka(format!("cannot create consumer: {e}")))?;
        consumer.subscribe(&[&cfg.topics.documents]).map_err(|e| StageError::Kafka(format!("cannot subscribe to {}: {e}", cfg.topics.documents)))?;
        let consumer = Arc::new(consumer);
        let producer: FutureProducer =
            kafka::producer_config(&self.brokers, &cfg.kafka.librdkafka).create().map_err(|e| StageError::Kafka(format!("cannot create producer: {e}")))?;

        tracing::info!(
            topic = %cfg.topics.documents, group = %cfg.kafka.infer_group, provider = %self.registry.provider(),
            max_batch = cfg.batching.max_batch, max_wait_ms = cfg.batching.max_wait_ms, "infer stage started"
        );

        let (ack_tx, ack_rx) = mpsc::channel::<Pending>(8);
        let acker = tokio::spawn(ack_loop(ack_rx, consumer.clone(), self.counters.clone()));
        let max_wait = Duration::from_millis(cfg.batching.max_wait_ms);
        let mut last_log = Instant::now();
        let mut stopping = false;
        let mut failure: Option<StageError> = None;

        while !stopping {
            let mut batch: Vec<OwnedMessage> = Vec::with_capacity(cfg.batching.max_batch);
            tokio::select! {
                biased;
                _ = shutdown.changed() => { stopping = true; }
                m = consumer.recv() => match m {
                    Ok(m) => batch.push(m.detach()),
                    Err(e) => { tracing::warn!(error = %e, "consumer error"); continue; }
                },
            }
            if !batch.is_empty() {
                let deadline = tokio::time::Instant::now() + max_wait;
                while batch.len() < cfg.batching.max_batch {
                    tokio::select! {
                        biased;
                        _ = shutdown.changed() => { stopping = true; break; }
                        _ = tokio::time::sleep_until(deadline) => break,
                        m = consumer.recv() => match m {
                            Ok(m) => batch.push(m.detach()),
                            Err(e) => tracing::warn!(error = %e, "consumer error"),
                        },
                    }
                }
            }
            if *shutdown.borrow() {
                stopping = true;
            }
            if batch.is_empty() {
                continue;
            }
            self.counters.consumed.fetch_add(batch.len() as u64, Ordering::Relaxed);
            self.counters.batches.fetch_add(1, Ordering::Relaxed);
            let registry = self.registry.clone();
            let cfg2 = self.cfg.clone();
            let counters = self.counters.clone();
            let routing2 = routing.clone();
            let processed = match tokio::task::spawn_blocking(move || process_batch(&cfg2, &registry, &routing2, &counters, batch)).await {
                Ok(p) => p,
                Err(e) => {
                    failure = Some(StageError::Internal(format!("batch processing panicked: {e}")));
                    break;
                }
            };
            let mut pending = Pending { deliveries: Vec::with_capacity(processed.len()), positions: Vec::with_capacity(processed.len()) };
            for p in processed {
                let hs = p.out.headers.build();
                let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&p.out.topic).payload(&p.out.payload[..]).headers(hs);
                if let Some(k) = &p.out.key {
                    record = record.key(&k[..]);
                }
                let fut = kafka::enqueue(&producer, record).await;
                pending.deliveries.push((fut, p.out.is_result, p.out.has_error));
                pending.positions.push((p.topic, p.partition, p.offset));
            }
            if ack_tx.send(pending).await.is_err() {
                break; // the ack task ended: it reports why below
            }
            if last_log.elapsed() > Duration::from_secs(10) {
                last_log = Instant::now();
                let s = self.counters.snapshot();
                tracing::info!(consumed = s.consumed, results = s.results, dead_letters = s.dead_letters, batches = s.batches, "progress");
            }
        }
        drop(ack_tx);
        match acker.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failure = failure.or(Some(e)),
            Err(e) => failure = failure.or(Some(StageError::Internal(format!("ack task panicked: {e}")))),
        }
        if failure.is_none() {
            // Offsets stored so far are durable work; commit them before leaving the group.
            if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
                tracing::debug!(error = %e, "final commit (nothing to commit is fine)");
            }
        }
        let _ = producer.flush(Timeout::After(Duration::from_secs(10)));
        drop(follower);
        let summary = self.counters.snapshot();
        tracing::info!(?summary, "infer stage stopped");
        match failure {
            Some(e) => Err(e),
            None => Ok(summary),
        }
    }
}

async fn ack_loop(mut rx: mpsc::Receiver<Pending>, consumer: Arc<StreamConsumer>, counters: Arc<InferCounters>) -> Result<(), StageError> {
    while let Some(p) = rx.recv().await {
        for (fut, is_result, has_error) in p.deliveries {
            match fut.await {
                Ok(Ok(_)) => {
                    if is_result {
                        counters.results.fetch_add(1, Ordering::Relaxed);
                        if has_error {
                            counters.results_with_error.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                Ok(Err((e, _))) => return Err(StageError::Delivery(e.to_string())),
                Err(_) => return Err(StageError::Delivery("producer dropped the delivery".into())),
            }
        }
        // Highest offset per partition; earlier ones are implied.
        let mut last: BTreeMap<(String, i32), i64> = BTreeMap::new();
        for (t, part, off) in p.positions {
            let e = last.entry((t, part)).or_insert(off);
            *e = (*e).max(off);
        }
        for ((t, part), off) in last {
            match consumer.store_offset(&t, part, off) {
                Ok(()) => {
                    counters.offsets_stored.fetch_add(1, Ordering::Relaxed);
                }
                // The partition was revoked meanwhile: its new owner re-reads from the last commit.
                Err(e) => tracing::debug!(topic = %t, partition = part, offset = off, error = %e, "offset not stored"),
            }
        }
    }
    Ok(())
}

/// Decode, validate, route, infer and encode one batch. Runs on a blocking thread.
pub(crate) fn process_batch(cfg: &PipelineConfig, registry: &ModelRegistry, routing: &std::sync::RwLock<Routing>, counters: &InferCounters, batch: Vec<OwnedMessage>) -> Vec<Processed> {
    let limits = cfg.limits.document_limits();
    let mut docs: Vec<(usize, PayslipDocument)> = Vec::new();
    let mut delay_ms = 0u64;
    let mut forced_errors: BTreeMap<usize, String> = BTreeMap::new();
    let mut slots: Vec<Option<Processed>> = Vec::with_capacity(batch.len());
    for (i, m) in batch.iter().enumerate() {
        match decode_document(m, cfg.limits.max_payload_bytes, &limits) {
            Ok(d) => {
                if cfg.faults.enabled {
                    if let Some(ms) = h::get(m.headers(), "fault-delay-ms").and_then(|v| v.parse::<u64>().ok()) {
                        delay_ms = delay_ms.max(ms.min(cfg.faults.max_delay_ms));
                    }
                    if let Some(model) = h::get(m.headers(), "fault-error") {
                        forced_errors.insert(i, model);
                    }
                }
                docs.push((i, d));
                slots.push(None);
            }
            Err((class, message)) => {
                counters.dead_letter(class);
                tracing::warn!(class, %message, topic = m.topic(), partition = m.partition(), offset = m.offset(), "document dead-lettered");
                slots.push(Some(Processed { out: dead_letter(cfg, m, class, &message), topic: m.topic().into(), partition: m.partition(), offset: m.offset() }));
            }
        }
    }
    if !docs.is_empty() {
        // one route per document, then one model run per distinct set of versions
        let routes: Vec<Route> = {
            let r = routing.read().unwrap_or_else(|p| p.into_inner());
            docs.iter().map(|(_, d)| r.route(registry.served_versions(), &d.user_id)).collect()
        };
        let mut groups: BTreeMap<&BTreeMap<String, String>, Vec<usize>> = BTreeMap::new();
        for (k, r) in routes.iter().enumerate() {
            groups.entry(&r.versions).or_default().push(k);
        }
        if delay_ms > 0 {
            std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        }
        let mut outputs: Vec<Vec<crate::document::ModelOutput>> = vec![Vec::new(); docs.len()];
        for (versions, members) in &groups {
            let refs: Vec<&PayslipDocument> = members.iter().map(|&k| &docs[k].1).collect();
            for (&k, outs) in members.iter().zip(registry.infer(&refs, versions)) {
                outputs[k] = outs;
            }
        }
        for ((i, _), outs) in docs.iter().zip(outputs.iter_mut()) {
            if delay_ms > 0 {
                for o in outs.iter_mut() {
                    o.latency_ms += delay_ms as f64;
                }
            }
            // `fault-error: MODEL` fails that model; `MODEL@VERSION` only when that version ran
            if let Some(target) = forced_errors.get(i) {
                let (model, version) = target.split_once('@').map(|(m, v)| (m, Some(v))).unwrap_or((target.as_str(), None));
                for o in outs.iter_mut().filter(|o| o.model == model && version.is_none_or(|v| v == o.version)) {
                    o.error_code = Some(crate::inference::codes::INFERENCE_FAILED.into());
                }
            }
        }
        let provider = registry.provider();
        let sample = counters.process.sample();
        for (((i, doc), outs), route) in docs.into_iter().zip(outputs).zip(routes) {
            let m = &batch[i];
            let out = result_message(cfg, m, doc, outs, &route, &provider, &sample);
            slots[i] = Some(Processed { out, topic: m.topic().into(), partition: m.partition(), offset: m.offset() });
        }
    }
    slots.into_iter().flatten().collect()
}

fn decode_document(m: &OwnedMessage, max_payload: usize, limits: &crate::document::DocumentLimits) -> Result<PayslipDocument, (&'static str, String)> {
    let payload = m.payload().ok_or(("undecodable", "message has no value".to_string()))?;
    if payload.len() > max_payload {
        return Err(("oversized", format!("value is {} bytes; limits.max_payload_bytes is {max_payload}", payload.len())));
    }
    let ct = h::get(m.headers(), h::CONTENT_TYPE);
    let doc: PayslipDocument = codec::decode(payload, ct.as_deref()).map_err(|e| (e.class(), e.to_string()))?;
    doc.validate(limits).map_err(|e| (e.class(), e.to_string()))?;
    Ok(doc)
}

fn source_of(m: &OwnedMessage) -> String {
    format!("{}/{}/{}", m.topic(), m.partition(), m.offset())
}

fn dead_letter(cfg: &PipelineConfig, m: &OwnedMessage, class: &str, message: &str) -> Outgoing {
    let headers = HeaderSet::new()
        .copy_from(m.headers())
        .with(h::ERROR_CLASS, class)
        .with(h::ERROR_MESSAGE, message)
        .with(h::SOURCE_TOPIC, m.topic())
        .with(h::SOURCE_PARTITION, m.partition().to_string())
        .with(h::SOURCE_OFFSET, m.offset().to_string())
        .with("dead-lettered-at", chrono::Utc::now().to_rfc3339());
    Outgoing {
        topic: cfg.topics.documents_dlq.clone(),
        key: m.key().map(<[u8]>::to_vec),
        payload: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
        headers,
        is_result: false,
        has_error: false,
    }
}

fn result_message(
    cfg: &PipelineConfig,
    m: &OwnedMessage,
    doc: PayslipDocument,
    outputs: Vec<crate::document::ModelOutput>,
    route: &Route,
    provider: &str,
    sample: &ProcessSample,
) -> Outgoing {
    let now = chrono::Utc::now().timestamp_millis();
    let produced_at = m.timestamp().to_millis().unwrap_or(doc.submitted_at);
    let error_code = outputs.iter().find_map(|o| o.error_code.clone());
    let result = InferenceResult {
        result_id: InferenceResult::id_for(&doc.document_id),
        document_id: doc.document_id.clone(),
        user_id: doc.user_id,
        tenant: doc.tenant,
        cohort: route.cohort.into(),
        submitted_at: doc.submitted_at,
        processed_at: now,
        provider: provider.to_string(),
        model_versions: route.versions.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        inference_ms: outputs.iter().map(|o| o.latency_ms).sum(),
        outputs,
        end_to_end_ms: (now - produced_at).max(0) as f64,
        error_code: error_code.clone(),
        true_format: doc.labels.map(|l| l.format),
        source: source_of(m),
        process_rss_bytes: sample.rss_bytes.map(|b| b as i64),
        process_cpu_percent: sample.cpu_percent,
    };
    let format = cfg.topics.inference_format;
    let has_error = error_code.is_some();
    let (payload, error_headers) = match codec::encode(&result, format) {
        Ok(p) => (p, None),
        // Our own record failed to encode: a defect. Still answer the document, as JSON, loudly.
        Err(e) => {
            tracing::error!(error = %e, "result encoding failed");
            (serde_json::to_vec(&result).unwrap_or_default(), Some(e.to_string()))
        }
    };
    let trace = h::get(m.headers(), h::TRACE_ID).unwrap_or_else(|| format!("{:016x}", fnv(&doc.document_id)));
    let mut headers = HeaderSet::new()
        .with(h::CONTENT_TYPE, if error_headers.is_some() { codec::CONTENT_TYPE_JSON } else { format.content_type() })
        .with(h::SCHEMA, InferenceResult::SCHEMA_NAME)
        .with(h::RESULT_ID, &result.result_id)
        .with(h::TRACE_ID, trace)
        .with(h::MODEL_VERSIONS, route.versions.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(","))
        .with(h::PROVIDER, provider)
        .with(h::SOURCE, &result.source)
        .with(h::COHORT, route.cohort);
    if !route.stamp.is_empty() {
        headers = headers.with(h::ROLLOUT, &route.stamp);
    }
    if let Some(code) = &error_code {
        headers = headers.with("error-code", code);
    }
    // a re-driven dead letter keeps its history (`dlq replay`): carried over to its result
    if let Some(hs) = m.headers() {
        use rdkafka::message::Headers;
        for x in hs.iter().filter(|x| x.key.starts_with("dlq.")) {
            headers = headers.with(x.key, String::from_utf8_lossy(x.value.unwrap_or_default()));
        }
    }
    Outgoing { topic: cfg.topics.inference.clone(), key: Some(doc.document_id.into_bytes()), payload, headers, is_result: true, has_error }
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}
