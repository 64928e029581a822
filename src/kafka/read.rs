//! Reading: cluster metadata and offsets with retries for topics created a moment ago, and
//! [`RangeCursor`], the one way this project reads a bounded range of partitions.
//!
//! A range ends at offsets captured when it was opened (by default the high watermark), so reading
//! a live topic stops. Offsets inside a range need not all hold a record: compaction removes
//! records, and transaction markers and aborted records occupy offsets that a consumer never sees.
//! The cursor therefore also finishes a partition when the consumer's position has passed its end,
//! not only when the record just before the end arrives.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use rdkafka::{
    consumer::{BaseConsumer, Consumer, ConsumerContext},
    message::{BorrowedMessage, Message},
    Offset, TopicPartitionList,
};

use super::{range::PartitionRange, KafkaError};

const METADATA_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a bounded read must go without a record before the consumer's positions may finish a
/// partition whose last offsets hold no record (transaction markers, compacted records).
const QUIET_BEFORE_POSITIONS: Duration = Duration::from_millis(500);

/// Partition ids of `topic`, waiting up to `wait` for it to appear in the cluster metadata (a topic
/// created a moment ago may not be known to every broker yet).
pub fn partitions_of(consumer: &BaseConsumer, topic: &str, wait: Duration) -> Result<Vec<i32>, KafkaError> {
    let deadline = Instant::now() + wait;
    loop {
        let parts = consumer
            .fetch_metadata(Some(topic), METADATA_TIMEOUT)
            .map(|md| md.topics().first().filter(|t| t.error().is_none()).map(|t| t.partitions().iter().map(|p| p.id()).collect::<Vec<_>>()).unwrap_or_default())
            .map_err(KafkaError::broker(format!("cannot read metadata of {topic}")));
        match parts {
            Ok(p) if !p.is_empty() => return Ok(p),
            Ok(_) if Instant::now() >= deadline => return Err(KafkaError::MissingTopic { topic: topic.to_string() }),
            Err(e) if Instant::now() >= deadline => return Err(e),
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Low and high watermark of a partition, retried for up to `wait` (a partition created a moment ago
/// may have no leader yet).
pub fn watermarks_of(consumer: &BaseConsumer, topic: &str, partition: i32, wait: Duration) -> Result<(i64, i64), KafkaError> {
    let deadline = Instant::now() + wait;
    loop {
        match consumer.fetch_watermarks(topic, partition, METADATA_TIMEOUT) {
            Ok(w) => return Ok(w),
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(%topic, partition, error = %e, "watermarks not available yet; retrying");
                std::thread::sleep(Duration::from_millis(250));
            }
            Err(e) => return Err(KafkaError::Broker { what: format!("offsets of {topic}/{partition}"), source: e }),
        }
    }
}

/// First offset of each partition with a timestamp at or after `ts_ms`; the high watermark where no
/// record is that late. A time before the epoch means every record (librdkafka refuses a negative
/// time: a decision stamped near 0 made the monitor's start fail).
pub fn offsets_at(consumer: &BaseConsumer, topic: &str, partitions: &BTreeMap<i32, (i64, i64)>, ts_ms: i64) -> Result<BTreeMap<i32, i64>, KafkaError> {
    let mut q = TopicPartitionList::new();
    for p in partitions.keys() {
        q.add_partition_offset(topic, *p, Offset::Offset(ts_ms.max(0))).map_err(KafkaError::broker(format!("offsets-for-times on {topic}")))?;
    }
    let found = consumer.offsets_for_times(q, Duration::from_secs(30)).map_err(KafkaError::broker(format!("offsets-for-times on {topic}")))?;
    Ok(found
        .elements()
        .iter()
        .filter_map(|e| {
            let end = partitions.get(&e.partition())?.1;
            Some((e.partition(), if let Offset::Offset(o) = e.offset() { o } else { end }))
        })
        .collect())
}

/// Low and high watermarks of every partition of `topic`.
pub fn watermarks(consumer: &BaseConsumer, topic: &str, wait: Duration) -> Result<BTreeMap<i32, (i64, i64)>, KafkaError> {
    partitions_of(consumer, topic, wait)?.into_iter().map(|p| Ok((p, watermarks_of(consumer, topic, p, Duration::from_secs(30))?))).collect()
}

/// A bounded read over partitions of one or more topics, each `[start, end)`.
pub struct RangeCursor {
    consumer: BaseConsumer,
    remaining: BTreeMap<(String, i32), i64>,
    what: String,
    /// Return records past a finished partition's end too (a reader that goes on following).
    past_end: bool,
    /// Since when nothing arrived (the consumer's positions are consulted only after a quiet spell).
    quiet_since: Option<Instant>,
}

impl RangeCursor {
    /// Assigns every non-empty range to `consumer` at its start.
    pub fn open(consumer: BaseConsumer, ranges: impl IntoIterator<Item = (String, PartitionRange)>, what: impl Into<String>) -> Result<Self, KafkaError> {
        let what = what.into();
        let mut tpl = TopicPartitionList::new();
        let mut remaining = BTreeMap::new();
        // every partition is assigned, the empty ranges too, so that the consumer can go on past the
        // ends without being assigned again (see `into_consumer`)
        for (topic, r) in ranges {
            tpl.add_partition_offset(&topic, r.partition, Offset::Offset(r.start)).map_err(KafkaError::broker(format!("{what}: position {topic}/{}", r.partition)))?;
            if !r.is_empty() {
                remaining.insert((topic, r.partition), r.end);
            }
        }
        if tpl.count() > 0 {
            consumer.assign(&tpl).map_err(KafkaError::broker(format!("{what}: assign")))?;
        }
        Ok(Self { consumer, remaining, what, past_end: false, quiet_since: None })
    }

    /// Also returns records that arrive past a finished partition's end while other partitions
    /// are still short of theirs, for a reader that follows the topic afterwards and must not
    /// miss them.
    pub fn including_past_end(mut self) -> Self {
        self.past_end = true;
        self
    }

    /// Every partition of `topic` from `start(partition, low, high)` to its high watermark now.
    pub fn to_end(consumer: BaseConsumer, topic: &str, start: impl Fn(i32, i64, i64) -> i64, what: impl Into<String>) -> Result<Self, KafkaError> {
        let marks = watermarks(&consumer, topic, Duration::from_secs(30))?;
        let ranges: Vec<(String, PartitionRange)> = marks
            .into_iter()
            .map(|(p, (lo, hi))| {
                let s = start(p, lo, hi).clamp(lo, hi);
                (topic.to_string(), PartitionRange { partition: p, start: s, end: hi })
            })
            .collect();
        Self::open(consumer, ranges, what)
    }

    /// Whether every partition has reached its end.
    pub fn done(&self) -> bool {
        self.remaining.is_empty()
    }

    /// Partitions not finished yet.
    pub fn unfinished(&self) -> usize {
        self.remaining.len()
    }

    pub fn consumer(&self) -> &BaseConsumer {
        &self.consumer
    }

    /// The consumer, positioned where the range ended, every partition of the range still assigned
    /// (to go on reading past it).
    pub fn into_consumer(self) -> BaseConsumer {
        self.consumer
    }

    /// The next record inside the range, or `None` when none came within `timeout` (or the range
    /// is done). Records past a partition's end are skipped.
    pub fn next(&mut self, timeout: Duration) -> Result<Option<BorrowedMessage<'_>>, KafkaError> {
        let (consumer, remaining, past_end, quiet_since) = (&self.consumer, &mut self.remaining, self.past_end, &mut self.quiet_since);
        let deadline = Instant::now() + timeout;
        while !remaining.is_empty() {
            match consumer.poll(deadline.saturating_duration_since(Instant::now())) {
                Some(Err(e)) => return Err(KafkaError::Broker { what: format!("{}: consume", self.what), source: e }),
                Some(Ok(m)) => {
                    *quiet_since = None;
                    let key = (m.topic().to_string(), m.partition());
                    match remaining.get(&key) {
                        Some(&end) if m.offset() < end => {
                            if m.offset() + 1 >= end {
                                remaining.remove(&key);
                            }
                            return Ok(Some(m));
                        }
                        // past its end: the partition is finished
                        Some(_) => {
                            remaining.remove(&key);
                            if past_end {
                                return Ok(Some(m));
                            }
                        }
                        None if past_end => return Ok(Some(m)),
                        None => {}
                    }
                }
                // what lies before an end that no record reaches is only known once the records
                // in flight have been handed over: consult the positions after a quiet spell
                None => {
                    if quiet_since.get_or_insert_with(Instant::now).elapsed() >= QUIET_BEFORE_POSITIONS {
                        finish_passed(consumer, remaining);
                    }
                }
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        Ok(None)
    }

    /// Calls `f` with every record of the range; fails when nothing arrives for `idle`.
    pub fn for_each<E: From<KafkaError>>(mut self, idle: Duration, mut f: impl FnMut(&BorrowedMessage<'_>) -> Result<(), E>) -> Result<u64, E> {
        let mut n = 0u64;
        let mut last = Instant::now();
        while !self.done() {
            match self.next(Duration::from_millis(200))? {
                Some(m) => {
                    f(&m)?;
                    n += 1;
                    last = Instant::now();
                }
                None if last.elapsed() > idle => {
                    return Err(KafkaError::Timeout { what: format!("{} ({} partitions short of their end)", self.what, self.remaining.len()), seconds: idle.as_secs() }.into());
                }
                None => {}
            }
        }
        Ok(n)
    }
}

/// Finishes partitions whose position is at or past their end: what lay between the last record
/// and the end were transaction markers, aborted or compacted records.
fn finish_passed(consumer: &BaseConsumer, remaining: &mut BTreeMap<(String, i32), i64>) {
    let Ok(pos) = consumer.position() else { return };
    for e in pos.elements() {
        if let Offset::Offset(o) = e.offset() {
            let key = (e.topic().to_string(), e.partition());
            if remaining.get(&key).is_some_and(|&end| o >= end) {
                remaining.remove(&key);
            }
        }
    }
}

/// A client for [`read_to_the_end`]'s queries: `read_committed` like the readers whose position it
/// checks, assigned nothing, so nothing it sends waits behind a fetch. `what` names it in errors.
pub fn end_reader(brokers: &str, group: &str, passthrough: &BTreeMap<String, String>, what: &'static str) -> Result<BaseConsumer, KafkaError> {
    crate::kafka::reader_config(brokers, group, passthrough).create().map_err(KafkaError::client(what))
}

/// How long asking the broker for a partition's end may take (the caller waits).
pub const END_QUERY_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether `consumer` has read partition `p` of `topic` to its end as `read_committed` sees it
/// (the last stable offset), asked of the broker: a position at or past the end. A partition
/// nothing was read from since it was assigned or sought is where reading began, `start()` (at the
/// log start when that is `None`). False when the broker cannot be asked.
///
/// The end is asked through `ends`, a `read_committed` client that fetches nothing (see
/// [`end_reader`]). Asked through `consumer` itself, the query waited on its connection behind the
/// fetch the broker was holding open (up to `fetch.wait.max.ms`, librdkafka's default 500 ms):
/// half a second per partition, during which the monitor's loop stood still (a monitor that had
/// just read twelve input partitions to their end stalled for six seconds).
pub fn read_to_the_end<C: ConsumerContext, E: ConsumerContext>(ends: &BaseConsumer<E>, consumer: &BaseConsumer<C>, topic: &str, p: i32, start: impl FnOnce() -> Option<i64>) -> bool {
    let (low, end) = match ends.fetch_watermarks(topic, p, END_QUERY_TIMEOUT) {
        Ok(w) => w,
        Err(e) => {
            tracing::debug!(error = %e, partition = %format!("{topic}/{p}"), "the end of an input partition is not known; it is not taken as read");
            return false;
        }
    };
    let read = consumer.position().ok().and_then(|tpl| offset_in(&tpl, topic, p));
    read.unwrap_or_else(|| start().unwrap_or(low)) >= end
}

/// The offset of `topic/p` in `tpl`, when it is one.
pub fn offset_in(tpl: &TopicPartitionList, topic: &str, p: i32) -> Option<i64> {
    match tpl.find_partition(topic, p).map(|e| e.offset()) {
        Some(Offset::Offset(o)) => Some(o),
        _ => None,
    }
}

/// First offset of `topic`/`partition` with a timestamp at or after `ts_ms` (the end when none).
pub fn offset_at(consumer: &BaseConsumer, topic: &str, partition: i32, ts_ms: i64) -> Result<i64, KafkaError> {
    let marks: BTreeMap<i32, (i64, i64)> = [(partition, watermarks_of(consumer, topic, partition, Duration::from_secs(30))?)].into();
    Ok(offsets_at(consumer, topic, &marks, ts_ms)?.get(&partition).copied().unwrap_or(marks[&partition].1))
}
