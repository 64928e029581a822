//! Topic creation through the Kafka admin API, from the topic registry ([`super::topics`]).
//! Existing topics are left untouched (their partition count and configs are the operator's);
//! missing ones are created with the configured partitions and retention, or compacted where the
//! registry says so.

use std::time::Duration;

use rdkafka::{
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    types::RDKafkaErrorCode,
};

use super::{topics::REGISTRY, KafkaError};
use crate::config::{KafkaConfig, TopicsConfig};

/// Creates the project's topics that do not exist yet. Returns the names created.
pub async fn ensure_topics(brokers: &str, kafka: &KafkaConfig, topics: &TopicsConfig) -> Result<Vec<String>, KafkaError> {
    let specs: Vec<(String, i32, bool)> = REGISTRY.iter().map(|s| (topics.name(s.role).to_string(), s.partition_count(topics), s.compacted)).collect();
    let created = create(brokers, kafka, topics, &specs).await?;
    if !created.is_empty() {
        tracing::info!(?created, "topics created");
    }
    Ok(created)
}

/// Creates the named topics that do not exist yet (replay and backfill outputs), with the configured
/// partitions and retention; those listed in `compacted` are compacted instead. Blocking.
pub fn ensure_named(brokers: &str, kafka: &KafkaConfig, topics: &TopicsConfig, names: &[String], compacted: &[String]) -> Result<Vec<String>, KafkaError> {
    let specs: Vec<(String, i32, bool)> = names.iter().map(|t| (t.clone(), topics.partitions, compacted.contains(t))).collect();
    futures::executor::block_on(create(brokers, kafka, topics, &specs))
}

async fn create(brokers: &str, kafka: &KafkaConfig, topics: &TopicsConfig, specs: &[(String, i32, bool)]) -> Result<Vec<String>, KafkaError> {
    let admin: AdminClient<DefaultClientContext> = super::client_config(brokers, &kafka.librdkafka).create().map_err(KafkaError::client(format!("admin client for {brokers}")))?;
    let retention_ms = (topics.retention_hours as u64 * 3_600_000).to_string();
    let new: Vec<NewTopic> = specs
        .iter()
        .map(|(name, partitions, compacted)| {
            let n = NewTopic::new(name, *partitions, TopicReplication::Fixed(topics.replication_factor));
            if *compacted {
                n.set("cleanup.policy", "compact")
            } else {
                n.set("retention.ms", &retention_ms)
            }
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))).request_timeout(Some(Duration::from_secs(30)));
    let results = admin.create_topics(&new, &opts).await.map_err(KafkaError::broker(format!("creating topics on {brokers}")))?;
    let mut out = Vec::new();
    for r in results {
        match r {
            Ok(name) => out.push(name),
            // one that already exists is fine; any other error is not
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => return Err(KafkaError::Broker { what: format!("cannot create topic {name}"), source: rdkafka::error::KafkaError::AdminOp(code) }),
        }
    }
    Ok(out)
}
