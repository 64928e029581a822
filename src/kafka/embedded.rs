//! The zero-setup broker for trying the program: librdkafka's in-process mock cluster, speaking the
//! Kafka protocol on a local port so `kcat -b ADDR -L` works. It keeps data in memory, lacks
//! offsets-for-times, and rebalances slowly. Never used by the integration tests, which run a real
//! Apache Kafka broker.

use rdkafka::{mocking::MockCluster, producer::DefaultProducerContext};

use super::{topics::REGISTRY, KafkaError};
use crate::config::TopicsConfig;

/// A running in-process broker; dropped = gone, with all its data.
pub struct EmbeddedBroker {
    cluster: MockCluster<'static, DefaultProducerContext>,
}

impl EmbeddedBroker {
    pub fn start(topics: &TopicsConfig) -> Result<Self, KafkaError> {
        let cluster = MockCluster::new(1).map_err(KafkaError::client("the embedded broker"))?;
        for s in &REGISTRY {
            let t = topics.name(s.role);
            cluster.create_topic(t, s.partition_count(topics, 1), 1).map_err(KafkaError::broker(format!("embedded broker: cannot create {t}")))?;
        }
        Ok(Self { cluster })
    }

    pub fn bootstrap_servers(&self) -> String {
        self.cluster.bootstrap_servers()
    }
}
