//! payslip-stream: a Kafka stream processor that runs ONNX Runtime inference on payslip documents
//! and operates the models.
//!
//! ```text
//! producers ─► payslip.documents.v1 ─► [infer stage: pipeline.rs] ─► payslip.inference.v1
//!                   (Avro / JSON)         decode ─ batch ─ ONNX Runtime       one result per document
//!                        │
//!                        └─ bad input ─► payslip.documents.dlq.v1 (headers: error class, source position)
//! ```
//!
//! Module map: [`config`] (pipeline YAML, validated once), [`document`] (records), [`codec`] (Avro/JSON),
//! [`kafka`] (clients, admin, embedded broker, headers), [`inference`] (model registry, ONNX Runtime
//! sessions and providers, preprocessing), [`pipeline`] (the infer stage), [`synth`] (synthetic
//! payslips), [`dataset`] (training dump), [`produce`] (load generator), [`inspect`] (topic reader),
//! [`telemetry`] (logs and counters).
//!
//! Queues: the infer stage holds at most one batch (`batching.max_batch` documents) in inference and
//! at most 8 batches awaiting delivery reports; beyond that the consumer stops pulling (backpressure).

pub mod codec;
pub mod config;
pub mod dataset;
pub mod document;
pub mod inference;
pub mod inspect;
pub mod kafka;
pub mod pipeline;
pub mod produce;
pub mod synth;
pub mod telemetry;
