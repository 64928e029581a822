//! RocksDB state of the monitor stage.
//!
//! Column families (names are constants; values are JSON unless noted):
//! - `windows`: open windows, key `subject|start_ms` → `WindowAggregate`
//! - `predictions`: document id → `Prediction`, kept for the configured retention to join feedback
//! - `prediction_expiry`: `event time | document id` → `null`: the predictions in time order, so the
//!   ones past retention are found without a scan
//! - `pending_feedback`: `given_at | document id` → (input partition, `DocumentFeedback`): feedback
//!   waiting for its prediction, one key each (capped by `monitor.max_pending_feedback`)
//! - `rollouts`: rollout id → `RolloutState`, one key per rollout (quarantine, promotions and
//!   answered command ids are one bounded value in `meta`)
//! - `alerts`: alert instance key → `AlertInstance`
//! - `offsets`: `topic/partition` → next input offset (i64, big-endian)
//! - `outbox`: sequence (u64, big-endian) → `OutboxMessage` waiting for its delivery report
//! - `meta`: watermark tracker, counters, output positions
//!
//! Invariant: every batch of input is applied with one `WriteBatch` that also holds the offsets it
//! consumed and the messages it caused (in `outbox`), so after a crash the stage resumes exactly
//! where its state is, and re-publishes only what it had not confirmed. No collection that grows
//! with the input is stored as one value, so every value (and changelog record) has a bounded size.

use std::path::Path;

use rocksdb::{checkpoint::Checkpoint, ColumnFamilyDescriptor, IteratorMode, Options, WriteBatch, WriteOptions, DB};
use serde::{de::DeserializeOwned, Serialize};

pub const CF_WINDOWS: &str = "windows";
pub const CF_PREDICTIONS: &str = "predictions";
pub const CF_ALERTS: &str = "alerts";
pub const CF_OFFSETS: &str = "offsets";
pub const CF_OUTBOX: &str = "outbox";
pub const CF_META: &str = "meta";
pub const CF_PREDICTION_EXPIRY: &str = "prediction_expiry";
pub const CF_PENDING_FEEDBACK: &str = "pending_feedback";
pub const CF_ROLLOUTS: &str = "rollouts";
pub const ALL_CFS: [&str; 9] = [CF_WINDOWS, CF_PREDICTIONS, CF_PREDICTION_EXPIRY, CF_PENDING_FEEDBACK, CF_ALERTS, CF_OFFSETS, CF_OUTBOX, CF_ROLLOUTS, CF_META];

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// RocksDB failed (disk full, corruption, lock held by another process): not retryable here.
    #[error("state store at {path}: {message}")]
    Rocks { path: String, message: String },
    /// A stored value does not decode: the store was written by an incompatible version.
    #[error("state store value in {cf} does not decode: {message}")]
    Decode { cf: &'static str, message: String },
}

impl StateError {
    /// Never from inside the process: a full disk, a lock or corruption needs an operator.
    pub fn retryable(&self) -> bool {
        false
    }
}

/// The monitor's RocksDB database (a clone is another handle on the same open database).
#[derive(Clone)]
pub struct RocksStateStore {
    db: std::sync::Arc<DB>,
    path: String,
}

/// Takes consistent checkpoints of an open store from another thread (the operations API's
/// `/backup/checkpoint`) while its owner keeps writing: RocksDB checkpoints an open database.
#[derive(Clone)]
pub struct Checkpointer {
    db: std::sync::Arc<DB>,
    path: String,
}

impl std::fmt::Debug for Checkpointer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpointer").field("path", &self.path).finish()
    }
}

impl Checkpointer {
    /// A consistent copy at `dir` (which must not exist), verified.
    pub fn checkpoint(&self, dir: &Path) -> Result<StateSummary, StateError> {
        let cp = Checkpoint::new(&self.db).map_err(|e| StateError::Rocks { path: self.path.clone(), message: e.to_string() })?;
        cp.create_checkpoint(dir).map_err(|e| StateError::Rocks { path: dir.display().to_string(), message: e.to_string() })?;
        verify(dir)
    }

    /// The live state directory.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// RocksDB's estimate of the state's size over every column family: live data in files plus
    /// what is still in memtables, bytes.
    pub fn live_bytes(&self) -> Option<u64> {
        let prop = |h, name: &str| self.db.property_int_value_cf(h, name).ok().flatten();
        ALL_CFS.iter().filter_map(|cf| self.db.cf_handle(cf)).map(|h| Some(prop(h, "rocksdb.estimate-live-data-size")? + prop(h, "rocksdb.cur-size-all-mem-tables")?)).sum()
    }
}

/// Writes that become durable together.
#[derive(Default)]
pub struct StateBatch {
    batch: WriteBatch,
    puts: usize,
    /// The same operations, for the changelog: (column family, key, value or None for a delete).
    ops: Vec<(&'static str, Vec<u8>, Option<Vec<u8>>)>,
}

impl StateBatch {
    pub fn put_json<T: Serialize>(&mut self, store: &RocksStateStore, cf: &'static str, key: &[u8], value: &T) {
        // the serialised value itself is kept for the changelog, not a copy of it
        self.put_owned(store, cf, key, serde_json::to_vec(value).expect("state values serialise"));
    }

    pub fn put_raw(&mut self, store: &RocksStateStore, cf: &'static str, key: &[u8], value: &[u8]) {
        self.put_owned(store, cf, key, value.to_vec());
    }

    fn put_owned(&mut self, store: &RocksStateStore, cf: &'static str, key: &[u8], value: Vec<u8>) {
        let h = store.db.cf_handle(cf).expect("column families exist after open");
        self.batch.put_cf(h, key, &value);
        self.puts += 1;
        self.ops.push((cf, key.to_vec(), Some(value)));
    }

    pub fn delete(&mut self, store: &RocksStateStore, cf: &'static str, key: &[u8]) {
        let h = store.db.cf_handle(cf).expect("column families exist after open");
        self.batch.delete_cf(h, key);
        self.puts += 1;
        self.ops.push((cf, key.to_vec(), None));
    }

    pub fn ops(&self) -> &[(&'static str, Vec<u8>, Option<Vec<u8>>)] {
        &self.ops
    }

    pub fn is_empty(&self) -> bool {
        self.puts == 0
    }
}

/// A column family's options. `predictions` is looked up once per result, and for a new document
/// (nearly every result) the key is not there: bloom filters on its whole keys, in the memtable and
/// in its files, answer most such misses without searching (the memtable's skip list was a quarter
/// of the monitor's applying thread, measured with `perf` on `benches/throughput.rs`).
fn cf_options(cf: &str) -> Options {
    let mut o = Options::default();
    if cf == CF_PREDICTIONS {
        o.set_memtable_whole_key_filtering(true);
        o.set_memtable_prefix_bloom_ratio(0.05);
        let mut table = rocksdb::BlockBasedOptions::default();
        table.set_bloom_filter(10.0, false);
        table.set_whole_key_filtering(true);
        o.set_block_based_table_factory(&table);
    }
    o
}

impl RocksStateStore {
    pub fn open(path: &Path) -> Result<Self, StateError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        let cfs = ALL_CFS.iter().map(|n| ColumnFamilyDescriptor::new(*n, cf_options(n)));
        let db = DB::open_cf_descriptors(&opts, path, cfs).map_err(|e| StateError::Rocks { path: path.display().to_string(), message: e.to_string() })?;
        Ok(Self { db: std::sync::Arc::new(db), path: path.display().to_string() })
    }

    fn err(&self, e: rocksdb::Error) -> StateError {
        StateError::Rocks { path: self.path.clone(), message: e.to_string() }
    }

    /// Applies a batch atomically. The write-ahead log is written before this returns, so a killed
    /// process keeps it; `fsync` is left to RocksDB's defaults (an OS crash can lose the last
    /// batches, which the stored offsets then re-consume).
    pub fn write(&self, batch: StateBatch) -> Result<(), StateError> {
        let wo = WriteOptions::default();
        self.db.write_opt(batch.batch, &wo).map_err(|e| self.err(e))
    }

    pub fn get_json<T: DeserializeOwned>(&self, cf: &'static str, key: &[u8]) -> Result<Option<T>, StateError> {
        let h = self.db.cf_handle(cf).expect("column families exist after open");
        match self.db.get_cf(h, key).map_err(|e| self.err(e))? {
            None => Ok(None),
            Some(b) => serde_json::from_slice(&b).map(Some).map_err(|e| StateError::Decode { cf, message: e.to_string() }),
        }
    }

    pub fn get_raw(&self, cf: &'static str, key: &[u8]) -> Result<Option<Vec<u8>>, StateError> {
        let h = self.db.cf_handle(cf).expect("column families exist after open");
        self.db.get_cf(h, key).map_err(|e| self.err(e))
    }

    /// Every entry of a column family, in key order.
    pub fn scan_raw(&self, cf: &'static str) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StateError> {
        let h = self.db.cf_handle(cf).expect("column families exist after open");
        self.db.iterator_cf(h, IteratorMode::Start).map(|r| r.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(|e| self.err(e))).collect()
    }

    /// Up to `limit` entries of a column family whose keys sort before `upper`, in key order.
    pub fn scan_before(&self, cf: &'static str, upper: &[u8], limit: usize) -> Result<Vec<Vec<u8>>, StateError> {
        let h = self.db.cf_handle(cf).expect("column families exist after open");
        let mut out = Vec::new();
        for item in self.db.iterator_cf(h, IteratorMode::Start) {
            let (k, _) = item.map_err(|e| self.err(e))?;
            if k.as_ref() >= upper || out.len() >= limit {
                break;
            }
            out.push(k.to_vec());
        }
        Ok(out)
    }

    pub fn scan_json<T: DeserializeOwned>(&self, cf: &'static str) -> Result<Vec<(Vec<u8>, T)>, StateError> {
        self.scan_raw(cf)?
            .into_iter()
            .map(|(k, v)| serde_json::from_slice(&v).map(|t| (k, t)).map_err(|e| StateError::Decode { cf, message: e.to_string() }))
            .collect()
    }

    /// A consistent on-disk copy (hard links where possible) at `dir`, which must not exist.
    pub fn checkpoint(&self, dir: &Path) -> Result<(), StateError> {
        let cp = Checkpoint::new(&self.db).map_err(|e| self.err(e))?;
        cp.create_checkpoint(dir).map_err(|e| self.err(e))
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn checkpointer(&self) -> Checkpointer {
        Checkpointer { db: self.db.clone(), path: self.path.clone() }
    }
}

/// What `state verify` reports about a checkpoint (or a live state directory not in use).
#[derive(Debug, Clone, serde::Serialize)]
pub struct StateSummary {
    pub path: String,
    pub entries: std::collections::BTreeMap<String, usize>,
    pub offsets: std::collections::BTreeMap<String, i64>,
}

/// Opens `dir` read-only (a checkpoint, never modified) and checks that every column family is
/// present and every value decodes. A checkpoint of a running store may hold a write-ahead log
/// (what was still in memtables): it is replayed into memory, never written back.
pub fn verify(dir: &Path) -> Result<StateSummary, StateError> {
    if !dir.join("CURRENT").exists() {
        return Err(StateError::Rocks { path: dir.display().to_string(), message: "not a RocksDB directory (no CURRENT file)".into() });
    }
    let opts = Options::default();
    // a checkpoint written by an older version lacks the newer column families: they count as empty
    let present = DB::list_cf(&opts, dir).map_err(|e| StateError::Rocks { path: dir.display().to_string(), message: e.to_string() })?;
    let cfs: Vec<&str> = ALL_CFS.iter().copied().filter(|c| present.iter().any(|p| p == c)).collect();
    let db = DB::open_cf_for_read_only(&opts, dir, &cfs, false).map_err(|e| StateError::Rocks { path: dir.display().to_string(), message: e.to_string() })?;
    let mut entries = std::collections::BTreeMap::new();
    let mut offsets = std::collections::BTreeMap::new();
    for cf in cfs {
        let h = db.cf_handle(cf).ok_or_else(|| StateError::Rocks { path: dir.display().to_string(), message: format!("column family {cf} missing") })?;
        let mut n = 0;
        for item in db.iterator_cf(h, IteratorMode::Start) {
            let (k, v) = item.map_err(|e| StateError::Rocks { path: dir.display().to_string(), message: e.to_string() })?;
            if cf == CF_OFFSETS {
                let arr: [u8; 8] = v.as_ref().try_into().map_err(|_| StateError::Decode { cf, message: "offset is not 8 bytes".into() })?;
                offsets.insert(String::from_utf8_lossy(&k).into_owned(), i64::from_be_bytes(arr));
            } else {
                serde_json::from_slice::<serde_json::Value>(&v).map_err(|e| StateError::Decode { cf, message: e.to_string() })?;
            }
            n += 1;
        }
        entries.insert(cf.to_string(), n);
    }
    Ok(StateSummary { path: dir.display().to_string(), entries, offsets })
}

/// Replaces the state directory `to` with a copy of the checkpoint `from` (verified first).
pub fn restore(from: &Path, to: &Path) -> Result<StateSummary, StateError> {
    let summary = verify(from)?;
    let io = |e: std::io::Error| StateError::Rocks { path: to.display().to_string(), message: e.to_string() };
    if to.exists() {
        std::fs::remove_dir_all(to).map_err(io)?;
    }
    std::fs::create_dir_all(to).map_err(io)?;
    for entry in std::fs::read_dir(from).map_err(io)? {
        let entry = entry.map_err(io)?;
        if entry.file_type().map_err(io)?.is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).map_err(io)?;
        }
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_is_atomic_and_checkpoint_restores() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("live");
        let store = RocksStateStore::open(&live).unwrap();
        let mut b = StateBatch::default();
        b.put_json(&store, CF_WINDOWS, b"w1", &serde_json::json!({"count": 3}));
        b.put_raw(&store, CF_OFFSETS, b"t/0", &42i64.to_be_bytes());
        store.write(b).unwrap();
        assert_eq!(store.get_json::<serde_json::Value>(CF_WINDOWS, b"w1").unwrap().unwrap()["count"], 3);
        let cp = dir.path().join("cp");
        store.checkpoint(&cp).unwrap();
        drop(store);
        let s = verify(&cp).unwrap();
        assert_eq!(s.offsets["t/0"], 42);
        assert_eq!(s.entries[CF_WINDOWS], 1);
        std::fs::remove_dir_all(&live).unwrap();
        restore(&cp, &live).unwrap();
        let store = RocksStateStore::open(&live).unwrap();
        assert_eq!(store.get_raw(CF_OFFSETS, b"t/0").unwrap().unwrap(), 42i64.to_be_bytes());
    }

    #[test]
    fn verify_rejects_a_plain_directory() {
        let dir = tempfile::tempdir().unwrap();
        assert!(verify(dir.path()).unwrap_err().to_string().contains("not a RocksDB directory"));
    }
}
