//! librdkafka's own statistics (`statistics.interval.ms`) for the operations API: a client
//! context that keeps the latest report's figures, which `/metrics` bridges as
//! `payslip_kafka_*`. The report arrives on librdkafka's polling thread; readers take a copy.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use rdkafka::{
    client::ClientContext,
    consumer::ConsumerContext,
    statistics::Statistics,
};

/// One broker connection.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BrokerStats {
    pub state: String,
    /// Average round-trip time over the last interval, µs.
    pub rtt_avg_us: Option<i64>,
    pub outbuf_cnt: i64,
    pub waitresp_cnt: i64,
    pub txerrs: u64,
    pub rxerrs: u64,
    pub req_timeouts: u64,
}

/// One partition the client fetches or produces.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PartitionStats {
    /// Messages fetched and waiting to be consumed.
    pub fetchq_cnt: i64,
    /// Messages between what the application consumed and the end it may read (the last stable
    /// offset under read_committed): `ls_offset − app_offset`, None while either is unknown.
    /// (librdkafka's own `consumer_lag` counts from the committed offset, which a consumer whose
    /// offsets are committed by a transactional producer does not see.)
    pub lag: Option<i64>,
    /// Messages waiting to be produced.
    pub msgq_cnt: i64,
}

/// The figures kept from the latest statistics report.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClientStats {
    /// Operations waiting in the reply queue.
    pub replyq: i64,
    /// Messages in the producer queues.
    pub msg_cnt: u64,
    pub txmsgs: i64,
    pub rxmsgs: i64,
    pub brokers: BTreeMap<String, BrokerStats>,
    pub partitions: BTreeMap<(String, i32), PartitionStats>,
    pub rebalances: Option<i64>,
    pub assignment_size: Option<i32>,
}

impl ClientStats {
    fn of(s: &Statistics) -> Self {
        let brokers = s
            .brokers
            .values()
            .filter(|b| b.nodeid >= 0)
            .map(|b| {
                (b.name.clone(), BrokerStats { state: b.state.clone(), rtt_avg_us: b.rtt.as_ref().map(|w| w.avg), outbuf_cnt: b.outbuf_cnt, waitresp_cnt: b.waitresp_cnt, txerrs: b.txerrs, rxerrs: b.rxerrs, req_timeouts: b.req_timeouts })
            })
            .collect();
        let partitions = s
            .topics
            .values()
            .flat_map(|t| t.partitions.values().filter(|p| p.partition >= 0).map(move |p| ((t.topic.clone(), p.partition), PartitionStats { fetchq_cnt: p.fetchq_cnt, lag: (p.ls_offset >= 0 && p.app_offset >= 0).then(|| (p.ls_offset - p.app_offset).max(0)), msgq_cnt: p.msgq_cnt })))
            .collect();
        ClientStats {
            replyq: s.replyq,
            msg_cnt: s.msg_cnt,
            txmsgs: s.txmsgs,
            rxmsgs: s.rxmsgs,
            brokers,
            partitions,
            rebalances: s.cgrp.as_ref().map(|c| c.rebalance_cnt),
            assignment_size: s.cgrp.as_ref().map(|c| c.assignment_size),
        }
    }
}

/// Where a client's latest statistics are kept.
pub type StatsCell = Arc<Mutex<Option<ClientStats>>>;

/// A client context that keeps the latest statistics; everything else is librdkafka's default.
pub struct StatsContext {
    latest: StatsCell,
}

impl StatsContext {
    pub fn new(latest: StatsCell) -> Self {
        Self { latest }
    }
}

impl ClientContext for StatsContext {
    fn stats(&self, statistics: Statistics) {
        *self.latest.lock().unwrap_or_else(|p| p.into_inner()) = Some(ClientStats::of(&statistics));
    }
}

impl ConsumerContext for StatsContext {}
