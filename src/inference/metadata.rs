//! `models/model_metadata.json`: what the training script measured and what the infer stage must
//! verify before it loads a file (sha256, input/output shapes, labels).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::ModelError;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorSpec {
    pub name: String,
    /// `-1` marks a dynamic dimension (the batch).
    pub shape: Vec<i64>,
    pub dtype: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelEntry {
    pub name: String,
    pub version: String,
    /// `baseline`, `candidate` or `degraded`.
    pub role: String,
    /// Relative to the metadata file's directory.
    pub file: String,
    pub sha256: String,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    /// Class labels (classifier: formats; text recognition: characters).
    #[serde(default)]
    pub labels: Vec<String>,
    /// Held-out metrics measured by `models/train.py` (accuracy, pcda_accuracy, cell_accuracy, ...).
    #[serde(default)]
    pub heldout: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    pub description: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelMetadata {
    pub generator_seed_train: u64,
    pub generator_seed_heldout: u64,
    pub models: Vec<ModelEntry>,
    #[serde(skip)]
    pub dir: PathBuf,
}

impl ModelMetadata {
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::Read { path: path.display().to_string(), message: e.to_string() })?;
        let mut m: ModelMetadata = serde_json::from_str(&text).map_err(|e| ModelError::Metadata { path: path.display().to_string(), message: e.to_string() })?;
        m.dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Ok(m)
    }

    pub fn entry(&self, name: &str, version: &str) -> Option<&ModelEntry> {
        self.models.iter().find(|m| m.name == name && m.version == version)
    }

    pub fn path_of(&self, entry: &ModelEntry) -> PathBuf {
        self.dir.join(&entry.file)
    }
}

/// Hex sha256 of a byte slice.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Reads a model file and checks it against its recorded sha256. Returns the bytes on success so
/// the file is read once and the verified bytes are the ones loaded.
pub fn read_verified(meta: &ModelMetadata, entry: &ModelEntry) -> Result<Vec<u8>, ModelError> {
    let path = meta.path_of(entry);
    let bytes = std::fs::read(&path).map_err(|e| ModelError::Read { path: path.display().to_string(), message: e.to_string() })?;
    let actual = sha256_hex(&bytes);
    if !actual.eq_ignore_ascii_case(&entry.sha256) {
        return Err(ModelError::Integrity { model: entry.name.clone(), version: entry.version.clone(), path: path.display().to_string(), expected: entry.sha256.clone(), actual });
    }
    Ok(bytes)
}
