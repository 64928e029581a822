//! Kafka plumbing, the one way every stage and tool talks to Kafka:
//!
//! - [`config`]: client configurations (the delivery-critical settings in one place; the
//!   `kafka.librdkafka` passthrough applied last);
//! - [`send`]: producing with backpressure (a full local queue is waited out, every other refusal
//!   is a typed [`KafkaError`]) and waiting for delivery reports;
//! - [`read`]: metadata and offsets with retries, and [`read::RangeCursor`] for bounded reads to
//!   end offsets captured at start (compaction gaps and transaction markers handled);
//! - [`range`]: kcat-style positions (`beginning`, `-N`, `s@MS`, RFC 3339) resolved to ranges;
//! - [`topics`]: the topic registry; [`admin`]: topic creation from it;
//! - [`rebalance`]: a consumer context that cannot hang in close (rust-rdkafka 0.39);
//! - [`stats`]: librdkafka's statistics of the stages' producers, kept for `/metrics`;
//! - [`headers`]: readable message headers; [`embedded`]: the in-process broker for trying the
//!   program.

pub mod admin;
pub mod config;
pub mod embedded;
pub mod error;
pub mod headers;
pub mod range;
pub mod read;
pub mod rebalance;
pub mod send;
pub mod stats;
pub mod topics;

pub use config::{client_config, consumer_config, producer_config, producer_config_with, reader_config};
pub use error::KafkaError;
pub use read::{end_reader, offset_at, offset_in, partitions_of, read_to_the_end, watermarks_of, RangeCursor, END_QUERY_TIMEOUT};
pub use send::{delivered, enqueue, enqueue_blocking, released, wait_deliveries, wait_released, Delivered};
pub use topics::{TopicRole, TopicSpec};
