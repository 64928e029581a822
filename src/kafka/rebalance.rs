//! A consumer context whose rebalance callback never asks librdkafka for the rebalance protocol.
//!
//! rust-rdkafka 0.39's default `ConsumerContext::rebalance` calls `rd_kafka_rebalance_protocol()`
//! on every assignment. That call waits without a timeout on the consumer group's queue, and when
//! a consumer is closed while an assignment event is still pending (a stage stopped right after it
//! subscribed) the wait never ends: the process hangs in the consumer's drop (seen with gdb in a
//! test that stops the infer stage during start-up). This context knows the protocol from the
//! configuration (`partition.assignment.strategy`: cooperative-sticky is incremental, everything
//! else eager) and assigns or unassigns directly. The one other thing it may do, when its owner
//! names its subscription ([`KnownProtocol::expecting`]), is leave out partitions of other topics
//! (a static member's stale assignment) and keep them for the owner, which then joins again.
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
    /// The topics this consumer subscribes to, when it checks its assignments against them.
    expected: Option<std::sync::Arc<[String]>>,
    /// Partitions of other topics an assignment offered, not taken (see [`Self::expecting`]).
    foreign: std::sync::Arc<std::sync::Mutex<Vec<(String, i32)>>>,
}

impl KnownProtocol {
    /// The protocol `cfg` asks for.
    pub fn of(cfg: &ClientConfig) -> Self {
        Self { cooperative: cfg.get("partition.assignment.strategy").is_some_and(|s| s.contains("cooperative")), changes: None, expected: None, foreign: Default::default() }
    }

    /// Takes only partitions of `topics` from an assignment. With the classic group protocol, a
    /// static member (`group.instance.id`) that rejoins a stable group is handed its previous
    /// assignment as it was, even when its subscription changed (Kafka's coordinator compares only
    /// the protocol's name on that path: KAFKA-12759): a stage restarted with the same group and
    /// instance id but another documents topic would otherwise read the old topic and never the
    /// new one, silently. The partitions not taken are kept for [`Self::take_foreign`], so the
    /// owner can make the group assign again.
    pub fn expecting(mut self, topics: &[&str]) -> Self {
        self.expected = Some(topics.iter().map(|t| t.to_string()).collect());
        self
    }

    /// Partitions of topics this consumer does not subscribe to that assignments offered since the
    /// last call (none unless [`Self::expecting`] was set).
    pub fn take_foreign(&self) -> Vec<(String, i32)> {
        std::mem::take(&mut *self.foreign.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Joins the group again when an assignment since the last call offered partitions of other
    /// topics (see [`Self::expecting`]): unsubscribes and subscribes to the expected topics, which
    /// makes the coordinator assign afresh. Owners call it between polls; returns whether it did.
    pub fn rejoin_if_stale<C: Consumer<KnownProtocol>>(consumer: &C) -> bool {
        let context = consumer.context();
        let Some(expected) = context.expected.clone() else { return false };
        if context.take_foreign().is_empty() {
            return false;
        }
        consumer.unsubscribe();
        let topics: Vec<&str> = expected.iter().map(String::as_str).collect();
        if let Err(e) = consumer.subscribe(&topics) {
            tracing::error!(?topics, error = %e, "cannot subscribe again after a stale assignment");
        }
        true
    }

    /// `tpl` without partitions of topics outside the subscription; those are recorded when `record`.
    fn ours(&self, tpl: &TopicPartitionList, record: bool) -> Option<TopicPartitionList> {
        let expected = self.expected.as_ref()?;
        let (mut ours, mut foreign) = (TopicPartitionList::new(), Vec::new());
        for e in tpl.elements() {
            if expected.iter().any(|t| t == e.topic()) {
                let _ = ours.add_partition_offset(e.topic(), e.partition(), e.offset());
            } else {
                foreign.push((e.topic().to_string(), e.partition()));
            }
        }
        if foreign.is_empty() {
            return None;
        }
        if record {
            tracing::error!(
                foreign = ?foreign, subscribed = ?expected,
                "the group assigned partitions of a topic this consumer does not subscribe to (a static member's assignment from before its subscription changed); not taking them, rejoining the group"
            );
            self.foreign.lock().unwrap_or_else(|p| p.into_inner()).extend(foreign);
        }
        Some(ours)
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
                let ours = self.ours(tpl, true);
                let tpl = ours.as_ref().unwrap_or(tpl);
                self.pre_rebalance(consumer, &Rebalance::Assign(tpl));
                if self.cooperative { consumer.incremental_assign(tpl) } else { consumer.assign(tpl) }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                // partitions never taken are not given back either
                let ours = self.ours(tpl, false);
                let tpl = ours.as_ref().unwrap_or(tpl);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn tpl(parts: &[(&str, i32)]) -> TopicPartitionList {
        let mut t = TopicPartitionList::new();
        for (topic, p) in parts {
            t.add_partition(topic, *p);
        }
        t
    }

    fn names(t: &TopicPartitionList) -> Vec<(String, i32)> {
        t.elements().iter().map(|e| (e.topic().to_string(), e.partition())).collect()
    }

    #[test]
    fn an_assignment_of_other_topics_is_split_off_and_reported_once() {
        let p = KnownProtocol::default().expecting(&["docs", "feedback"]);
        let offered = tpl(&[("old.docs", 0), ("docs", 1), ("feedback", 1), ("old.docs", 2)]);
        let ours = p.ours(&offered, true).expect("some partitions are foreign");
        assert_eq!(names(&ours), vec![("docs".to_string(), 1), ("feedback".to_string(), 1)]);
        assert_eq!(p.take_foreign(), vec![("old.docs".to_string(), 0), ("old.docs".to_string(), 2)]);
        assert!(p.take_foreign().is_empty(), "taken once");
        // a revocation leaves out what was never taken, without reporting it again
        assert!(p.ours(&offered, false).is_some());
        assert!(p.take_foreign().is_empty());
    }

    #[test]
    fn an_assignment_of_the_subscription_or_an_unchecked_consumer_is_taken_as_it_is() {
        let p = KnownProtocol::default().expecting(&["docs"]);
        assert!(p.ours(&tpl(&[("docs", 0), ("docs", 1)]), true).is_none());
        assert!(p.take_foreign().is_empty());
        assert!(KnownProtocol::default().ours(&tpl(&[("anything", 0)]), true).is_none());
    }
}
