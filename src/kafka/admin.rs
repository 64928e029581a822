//! Topic creation through the Kafka admin API. Existing topics are left untouched (their partition
//! count and configs are the operator's); missing ones are created with the configured partitions,
//! retention, and compaction for the decisions topic.

use std::time::Duration;

use rdkafka::{
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    types::RDKafkaErrorCode,
};

use crate::config::{KafkaConfig, TopicsConfig};

/// Creates the project's topics that do not exist yet. Returns the names created.
pub async fn ensure_topics(brokers: &str, kafka: &KafkaConfig, topics: &TopicsConfig) -> Result<Vec<String>, String> {
    let admin: AdminClient<DefaultClientContext> =
        super::client_config(brokers, &kafka.librdkafka).create().map_err(|e| format!("cannot create admin client for {brokers}: {e}"))?;
    let retention_ms = (topics.retention_hours as u64 * 3_600_000).to_string();
    let data_topics = [&topics.documents, &topics.inference, &topics.documents_dlq, &topics.feedback, &topics.metrics, &topics.alerts, &topics.commands];
    let mut new: Vec<NewTopic> = data_topics
        .iter()
        .map(|t| NewTopic::new(t, topics.partitions, TopicReplication::Fixed(topics.replication_factor)).set("retention.ms", &retention_ms))
        .collect();
    // Rollout state is event-sourced from this topic: keep the latest decision per rollout forever.
    new.push(NewTopic::new(&topics.decisions, 1, TopicReplication::Fixed(topics.replication_factor)).set("cleanup.policy", "compact"));
    // Monitor state replication; its single partition is also what the monitor processes elect a leader on.
    new.push(NewTopic::new(&topics.monitor_changelog, 1, TopicReplication::Fixed(topics.replication_factor)).set("cleanup.policy", "compact"));
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))).request_timeout(Some(Duration::from_secs(30)));
    let results = admin.create_topics(&new, &opts).await.map_err(|e| format!("creating topics on {brokers} failed: {e}"))?;
    let created = created(results)?;
    if !created.is_empty() {
        tracing::info!(?created, "topics created");
    }
    Ok(created)
}

/// Creates the named topics that do not exist yet (replay and backfill outputs), with the configured
/// partitions and retention; those listed in `compacted` are compacted instead. Blocking.
pub fn ensure_named(brokers: &str, kafka: &KafkaConfig, topics: &TopicsConfig, names: &[String], compacted: &[String]) -> Result<Vec<String>, String> {
    let admin: AdminClient<DefaultClientContext> =
        super::client_config(brokers, &kafka.librdkafka).create().map_err(|e| format!("cannot create admin client for {brokers}: {e}"))?;
    let retention_ms = (topics.retention_hours as u64 * 3_600_000).to_string();
    let new: Vec<NewTopic> = names
        .iter()
        .map(|t| {
            let n = NewTopic::new(t, topics.partitions, TopicReplication::Fixed(topics.replication_factor));
            if compacted.contains(t) {
                n.set("cleanup.policy", "compact")
            } else {
                n.set("retention.ms", &retention_ms)
            }
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))).request_timeout(Some(Duration::from_secs(30)));
    let results = futures::executor::block_on(admin.create_topics(&new, &opts)).map_err(|e| format!("creating topics on {brokers} failed: {e}"))?;
    created(results)
}

/// Names of the topics created; one that already existed is fine, any other error is not.
fn created(results: Vec<rdkafka::admin::TopicResult>) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for r in results {
        match r {
            Ok(name) => out.push(name),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => return Err(format!("cannot create topic {name}: {code}")),
        }
    }
    Ok(out)
}
