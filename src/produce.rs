//! `produce`: documents onto the documents topic, from files (JSON, JSON lines, Avro container files)
//! or from the synthetic generator at a given rate. Each message carries `content-type`, `schema`
//! and `trace-id` headers and is keyed by document id. Returns after every delivery report, so
//! "sent" means acknowledged by the broker.
//!
//! Documents go through one producer client or several (`ProduceOptions::producers`), each
//! document by its key, so one key's documents keep their order; documents with different keys
//! may reach a partition in another order than they were generated (by a few milliseconds). A
//! pooled document is patched in place with its id, user and time, never copied.

use std::{path::PathBuf, time::{Duration, Instant}};

use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::{
    codec::{self, Record, WireFormat},
    document::PayslipDocument,
    kafka::{self, headers as h, headers::HeaderSet, KafkaError},
    progress::{report, Progress, ProgressSink},
    synth::{Generator, GeneratorConfig},
};

/// Why documents could not be produced.
#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    /// An input file cannot be read or is not documents.
    #[error("{path}: {message}")]
    Input { path: String, message: String },
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error(transparent)]
    Encode(#[from] codec::EncodeError),
    /// The broker did not take some documents (each error with how many it failed); the others
    /// were delivered.
    #[error("{failed} of {total} documents were not delivered ({})", summarise(errors))]
    Undelivered { failed: u64, total: u64, errors: std::collections::BTreeMap<String, u64> },
}

fn summarise(errors: &std::collections::BTreeMap<String, u64>) -> String {
    errors.iter().map(|(e, n)| format!("{n}× {e}")).collect::<Vec<_>>().join("; ")
}

impl ProduceError {
    /// Whether producing again may succeed (the broker was unreachable); a bad file stays bad.
    pub fn retryable(&self) -> bool {
        match self {
            ProduceError::Kafka(e) => e.retryable(),
            ProduceError::Undelivered { .. } => true,
            ProduceError::Input { .. } | ProduceError::Encode(_) => false,
        }
    }
}

fn input(p: &std::path::Path, message: impl std::fmt::Display) -> ProduceError {
    ProduceError::Input { path: p.display().to_string(), message: message.to_string() }
}

/// Where documents come from.
pub enum Source {
    /// Generator documents `start..start + count` of `seed`. With `pool: Some(n)` only the first `n`
    /// are rendered (on every core, before the first is sent) and document `i` is rendered document
    /// `i % n` under its own id, user and time: rendering rasters costs far more than sending, and a
    /// load test needs a rate the generator alone cannot reach.
    Synthetic { seed: u64, start: u64, count: u64, golden_fraction: f64, pool: Option<u64> },
    /// Files: `.json` (one document or JSON lines), `.avro` (Avro object container file).
    Files(Vec<PathBuf>),
    /// Documents already in memory.
    Documents(Vec<PayslipDocument>),
}

pub struct ProduceOptions {
    pub brokers: String,
    pub topic: String,
    pub format: WireFormat,
    /// Documents per second; `None` = as fast as the broker takes them.
    pub rate: Option<f64>,
    /// Where progress goes (the CLI draws a bar from it).
    pub progress: ProgressSink,
    pub passthrough: std::collections::BTreeMap<String, String>,
    /// Producer clients the documents are spread over, each document by its key (one key's
    /// documents stay in order in one client). Each client has its own librdkafka thread that
    /// compresses and sends, so a load generator is not held to the one core that compresses for a
    /// single client (about 6,000 23 KB documents/s on this project's machines). 0 counts as 1.
    pub producers: usize,
}

/// How many producer clients `produce` uses: `--producers` when given; otherwise one per core for
/// pooled synthetic documents (a load generator, where one client's compression thread is the
/// limit), and one for files and generated documents (rendering is their limit).
pub fn clients(asked: Option<u16>, pool: Option<u64>, from_files: bool) -> usize {
    match (asked, pool) {
        (Some(n), _) => (n as usize).max(1),
        (None, Some(p)) if p > 0 && !from_files => std::thread::available_parallelism().map_or(1, |c| c.get()),
        (None, _) => 1,
    }
}

/// The client of `producers` that sends the document keyed `key` (FNV-1a of the key), so every
/// document with one key goes through one client, in order.
fn client_for(key: &[u8], producers: usize) -> usize {
    if producers <= 1 {
        return 0;
    }
    let h = key.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3));
    (h % producers as u64) as usize
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ProduceSummary {
    pub sent: u64,
    pub failed: u64,
    pub seconds: f64,
    /// The `--rate` asked for (documents/s), and the rate at which documents were handed to the
    /// producer over the run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requested_rate: Option<f64>,
    pub achieved_rate: f64,
    /// Whether the run fell behind the requested rate by more than 5 % (the generator or the
    /// broker could not keep up): the figures of a load test driven this way are not at that load.
    pub missed_rate: bool,
    /// The furthest the run fell behind its schedule, seconds.
    pub max_behind_seconds: f64,
    /// Delivery errors by message, when some documents were not delivered.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub errors: std::collections::BTreeMap<String, u64>,
}

/// Reads documents from files.
pub fn read_files(paths: &[PathBuf]) -> Result<Vec<PayslipDocument>, ProduceError> {
    let mut out = Vec::new();
    for p in paths {
        let bytes = std::fs::read(p).map_err(|e| input(p, format!("cannot read: {e}")))?;
        if p.extension().is_some_and(|e| e == "avro") {
            let reader = apache_avro::Reader::new(&bytes[..]).map_err(|e| input(p, format!("not an Avro container file: {e}")))?;
            for v in reader {
                let v = v.map_err(|e| input(p, e))?;
                out.push(apache_avro::from_value::<PayslipDocument>(&v).map_err(|e| input(p, e))?);
            }
        } else {
            let text = String::from_utf8(bytes).map_err(|_| input(p, "not UTF-8 JSON"))?;
            match serde_json::from_str::<PayslipDocument>(&text) {
                Ok(d) => out.push(d),
                Err(_) => {
                    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                        out.push(serde_json::from_str(line).map_err(|e| input(p, format!("line {}: {e}", i + 1)))?);
                    }
                }
            }
        }
    }
    Ok(out)
}

/// Documents `start..start + n` of `gen`, rendered on every core.
fn render_pool(gen: &Generator, start: u64, n: u64) -> Vec<PayslipDocument> {
    let threads = std::thread::available_parallelism().map_or(1, |p| p.get());
    let mut all: Vec<(u64, PayslipDocument)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads as u64).map(|t| s.spawn(move || (t..n).step_by(threads).map(|i| (i, gen.document(start + i).document)).collect::<Vec<_>>())).collect();
        handles.into_iter().flat_map(|h| h.join().unwrap_or_default()).collect()
    });
    all.sort_by_key(|(i, _)| *i);
    all.into_iter().map(|(_, d)| d).collect()
}

/// Where each document to send comes from: a pool of rendered documents sent under new ids (patched
/// in place, so a pooled document is never copied), or one document at a time.
enum Documents {
    Pool { pool: Vec<PayslipDocument>, seed: u64, start: u64, users: u64 },
    Each(Box<dyn FnMut(u64) -> PayslipDocument + Send>),
}

pub async fn produce(opts: &ProduceOptions, source: Source) -> Result<ProduceSummary, ProduceError> {
    let producers: Vec<FutureProducer> = (0..opts.producers.max(1))
        .map(|_| kafka::producer_config(&opts.brokers, &opts.passthrough).create().map_err(KafkaError::client("the document producer")))
        .collect::<Result<_, _>>()?;
    let (total, mut docs) = match source {
        Source::Synthetic { seed, start, count, golden_fraction, pool: Some(n) } if n > 0 => {
            let gen = Generator::new(GeneratorConfig { seed, golden_fraction, ..Default::default() });
            let pool = tokio::task::spawn_blocking(move || render_pool(&gen, start, n.min(count))).await.map_err(|e| ProduceError::Input { path: "--pool".into(), message: e.to_string() })?;
            (count, Documents::Pool { pool, seed, start, users: (GeneratorConfig::default().users as u64).max(1) })
        }
        Source::Synthetic { seed, start, count, golden_fraction, .. } => {
            let gen = Generator::new(GeneratorConfig { seed, golden_fraction, ..Default::default() });
            (count, Documents::Each(Box::new(move |i| gen.document(start + i).document)))
        }
        Source::Files(paths) => {
            let docs = read_files(&paths)?;
            (docs.len() as u64, Documents::Each(Box::new(move |i| docs[i as usize].clone())))
        }
        Source::Documents(docs) => (docs.len() as u64, Documents::Each(Box::new(move |i| docs[i as usize].clone()))),
    };
    report(&opts.progress, Progress::Start { total, unit: "documents" });
    let started = Instant::now();
    let mut inflight = futures::stream::FuturesUnordered::new();
    let mut summary = ProduceSummary::default();
    use futures::StreamExt;
    let rate = opts.rate.filter(|r| *r > 0.0);
    let mut last_warning = started;
    for i in 0..total {
        if let Some(rate) = rate {
            let due = started + Duration::from_secs_f64(i as f64 / rate);
            let now = Instant::now();
            if now > due {
                let behind = (now - due).as_secs_f64();
                summary.max_behind_seconds = summary.max_behind_seconds.max(behind);
                // a schedule more than a second late is said, at most every 5 s
                if behind > 1.0 && now - last_warning >= Duration::from_secs(5) {
                    last_warning = now;
                    let achieved = i as f64 / started.elapsed().as_secs_f64().max(1e-9);
                    tracing::warn!(requested_rate = rate, achieved_rate = format!("{achieved:.1}"), behind_s = format!("{behind:.1}"), "produce is behind the requested --rate (document generation or the broker is slower); the load is lower than asked");
                }
            } else {
                tokio::time::sleep_until(due.into()).await;
            }
        }
        let one;
        let doc: &PayslipDocument = match &mut docs {
            Documents::Pool { pool, seed, start, users } => {
                let len = pool.len() as u64;
                let d = &mut pool[(i % len) as usize];
                d.document_id = format!("doc-{seed}-{:08}", *start + i);
                d.user_id = format!("user-{:05}", (*start + i).wrapping_mul(0x9e37_79b9_7f4a_7c15) % *users);
                d.submitted_at = chrono::Utc::now().timestamp_millis();
                d
            }
            Documents::Each(next) => {
                one = {
                    let mut d = next(i);
                    if d.submitted_at <= 0 {
                        d.submitted_at = chrono::Utc::now().timestamp_millis();
                    }
                    d
                };
                &one
            }
        };
        let payload = codec::encode(doc, opts.format)?;
        let headers = HeaderSet::new()
            .with(h::CONTENT_TYPE, opts.format.content_type())
            .with(h::SCHEMA, PayslipDocument::SCHEMA_NAME)
            .with(h::TRACE_ID, format!("produce-{}", doc.document_id))
            .build();
        let key = doc.document_id.as_bytes();
        let producer = &producers[client_for(key, producers.len())];
        let record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&opts.topic).key(key).payload(&payload[..]).headers(headers);
        inflight.push(kafka::enqueue(producer, record).await?);
        while inflight.len() >= 10_000 {
            if let Some(r) = inflight.next().await {
                tally(&mut summary, r, &opts.progress);
            }
        }
        // collect finished deliveries without waiting
        while let Some(Some(r)) = futures::FutureExt::now_or_never(inflight.next()) {
            tally(&mut summary, r, &opts.progress);
        }
    }
    while let Some(r) = inflight.next().await {
        tally(&mut summary, r, &opts.progress);
    }
    report(&opts.progress, Progress::Finish);
    summary.seconds = started.elapsed().as_secs_f64();
    summary.achieved_rate = total as f64 / summary.seconds.max(1e-9);
    summary.requested_rate = rate;
    if let Some(rate) = rate {
        // the last document is due at (total - 1)/rate: judge the pace over that schedule
        let scheduled = (total.saturating_sub(1)) as f64 / rate;
        summary.missed_rate = total > 1 && summary.max_behind_seconds > 0.05 * scheduled.max(1.0);
        if summary.missed_rate {
            tracing::warn!(requested_rate = rate, achieved_rate = format!("{:.1}", summary.achieved_rate), max_behind_s = format!("{:.1}", summary.max_behind_seconds), "produce missed the requested --rate");
        }
    }
    if summary.failed > 0 {
        // "sent" means acknowledged: a document the broker did not take is an error, never a count
        return Err(ProduceError::Undelivered { failed: summary.failed, total, errors: summary.errors });
    }
    Ok(summary)
}

fn tally(s: &mut ProduceSummary, r: Result<rdkafka::producer::future_producer::OwnedDeliveryResult, futures::channel::oneshot::Canceled>, progress: &ProgressSink) {
    match r {
        Ok(Ok(_)) => s.sent += 1,
        Ok(Err((e, _))) => {
            s.failed += 1;
            *s.errors.entry(e.to_string()).or_default() += 1;
            tracing::warn!(error = %e, "document not delivered");
        }
        Err(e) => {
            s.failed += 1;
            *s.errors.entry(e.to_string()).or_default() += 1;
            tracing::warn!(error = %e, "document not delivered");
        }
    }
    report(progress, Progress::Advance(1));
}

#[cfg(test)]
mod tests {
    use super::{client_for, clients};

    #[test]
    fn a_pool_gets_a_client_per_core_unless_told() {
        let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
        assert_eq!(clients(None, Some(256), false), cores);
        assert_eq!(clients(None, None, false), 1);
        assert_eq!(clients(None, Some(0), false), 1);
        assert_eq!(clients(None, Some(256), true), 1, "files are not pooled");
        assert_eq!(clients(Some(3), None, true), 3);
        assert_eq!(clients(Some(1), Some(256), false), 1);
    }

    #[test]
    fn one_key_always_goes_through_one_client_and_keys_spread_over_all() {
        assert_eq!(client_for(b"doc-1", 0), 0);
        assert_eq!(client_for(b"doc-1", 1), 0);
        let mut per_client = [0usize; 3];
        for i in 0..300 {
            let key = format!("doc-42-{i:08}");
            let c = client_for(key.as_bytes(), 3);
            assert_eq!(c, client_for(key.as_bytes(), 3), "the same key, the same client");
            per_client[c] += 1;
        }
        assert!(per_client.iter().all(|&n| n > 60), "300 keys over 3 clients: {per_client:?}");
    }
}
