//! Offset and timestamp selection shared by `inspect`, `replay` and `dlq replay`, with kcat's
//! vocabulary: `beginning`, `end`, an absolute offset `N`, `-N` (N before the end of each
//! partition), `s@MS` (first message with a timestamp at or after MS, via the broker's
//! offsets-for-times), or an RFC 3339 time (the same, e.g. `2026-11-27T10:00:00Z`).
//!
//! A range is half-open per partition, `[start, end)`: a timestamp `--to` resolves to the first
//! offset whose timestamp is at or after it, so a message stamped exactly `--to` is excluded and one
//! stamped exactly `--from` is included. Without `--to` the end is the high watermark captured when
//! the range is resolved, so a replay of a live topic stops.

use std::time::Duration;

use rdkafka::consumer::BaseConsumer;

use super::KafkaError;

/// One end of a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    Beginning,
    End,
    Offset(i64),
    /// N messages before the end, per partition.
    FromEnd(i64),
    /// Timestamp in ms since the epoch.
    Time(i64),
}

impl Bound {
    pub fn parse(s: &str) -> Result<Self, KafkaError> {
        let s = s.trim();
        match s {
            "beginning" | "earliest" => return Ok(Bound::Beginning),
            "end" | "latest" => return Ok(Bound::End),
            _ => {}
        }
        if let Some(ms) = s.strip_prefix("s@") {
            return ms.parse().map(Bound::Time).map_err(|_| KafkaError::Position(format!("{s:?}: s@ needs milliseconds since the epoch")));
        }
        if let Ok(n) = s.parse::<i64>() {
            return Ok(if n < 0 { Bound::FromEnd(-n) } else { Bound::Offset(n) });
        }
        chrono::DateTime::parse_from_rfc3339(s)
            .map(|t| Bound::Time(t.timestamp_millis()))
            .map_err(|_| KafkaError::Position(format!("{s:?} is not a position: use beginning, end, an offset N, -N, s@MILLIS or an RFC 3339 time (2026-11-27T10:00:00Z)")))
    }

    pub fn time(self) -> Option<i64> {
        match self {
            Bound::Time(t) => Some(t),
            _ => None,
        }
    }
}

/// Offsets `[start, end)` of one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionRange {
    pub partition: i32,
    pub start: i64,
    pub end: i64,
}

impl PartitionRange {
    pub fn len(&self) -> i64 {
        (self.end - self.start).max(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Resolves `from` / `to` on every partition of `topic`.
pub fn resolve(consumer: &BaseConsumer, topic: &str, from: Bound, to: Option<Bound>) -> Result<Vec<PartitionRange>, KafkaError> {
    let marks = super::read::watermarks(consumer, topic, Duration::from_secs(10))?;
    let place = |b: Bound| -> Result<std::collections::BTreeMap<i32, i64>, KafkaError> {
        if let Bound::Time(ts) = b {
            return super::read::offsets_at(consumer, topic, &marks, ts);
        }
        Ok(marks
            .iter()
            .map(|(p, &(lo, hi))| {
                let o = match b {
                    Bound::Beginning => lo,
                    Bound::Offset(o) => o.clamp(lo, hi),
                    Bound::FromEnd(n) => (hi - n).max(lo),
                    Bound::End | Bound::Time(_) => hi,
                };
                (*p, o)
            })
            .collect())
    };
    let starts = place(from)?;
    let ends = place(to.unwrap_or(Bound::End))?;
    Ok(marks
        .keys()
        .map(|p| {
            let start = starts.get(p).copied().unwrap_or(marks[p].1);
            PartitionRange { partition: *p, start, end: ends.get(p).copied().unwrap_or(marks[p].1).max(start) }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kcat_positions_and_times_parse() {
        assert_eq!(Bound::parse("beginning").unwrap(), Bound::Beginning);
        assert_eq!(Bound::parse("end").unwrap(), Bound::End);
        assert_eq!(Bound::parse("42").unwrap(), Bound::Offset(42));
        assert_eq!(Bound::parse("-5").unwrap(), Bound::FromEnd(5));
        assert_eq!(Bound::parse("s@1700000000000").unwrap(), Bound::Time(1_700_000_000_000));
        assert_eq!(Bound::parse("2026-11-27T10:00:00Z").unwrap(), Bound::Time(1_795_773_600_000));
        assert!(Bound::parse("yesterday").unwrap_err().to_string().contains("RFC 3339"));
    }
}
