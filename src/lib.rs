//! payslip-stream: a Kafka stream processor that runs ONNX Runtime inference on payslip documents
//! and operates the models: windowed metrics, alerts, and phased rollouts of new versions.
//!
//! ```text
//! producers ─► payslip.documents.v1 ─► [infer stage: infer/] ─────► payslip.inference.v1 ─► [monitor stage: monitor/]
//!                  (Avro / JSON)        decode ─ route ─ batch ─ ONNX     one result per document    RocksDB windows, alert rules,
//!                       │                       ▲                                                   rollout controller (rollout/)
//!                       │                       │ canary split                payslip.feedback.v1 ─►   │
//!                       └─ bad input ─► payslip.documents.dlq.v1              litert.rollout.commands ─►│
//!                                               │                                                      ├─► litert.metrics.v1
//!                                               └──── litert.rollout.decisions.v1 (compacted) ◄────────┼─► litert.alerts.v1
//!                                                                                                      └─► changelog (standby)
//! replay/: recorded ranges back through either stage (backfill, recomputed windows, DLQ re-drive)
//! ```
//!
//! Module map:
//! - wiring: [`pipeline`] (what `run` starts: brokers, topics, models, stages, shutdown), [`config`]
//!   (pipeline YAML, validated once), [`telemetry`] (logs and counters), [`malloc`] (glibc's
//!   settings, set before any thread), [`progress`] (progress events
//!   for long operations);
//! - stages: [`infer`] (the infer stage: batching, delivery/acks, dead letters), [`monitor`] (the
//!   monitor stage: windows, alerts, outbox, changelog), [`rollout`] (config, records, controller,
//!   criteria, stats, routing, ops), [`ops`] (the operations HTTP API: health, readiness,
//!   Prometheus metrics, rollout commands with token roles);
//! - parts: [`kafka`] (configs, sending, bounded reads, the topic registry, admin, embedded broker),
//!   [`codec`] (Avro/JSON), [`document`] (records), [`inference`] (model registry, ONNX Runtime
//!   sessions and providers, preprocessing), [`window`] (event-time windows and aggregates),
//!   [`state`] (RocksDB store), [`alert`] (rules and lifecycle);
//! - tools: [`replay`] (backfill, monitor replay, DLQ re-drive), [`report`] (daily and weekly
//!   reports with charts), [`produce`] (load generator),
//!   [`inspect`] (topic reader), [`synth`] (synthetic payslips), [`dataset`] (training dump), [`demo`]
//!   (the README's main job).
//!
//! Queues: the infer stage holds at most one batch (`batching.max_batch` documents) in inference and
//! at most 8 batches awaiting delivery reports; beyond that the consumer stops pulling (backpressure).
//! The monitor applies at most `monitor.max_batch` messages per state write and waits for each
//! batch's outputs to be confirmed before polling again.

pub mod alert;
pub mod codec;
pub mod config;
pub mod dataset;
pub mod demo;
pub mod document;
pub mod infer;
pub mod inference;
pub mod inspect;
pub mod kafka;
pub mod malloc;
pub mod monitor;
pub mod ops;
pub mod pipeline;
pub mod produce;
pub mod progress;
pub mod replay;
pub mod report;
pub mod rollout;
pub mod state;
pub mod synth;
pub mod telemetry;
pub mod window;
