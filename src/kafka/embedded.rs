//! The zero-setup default: librdkafka's in-process mock cluster, speaking the Kafka protocol on a
//! local port so `kcat -b ADDR -L` works. For trying the program only: it keeps data in memory,
//! lacks offsets-for-times, and rebalances slowly. Never used by the integration tests, which run a
//! real Apache Kafka broker.

use rdkafka::{mocking::MockCluster, producer::DefaultProducerContext};

use crate::config::TopicsConfig;

/// A running in-process broker; dropped = gone, with all its data.
pub struct EmbeddedBroker {
    cluster: MockCluster<'static, DefaultProducerContext>,
}

impl EmbeddedBroker {
    pub fn start(topics: &TopicsConfig) -> Result<Self, String> {
        let cluster = MockCluster::new(1).map_err(|e| format!("cannot start the embedded broker: {e}"))?;
        for t in [&topics.documents, &topics.inference, &topics.documents_dlq, &topics.feedback, &topics.metrics, &topics.alerts, &topics.commands, &topics.decisions, &topics.monitor_changelog] {
            cluster.create_topic(t, topics.partitions, 1).map_err(|e| format!("embedded broker: cannot create {t}: {e}"))?;
        }
        Ok(Self { cluster })
    }

    pub fn bootstrap_servers(&self) -> String {
        self.cluster.bootstrap_servers()
    }
}
