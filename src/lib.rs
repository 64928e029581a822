//! payslip-stream: a Kafka stream processor that runs ONNX Runtime inference on payslip documents
//! and operates the models.
//!
//! ```text
//! producers ─► payslip.documents.v1 ─► [infer stage: pipeline.rs] ─► payslip.inference.v1 ─► [monitor stage: monitor/]
//!                   (Avro / JSON)         decode ─ batch ─ ONNX Runtime     one result per document      RocksDB windows, alert rules
//!                        │                                                        payslip.feedback.v1 ─►      │
//!                        └─ bad input ─► payslip.documents.dlq.v1                               litert.metrics.v1 ◄─┤
//!                                                                                                litert.alerts.v1 ◄─┘
//! ```
//!
//! Module map: [`config`] (pipeline YAML, validated once), [`document`] (records), [`codec`] (Avro/JSON),
//! [`kafka`] (clients, admin, embedded broker, headers), [`inference`] (model registry, ONNX Runtime
//! sessions and providers, preprocessing), [`pipeline`] (the infer stage), [`window`] (event-time
//! windows and aggregates), [`state`] (RocksDB store), [`alert`] (rules and lifecycle), [`monitor`]
//! (the monitor stage), [`synth`] (synthetic payslips), [`dataset`] (training dump), [`produce`]
//! (load generator), [`inspect`] (topic reader), [`demo`] (the README's main job), [`telemetry`]
//! (logs and counters).
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
pub mod inference;
pub mod inspect;
pub mod kafka;
pub mod monitor;
pub mod pipeline;
pub mod produce;
pub mod replay;
pub mod rollout;
pub mod state;
pub mod synth;
pub mod telemetry;
pub mod window;
