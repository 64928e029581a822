//! A consumer context whose rebalance callback never asks librdkafka for the rebalance protocol.
//!
//! rust-rdkafka 0.39's default `ConsumerContext::rebalance` calls `rd_kafka_rebalance_protocol()`
//! on every assignment. That call waits without a timeout on the consumer group's queue, and when
//! a consumer is closed while an assignment event is still pending (a stage stopped right after it
//! subscribed) the wait never ends: the process hangs in the consumer's drop (seen with gdb in a
//! test that stops the infer stage during start-up). This context knows the protocol from the
//! configuration (`partition.assignment.strategy`: cooperative-sticky is incremental, everything
//! else eager) and assigns or unassigns directly; it does nothing else.
//!
//! That is not the whole story: closing a consumer whose group join is still under way can also
//! block in the assign or unassign call made from the revoke event that the close delivers (seen
//! with gdb in CI: `drop` → `poll` → `rebalance` → `rd_kafka_incremental_unassign`, waiting for a
//! reply that never comes). [`close_within`] therefore closes a consumer on a thread of its own
//! and gives up waiting after a limit: the stage stops, the broker drops the member after its
//! session timeout, and nothing the stage committed is affected (offsets are committed before).

use rdkafka::{
    client::ClientContext,
    consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance},
    error::KafkaResult,
    types::RDKafkaRespErr,
    ClientConfig, TopicPartitionList,
};

/// See the module doc.
#[derive(Debug, Clone, Default)]
pub struct KnownProtocol {
    cooperative: bool,
    /// Counts assignments and revocations, for a consumer that must notice them between polls.
    changes: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
}

impl KnownProtocol {
    /// The protocol `cfg` asks for.
    pub fn of(cfg: &ClientConfig) -> Self {
        Self { cooperative: cfg.get("partition.assignment.strategy").is_some_and(|s| s.contains("cooperative")), changes: None }
    }

    /// Also counts every assignment and revocation into `changes`.
    pub fn counting(mut self, changes: std::sync::Arc<std::sync::atomic::AtomicU64>) -> Self {
        self.changes = Some(changes);
        self
    }
}

impl ClientContext for KnownProtocol {}

impl ConsumerContext for KnownProtocol {
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        let outcome: KafkaResult<()> = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.pre_rebalance(consumer, &Rebalance::Assign(tpl));
                if self.cooperative { consumer.incremental_assign(tpl) } else { consumer.assign(tpl) }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.pre_rebalance(consumer, &Rebalance::Revoke(tpl));
                if self.cooperative { consumer.incremental_unassign(tpl) } else { consumer.unassign() }
            }
            other => {
                tracing::warn!(error = ?other, "rebalance error; unassigning");
                if self.cooperative { consumer.incremental_unassign(tpl) } else { consumer.unassign() }
            }
        };
        if let Err(e) = outcome {
            tracing::warn!(error = %e, "applying a rebalance failed");
        }
        if let Some(c) = &self.changes {
            c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

/// Drops (closes) `consumer` on a thread of its own and waits up to `limit` for it. Returns whether
/// it closed in time; if not, the thread is left behind blocked, with a warning naming `what`.
pub fn close_within<T: Send + 'static>(consumer: T, limit: std::time::Duration, what: &str) -> bool {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let spawned = std::thread::Builder::new().name("consumer-close".into()).spawn(move || {
        drop(consumer);
        let _ = tx.send(());
    });
    if spawned.is_err() {
        tracing::warn!(consumer = what, "cannot start a thread to close the consumer; leaving it open");
        return false;
    }
    match rx.recv_timeout(limit) {
        Ok(()) => true,
        Err(_) => {
            tracing::warn!(consumer = what, limit_s = limit.as_secs(), "the consumer did not leave its group in time (librdkafka blocked in a rebalance during close); stopping without it, the broker drops the member after its session timeout");
            false
        }
    }
}
