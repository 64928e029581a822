//! The topic registry: every topic the project reads or writes, with its role, the config key that
//! names it, the alias `inspect -t` accepts, how many partitions it is created with, whether it is
//! compacted, and the record it carries. Topic creation ([`super::admin`]), config validation,
//! `inspect` aliases, prefixes for isolated runs and the embedded broker all read this one table.

use crate::config::TopicsConfig;

/// What a topic is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TopicRole {
    Documents,
    Inference,
    DocumentsDlq,
    Feedback,
    Metrics,
    Alerts,
    Decisions,
    Commands,
    MonitorChangelog,
    MonitorDlq,
    Models,
    MonitorPartials,
}

/// How many partitions a topic is created with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Partitions {
    /// `topics.partitions` of the config.
    Configured,
    /// Exactly one (a total order is part of the topic's meaning).
    Single,
    /// `monitor.closing_partitions`: one per partition of the monitor's closing stage (its
    /// changelog and the partials it merges).
    Closing,
}

/// One row of the registry.
#[derive(Debug, Clone, Copy)]
pub struct TopicSpec {
    pub role: TopicRole,
    /// Key under `topics:` in the pipeline config.
    pub config_key: &'static str,
    /// Short name accepted by `inspect -t`.
    pub alias: &'static str,
    pub partitions: Partitions,
    /// Compacted (latest value per key kept forever) instead of deleted after the retention.
    pub compacted: bool,
    /// Full name of the record schema its values carry.
    pub record: &'static str,
}

/// Every topic of the project.
pub const REGISTRY: [TopicSpec; 12] = [
    TopicSpec { role: TopicRole::Documents, config_key: "documents", alias: "documents", partitions: Partitions::Configured, compacted: false, record: "payslip.v1.PayslipDocument" },
    TopicSpec { role: TopicRole::Inference, config_key: "inference", alias: "inference", partitions: Partitions::Configured, compacted: false, record: "payslip.v1.InferenceResult" },
    TopicSpec { role: TopicRole::DocumentsDlq, config_key: "documents_dlq", alias: "dlq", partitions: Partitions::Configured, compacted: false, record: "payslip.v1.PayslipDocument" },
    TopicSpec { role: TopicRole::Feedback, config_key: "feedback", alias: "feedback", partitions: Partitions::Configured, compacted: false, record: "payslip.v1.DocumentFeedback" },
    TopicSpec { role: TopicRole::Metrics, config_key: "metrics", alias: "metrics", partitions: Partitions::Configured, compacted: false, record: "litert.v1.WindowMetrics" },
    TopicSpec { role: TopicRole::Alerts, config_key: "alerts", alias: "alerts", partitions: Partitions::Configured, compacted: false, record: "litert.v1.Alert" },
    // Rollout state is event-sourced from this topic: keep the latest decision per rollout forever.
    TopicSpec { role: TopicRole::Decisions, config_key: "decisions", alias: "decisions", partitions: Partitions::Single, compacted: true, record: "litert.v1.RolloutDecision" },
    TopicSpec { role: TopicRole::Commands, config_key: "commands", alias: "commands", partitions: Partitions::Configured, compacted: false, record: "litert.v1.RolloutCommand" },
    // Monitor state replication; its single partition is also what the monitor processes elect a leader on.
    TopicSpec { role: TopicRole::MonitorChangelog, config_key: "monitor_changelog", alias: "changelog", partitions: Partitions::Closing, compacted: true, record: "" },
    // Results, feedback and commands the monitor could not decode: original bytes and headers plus the reason.
    TopicSpec { role: TopicRole::MonitorDlq, config_key: "monitor_dlq", alias: "monitor-dlq", partitions: Partitions::Configured, compacted: false, record: "" },
    // The model registry: the latest announcement of each model version, kept forever.
    TopicSpec { role: TopicRole::Models, config_key: "models", alias: "models", partitions: Partitions::Single, compacted: true, record: "litert.v1.ModelAnnouncement" },
    // Scale-out (`monitor.scale_out`): partial window aggregates from the pre-aggregation members to
    // the closing stage; one partition, because the closing stage is one leader (see src/monitor/pre.rs).
    TopicSpec { role: TopicRole::MonitorPartials, config_key: "monitor_partials", alias: "partials", partitions: Partitions::Closing, compacted: false, record: "" },
];

impl TopicSpec {
    pub fn of(role: TopicRole) -> &'static TopicSpec {
        REGISTRY.iter().find(|s| s.role == role).expect("every role is in the registry")
    }

    /// Partitions to create it with under `topics` and `monitor.closing_partitions`.
    pub fn partition_count(&self, topics: &TopicsConfig, closing: u32) -> i32 {
        match self.partitions {
            Partitions::Configured => topics.partitions,
            Partitions::Single => 1,
            Partitions::Closing => closing.max(1) as i32,
        }
    }
}

impl TopicsConfig {
    /// The configured name of the topic with `role`.
    pub fn name(&self, role: TopicRole) -> &str {
        match role {
            TopicRole::Documents => &self.documents,
            TopicRole::Inference => &self.inference,
            TopicRole::DocumentsDlq => &self.documents_dlq,
            TopicRole::Feedback => &self.feedback,
            TopicRole::Metrics => &self.metrics,
            TopicRole::Alerts => &self.alerts,
            TopicRole::Decisions => &self.decisions,
            TopicRole::Commands => &self.commands,
            TopicRole::MonitorChangelog => &self.monitor_changelog,
            TopicRole::MonitorDlq => &self.monitor_dlq,
            TopicRole::Models => &self.models,
            TopicRole::MonitorPartials => &self.monitor_partials,
        }
    }

    fn name_mut(&mut self, role: TopicRole) -> &mut String {
        match role {
            TopicRole::Documents => &mut self.documents,
            TopicRole::Inference => &mut self.inference,
            TopicRole::DocumentsDlq => &mut self.documents_dlq,
            TopicRole::Feedback => &mut self.feedback,
            TopicRole::Metrics => &mut self.metrics,
            TopicRole::Alerts => &mut self.alerts,
            TopicRole::Decisions => &mut self.decisions,
            TopicRole::Commands => &mut self.commands,
            TopicRole::MonitorChangelog => &mut self.monitor_changelog,
            TopicRole::MonitorDlq => &mut self.monitor_dlq,
            TopicRole::Models => &mut self.models,
            TopicRole::MonitorPartials => &mut self.monitor_partials,
        }
    }

    /// Every topic with its configured name, in registry order.
    pub fn all(&self) -> impl Iterator<Item = (&'static TopicSpec, &str)> {
        REGISTRY.iter().map(move |s| (s, self.name(s.role)))
    }

    /// Prefixes every topic name (tests use random prefixes).
    pub fn with_prefix(mut self, prefix: &str) -> Self {
        for s in &REGISTRY {
            let t = self.name_mut(s.role);
            *t = format!("{prefix}{t}");
        }
        self
    }

    /// A topic name for `inspect -t`: a registry alias becomes the configured name; anything else
    /// is taken as a topic name as it is.
    pub fn resolve_alias<'a>(&'a self, name: &'a str) -> &'a str {
        REGISTRY.iter().find(|s| s.alias == name).map(|s| self.name(s.role)).unwrap_or(name)
    }

    /// Every name is a valid Kafka topic name and no two roles share a topic; the error names the
    /// config key.
    pub fn check_names(&self) -> Result<(), (String, String)> {
        let mut seen: Vec<(&str, &str)> = Vec::new();
        for (spec, name) in self.all() {
            let key = format!("topics.{}", spec.config_key);
            if name.is_empty() || name.len() > 249 || !name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) {
                return Err((key, format!("topic name {name:?} is not a valid Kafka topic name (letters, digits, '.', '_', '-', at most 249)")));
            }
            if let Some((other, _)) = seen.iter().find(|(_, n)| *n == name) {
                return Err((key, format!("topic {name:?} is used for two purposes (also topics.{other})")));
            }
            seen.push((spec.config_key, name));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Record;

    #[test]
    fn every_role_is_registered_once_with_a_record_this_build_knows() {
        let t = TopicsConfig::default();
        let names: std::collections::BTreeSet<&str> = t.all().map(|(_, n)| n).collect();
        assert_eq!(names.len(), REGISTRY.len());
        let known = [
            crate::document::PayslipDocument::SCHEMA_NAME,
            crate::document::InferenceResult::SCHEMA_NAME,
            crate::document::DocumentFeedback::SCHEMA_NAME,
            crate::monitor::records::WindowMetrics::SCHEMA_NAME,
            crate::alert::AlertEvent::SCHEMA_NAME,
            crate::rollout::RolloutDecision::SCHEMA_NAME,
            crate::rollout::RolloutCommand::SCHEMA_NAME,
            crate::inference::announce::ModelAnnouncement::SCHEMA_NAME,
        ];
        for s in REGISTRY.iter().filter(|s| !s.record.is_empty()) {
            assert!(known.contains(&s.record), "{} carries unknown record {}", s.config_key, s.record);
        }
        assert_eq!(t.resolve_alias("dlq"), "payslip.documents.dlq.v1");
        assert_eq!(t.resolve_alias("my.topic"), "my.topic");
    }

    #[test]
    fn names_are_checked_for_every_role() {
        let mut t = TopicsConfig::default();
        t.commands = t.alerts.clone();
        let (key, msg) = t.check_names().unwrap_err();
        assert_eq!(key, "topics.commands");
        assert!(msg.contains("two purposes"), "{msg}");
        let mut t = TopicsConfig::default();
        t.monitor_changelog = "bad name".into();
        assert_eq!(t.check_names().unwrap_err().0, "topics.monitor_changelog");
    }
}
