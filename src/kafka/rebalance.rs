//! A consumer context whose rebalance callback never asks librdkafka for the rebalance protocol.
//!
//! rust-rdkafka 0.39's default `ConsumerContext::rebalance` calls `rd_kafka_rebalance_protocol()`
//! on every assignment. That call waits without a timeout on the consumer group's queue, and when
//! a consumer is closed while an assignment event is still pending (a stage stopped right after it
//! subscribed) the wait never ends: the process hangs in the consumer's drop (seen with gdb in a
//! test that stops the infer stage during start-up). This context knows the protocol from the
//! configuration (`partition.assignment.strategy`: cooperative-sticky is incremental, everything
//! else eager) and assigns or unassigns directly; it does nothing else.

use rdkafka::{
    client::ClientContext,
    consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance},
    error::KafkaResult,
    types::RDKafkaRespErr,
    ClientConfig, TopicPartitionList,
};

/// See the module doc.
#[derive(Debug, Clone, Copy, Default)]
pub struct KnownProtocol {
    cooperative: bool,
}

impl KnownProtocol {
    /// The protocol `cfg` asks for.
    pub fn of(cfg: &ClientConfig) -> Self {
        Self { cooperative: cfg.get("partition.assignment.strategy").is_some_and(|s| s.contains("cooperative")) }
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
    }
}
