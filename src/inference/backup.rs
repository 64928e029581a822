//! Backup and recovery of the model repository (`models backup`, `models restore`): the runbook's
//! `backup-models.sh`, `verify-model-backup.sh` and `restore-models.sh --backup-date`.
//!
//! A backup is a directory `DIR/YYYY-MM-DD/` (UTC date of the backup) holding
//! `model_metadata.json` and every model file it lists, under the same relative paths, plus
//! `BACKUP.json` (when, from where, each file's size and sha256).
//!
//! Invariants:
//! - Nothing is backed up or restored unverified: a backup refuses a source file whose sha256
//!   differs from the metadata (it would preserve a tampered file); a restore verifies every file
//!   of the backup against the backup's metadata before it writes anything, and refuses the whole
//!   restore, changing nothing, on the first run of mismatches (all are listed).
//! - Files are written to a temporary name, synced and renamed, the metadata last, so a reader
//!   (an infer process loading a version) sees either the old or the new file, never half of one;
//!   a backup of the same day is replaced only once the new one is complete.

use std::path::{Path, PathBuf};

use super::metadata::{sha256_hex, ModelMetadata};

const METADATA: &str = "model_metadata.json";
const MANIFEST: &str = "BACKUP.json";

/// What went wrong; nothing is half-written when this is returned.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{path}: {message}")]
    Io { path: String, message: String },
    #[error("{0}")]
    Metadata(String),
    #[error("{what} refused, nothing was changed: {} file(s) do not match their sha256: {}", mismatches.len(), mismatches.join("; "))]
    Mismatch { what: &'static str, mismatches: Vec<String> },
    #[error("no backup in {dir}: {why}")]
    NotFound { dir: String, why: String },
}

fn io(path: &Path, e: impl std::fmt::Display) -> BackupError {
    BackupError::Io { path: path.display().to_string(), message: e.to_string() }
}

/// One file of a backup.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BackedUpFile {
    pub file: String,
    pub sha256: String,
    pub bytes: u64,
}

/// `BACKUP.json`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    pub created_at: String,
    pub source: String,
    pub files: Vec<BackedUpFile>,
}

fn load_metadata(path: &Path) -> Result<ModelMetadata, BackupError> {
    ModelMetadata::load(path).map_err(|e| BackupError::Metadata(e.to_string()))
}

/// Reads every file `meta` lists and checks its sha256: the verified contents, or every mismatch.
fn verified_files(meta: &ModelMetadata) -> Result<Vec<(String, Vec<u8>)>, Vec<String>> {
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    let mut bad = Vec::new();
    for e in &meta.models {
        if files.iter().any(|(f, _)| f == &e.file) {
            continue;
        }
        let path = meta.path_of(e);
        match std::fs::read(&path) {
            Ok(bytes) if sha256_hex(&bytes).eq_ignore_ascii_case(&e.sha256) => files.push((e.file.clone(), bytes)),
            Ok(bytes) => bad.push(format!("{} ({} {}): sha256 {} but the metadata says {}", path.display(), e.name, e.version, sha256_hex(&bytes), e.sha256)),
            Err(err) => bad.push(format!("{} ({} {}): {err}", path.display(), e.name, e.version)),
        }
    }
    if bad.is_empty() { Ok(files) } else { Err(bad) }
}

/// Writes `bytes` to `path` through a temporary file in the same directory, synced, then renamed.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), BackupError> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let tmp = dir.join(format!(".{}.tmp-{}", path.file_name().and_then(|n| n.to_str()).unwrap_or("file"), std::process::id()));
    let mut f = std::fs::File::create(&tmp).map_err(|e| io(&tmp, e))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(|e| io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io(path, e))
}

/// Backs up the repository of `metadata` (the path of `model_metadata.json`) into `to/<UTC date>`.
/// Returns the backup's directory and manifest.
pub fn backup(metadata: &Path, to: &Path) -> Result<(PathBuf, Manifest), BackupError> {
    let meta = load_metadata(metadata)?;
    let files = verified_files(&meta).map_err(|mismatches| BackupError::Mismatch { what: "backup", mismatches })?;
    let now = chrono::Utc::now();
    let dest = to.join(now.format("%Y-%m-%d").to_string());
    let staging = to.join(format!(".staging-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    let meta_bytes = std::fs::read(metadata).map_err(|e| io(metadata, e))?;
    let mut listed = Vec::new();
    for (file, bytes) in &files {
        write_atomically(&staging.join(file), bytes)?;
        listed.push(BackedUpFile { file: file.clone(), sha256: sha256_hex(bytes), bytes: bytes.len() as u64 });
    }
    write_atomically(&staging.join(METADATA), &meta_bytes)?;
    let manifest = Manifest { created_at: now.to_rfc3339(), source: metadata.display().to_string(), files: listed };
    write_atomically(&staging.join(MANIFEST), &serde_json::to_vec_pretty(&manifest).map_err(|e| BackupError::Metadata(e.to_string()))?)?;
    // replace a backup of the same day only now that the new one is complete
    if dest.exists() {
        let old = to.join(format!(".replaced-{}", std::process::id()));
        std::fs::rename(&dest, &old).map_err(|e| io(&dest, e))?;
        std::fs::rename(&staging, &dest).map_err(|e| io(&dest, e))?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(&staging, &dest).map_err(|e| io(&dest, e))?;
    }
    Ok((dest, manifest))
}

/// The backup directory `from` names: `from` itself when it holds a backup, else `from/<date>`,
/// else the latest dated backup in `from`.
pub fn locate(from: &Path, date: Option<&str>) -> Result<PathBuf, BackupError> {
    let not_found = |why: String| BackupError::NotFound { dir: from.display().to_string(), why };
    if from.join(METADATA).exists() && date.is_none() {
        return Ok(from.to_path_buf());
    }
    if let Some(d) = date {
        if chrono::NaiveDate::parse_from_str(d, "%Y-%m-%d").is_err() {
            return Err(not_found(format!("--date {d:?} is not YYYY-MM-DD")));
        }
        let dir = from.join(d);
        return if dir.join(METADATA).exists() { Ok(dir) } else { Err(not_found(format!("no backup dated {d} (no {})", dir.join(METADATA).display()))) };
    }
    let mut dated: Vec<PathBuf> = std::fs::read_dir(from)
        .map_err(|e| io(from, e))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| chrono::NaiveDate::parse_from_str(n, "%Y-%m-%d").is_ok()) && p.join(METADATA).exists())
        .collect();
    dated.sort();
    dated.pop().ok_or_else(|| not_found("no YYYY-MM-DD directory with a model_metadata.json".into()))
}

/// What a restore did (or, with `check_only`, would do).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Restored {
    pub backup: String,
    pub files: usize,
    /// Files whose contents differed from the backup's and were (or would be) replaced.
    pub replaced: Vec<String>,
    pub check_only: bool,
}

/// Verifies the backup at `backup_dir` and restores it over the repository of `metadata` (unless
/// `check_only`). Every file of the backup is verified before anything is written.
pub fn restore(backup_dir: &Path, metadata: &Path, check_only: bool) -> Result<Restored, BackupError> {
    let meta = load_metadata(&backup_dir.join(METADATA))?;
    let files = verified_files(&meta).map_err(|mismatches| BackupError::Mismatch { what: "restore", mismatches })?;
    let target_dir = metadata.parent().unwrap_or(Path::new("."));
    let replaced: Vec<String> = files.iter().filter(|(f, b)| std::fs::read(target_dir.join(f)).ok().as_deref() != Some(b.as_slice())).map(|(f, _)| f.clone()).collect();
    if !check_only {
        for (file, bytes) in &files {
            if replaced.contains(file) {
                write_atomically(&target_dir.join(file), bytes)?;
            }
        }
        let meta_bytes = std::fs::read(backup_dir.join(METADATA)).map_err(|e| io(&backup_dir.join(METADATA), e))?;
        write_atomically(metadata, &meta_bytes)?;
        // what was written is what was verified
        let now = load_metadata(metadata)?;
        verified_files(&now).map_err(|mismatches| BackupError::Mismatch { what: "restore (re-read after writing)", mismatches })?;
    }
    Ok(Restored { backup: backup_dir.display().to_string(), files: files.len(), replaced, check_only })
}
