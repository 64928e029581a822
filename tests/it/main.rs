//! Integration tests: one binary, every test against the real Apache Kafka broker that
//! `scripts/test` (and so `.ci/run`) starts, with random topic and group names per test.
//! `PAYSLIP_TEST_BROKERS` must name it; `ORT_DYLIB_PATH` must point at ONNX Runtime.

mod support;

mod accuracy;
mod bad_input;
mod crash;
mod kcat;
mod models;
mod monitor;
mod ops;
mod outage;
mod replay;
mod report;
mod rollout;
mod security;
mod counts;
