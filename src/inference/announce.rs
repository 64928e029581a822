//! The model registry on Kafka: `litert.models.v1` (compacted, one partition, key `model/version`)
//! announces each published model version; every infer process follows it the way it follows the
//! rollout decisions, so a version published while the processes run can be rolled out without a
//! restart. `models/model_metadata.json` stays the seed of a fresh deployment.
//!
//! `payslip-stream models publish` ([`publish`]) announces a version only after it passed every
//! check a serving process would make and more: the file's sha256, its graph inputs against the
//! preprocessing (a session is built), a test inference whose outputs have the declared shape, and
//! the held-out evaluation where the truth is known (the classifier's format, the text model's
//! lines). A refused file is never announced; the reason is returned. The file is copied into the
//! model repository directory (the directory of `models.metadata`, shared by the processes) under
//! `<model>/<version>.onnx`, and the announcement names that path and its sha256, which every process
//! verifies again before it loads the file.
//!
//! Versions are immutable: an announcement of a version already known with another sha256 is
//! refused by the processes (logged), never applied.

use std::{path::Path, time::Duration};

use serde::{Deserialize, Serialize};

use super::metadata::{sha256_hex, ModelEntry, ModelMetadata, TensorSpec};
use crate::{codec::Record, config::PipelineConfig, document::PayslipDocument};

/// One version on the registry topic (`schemas/model_announcement.avsc`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelAnnouncement {
    pub name: String,
    pub version: String,
    pub role: String,
    pub file: String,
    pub sha256: String,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    pub labels: Vec<String>,
    pub heldout_json: String,
    pub description: String,
    pub published_by: String,
    pub published_at: i64,
}

impl Record for ModelAnnouncement {
    const SCHEMA_NAME: &'static str = "litert.v1.ModelAnnouncement";
    const SCHEMA_TEXT: &'static str = include_str!("../../schemas/model_announcement.avsc");
}

impl ModelAnnouncement {
    /// The record key: `model/version`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.name, self.version)
    }

    pub fn entry(&self) -> ModelEntry {
        ModelEntry {
            name: self.name.clone(),
            version: self.version.clone(),
            role: self.role.clone(),
            file: self.file.clone(),
            sha256: self.sha256.clone(),
            inputs: self.inputs.clone(),
            outputs: self.outputs.clone(),
            labels: self.labels.clone(),
            heldout: serde_json::from_str(&self.heldout_json).unwrap_or_default(),
            description: self.description.clone(),
        }
    }
}

/// Why a version was not published.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("refused, nothing announced: {0}")]
    Refused(String),
    #[error("{0}")]
    Kafka(#[from] crate::kafka::error::KafkaError),
}

/// Held-out documents evaluated at publication (seed `generator_seed_heldout` of the metadata).
const HELDOUT_DOCUMENTS: u64 = 300;

/// Checks `file` as version `version` of `model` and returns its announcement (not yet sent).
/// `figures` are added to the held-out figures measured here (`models optimize`'s comparison with
/// the source version).
pub fn check(cfg: &PipelineConfig, model: &str, version: &str, file: &Path, publisher: &str, figures: &serde_json::Map<String, serde_json::Value>) -> Result<ModelAnnouncement, PublishError> {
    let refused = |m: String| PublishError::Refused(m);
    if !super::MODEL_NAMES.contains(&model) {
        return Err(refused(format!("{model} is not a model this build serves ({:?})", super::MODEL_NAMES)));
    }
    let meta = ModelMetadata::load(&cfg.models.metadata).map_err(|e| refused(e.to_string()))?;
    let bytes = std::fs::read(file).map_err(|e| refused(format!("cannot read {}: {e}", file.display())))?;
    let sha256 = sha256_hex(&bytes);
    if let Some(known) = meta.entry(model, version) {
        if !known.sha256.eq_ignore_ascii_case(&sha256) {
            return Err(refused(format!("{model} {version} already exists with sha256 {}: versions are immutable, publish under a new version", known.sha256)));
        }
    }
    // the same preprocessing feeds every version of a model: its served version's tensors and labels
    let template = cfg.models.serve.get(model).and_then(|v| meta.entry(model, v)).or_else(|| meta.models.iter().find(|m| m.name == model)).ok_or_else(|| refused(format!("no version of {model} in {} to take its input spec and labels from", cfg.models.metadata.display())))?;
    let rel = format!("{model}/{version}.onnx");
    let mut entry = ModelEntry { version: version.into(), role: "candidate".into(), file: rel.clone(), sha256: sha256.clone(), heldout: Default::default(), description: format!("published from {}", file.display()), ..template.clone() };
    // checks on the file where it is: a session, the graph's input, a test inference, held-out figures
    let staged = ModelMetadata { models: vec![ModelEntry { file: file.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default(), ..entry.clone() }], dir: file.parent().map(Path::to_path_buf).unwrap_or_default(), ..meta.clone() };
    let registry = super::ModelRegistry::with_metadata(staged, &cfg.models, &cfg.inference);
    let generator = crate::synth::Generator::new(crate::synth::GeneratorConfig { seed: meta.generator_seed_heldout, ..Default::default() });
    let docs: Vec<PayslipDocument> = (0..HELDOUT_DOCUMENTS).map(|i| generator.document(i).document).collect();
    let check = registry.check_isolated(model, version, &docs[0]);
    if !check.ok {
        return Err(refused(format!("{model} {version} failed its checks: {}", check.error.unwrap_or_default())));
    }
    entry.heldout = registry.evaluate(model, version, &docs).map_err(|e| refused(format!("held-out evaluation failed: {e}")))?;
    entry.heldout.extend(figures.clone());
    // into the model repository, under the name the announcement gives
    let dest = meta.dir.join(&rel);
    if std::fs::read(&dest).map(|b| sha256_hex(&b) != sha256).unwrap_or(true) {
        if let Some(dir) = dest.parent() {
            std::fs::create_dir_all(dir).map_err(|e| refused(format!("cannot create {}: {e}", dir.display())))?;
        }
        let tmp = dest.with_extension("onnx.tmp");
        std::fs::write(&tmp, &bytes).and_then(|()| std::fs::rename(&tmp, &dest)).map_err(|e| refused(format!("cannot write {}: {e}", dest.display())))?;
    }
    Ok(ModelAnnouncement {
        name: entry.name,
        version: entry.version,
        role: entry.role,
        file: entry.file,
        sha256,
        inputs: entry.inputs,
        outputs: entry.outputs,
        labels: entry.labels,
        heldout_json: serde_json::to_string(&entry.heldout).unwrap_or_else(|_| "{}".into()),
        description: entry.description,
        published_by: publisher.into(),
        published_at: chrono::Utc::now().timestamp_millis(),
    })
}

/// Checks and announces: the record is on the topic (acknowledged by every in-sync replica) when
/// this returns.
pub async fn publish(cfg: &PipelineConfig, brokers: &str, model: &str, version: &str, file: &Path, publisher: &str) -> Result<ModelAnnouncement, PublishError> {
    publish_with(cfg, brokers, model, version, file, publisher, Default::default()).await
}

/// [`publish`] with figures measured elsewhere added to the announcement's held-out figures.
pub async fn publish_with(cfg: &PipelineConfig, brokers: &str, model: &str, version: &str, file: &Path, publisher: &str, figures: serde_json::Map<String, serde_json::Value>) -> Result<ModelAnnouncement, PublishError> {
    let a = {
        let (cfg, model, version, file, publisher) = (cfg.clone(), model.to_string(), version.to_string(), file.to_path_buf(), publisher.to_string());
        tokio::task::spawn_blocking(move || check(&cfg, &model, &version, &file, &publisher, &figures)).await.map_err(|e| PublishError::Refused(e.to_string()))??
    };
    let payload = crate::codec::encode(&a, crate::codec::WireFormat::Avro).map_err(|e| PublishError::Refused(e.to_string()))?;
    let producer: rdkafka::producer::FutureProducer = crate::kafka::producer_config(brokers, &cfg.kafka.librdkafka).create().map_err(crate::kafka::error::KafkaError::client("the model publisher"))?;
    let headers = crate::kafka::headers::HeaderSet::new().with("content-type", crate::codec::CONTENT_TYPE_AVRO).with("schema", ModelAnnouncement::SCHEMA_NAME).build();
    let key = a.key();
    let record = rdkafka::producer::FutureRecord::to(&cfg.topics.models).key(&key).payload(&payload).headers(headers);
    producer.send(record, Duration::from_secs(30)).await.map_err(|(e, _)| crate::kafka::error::KafkaError::client("publishing the announcement")(e))?;
    Ok(a)
}
