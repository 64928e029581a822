//! librdkafka's own statistics (`statistics.interval.ms`) for `/metrics`: a client context that
//! keeps the figures of the latest report, which the operations API bridges as `payslip_kafka_*`.
//!
//! Only producers carry this context (the infer stage's and the monitor's). A consumer context with
//! a statistics callback is not used: with rust-rdkafka 0.39 a `StreamConsumer` with a custom
//! context deadlocked in its close right after `subscribe` (the default rebalance callback's
//! `rebalance_protocol` call waits forever on the closing queue). The consumer's own figure that
//! matters, the lag per partition, is measured by the infer stage from its position and the
//! partitions' watermarks instead. The reports arrive on librdkafka's polling thread; readers take
//! a copy, so a scrape never waits on a client.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use rdkafka::{client::ClientContext, producer::FutureProducer, statistics::Statistics, ClientConfig};

use super::KafkaError;

/// How often librdkafka reports its statistics to a producer created by [`producer_with_stats`].
pub const STATISTICS_INTERVAL_MS: u32 = 5000;

/// One broker connection.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BrokerStats {
    /// librdkafka's connection state (`UP`, `DOWN`, `CONNECT`, ...).
    pub state: String,
    /// Average round-trip time over the last interval, µs (None before any request).
    pub rtt_avg_us: Option<i64>,
    /// Requests waiting to be sent, and sent requests waiting for their response.
    pub outbuf_cnt: i64,
    pub waitresp_cnt: i64,
    pub tx_bytes: u64,
    pub tx_errors: u64,
    pub tx_retries: u64,
    pub request_timeouts: u64,
}

/// The figures kept from a producer's latest statistics report.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClientStats {
    /// Operations waiting in the reply queue.
    pub replyq: i64,
    /// Messages in the producer's queues, and their size.
    pub msg_cnt: u64,
    pub msg_size: u64,
    /// Messages sent to brokers, and their bytes (since the client started).
    pub txmsgs: i64,
    pub txmsg_bytes: i64,
    /// Broker connections by `name` (`host:port/id`); bootstrap entries are left out.
    pub brokers: BTreeMap<String, BrokerStats>,
}

impl ClientStats {
    pub fn of(s: &Statistics) -> Self {
        let brokers = s
            .brokers
            .values()
            .filter(|b| b.nodeid >= 0)
            .map(|b| {
                let st = BrokerStats {
                    state: b.state.clone(),
                    rtt_avg_us: b.rtt.as_ref().map(|w| w.avg).filter(|&us| us > 0),
                    outbuf_cnt: b.outbuf_cnt,
                    waitresp_cnt: b.waitresp_cnt,
                    tx_bytes: b.txbytes,
                    tx_errors: b.txerrs,
                    tx_retries: b.txretries,
                    request_timeouts: b.req_timeouts,
                };
                (b.name.clone(), st)
            })
            .collect();
        ClientStats { replyq: s.replyq, msg_cnt: s.msg_cnt, msg_size: s.msg_size, txmsgs: s.txmsgs, txmsg_bytes: s.txmsg_bytes, brokers }
    }
}

/// Where a client's latest statistics are kept (None until the first report).
pub type StatsCell = Arc<Mutex<Option<ClientStats>>>;

/// Reads a cell, whatever a panicking writer left.
pub fn latest(cell: &StatsCell) -> Option<ClientStats> {
    cell.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// A client context that keeps the latest statistics; everything else is librdkafka's default.
#[derive(Debug, Clone, Default)]
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

/// A producer whose statistics land in its context's cell.
pub type StatsProducer = FutureProducer<StatsContext>;

/// Creates a producer from `cfg` that reports its statistics every [`STATISTICS_INTERVAL_MS`] into
/// `cell` (unless the configuration's passthrough set `statistics.interval.ms` itself).
pub fn producer_with_stats(mut cfg: ClientConfig, cell: StatsCell, what: &'static str) -> Result<StatsProducer, KafkaError> {
    if cfg.get("statistics.interval.ms").is_none() {
        cfg.set("statistics.interval.ms", STATISTICS_INTERVAL_MS.to_string());
    }
    cfg.create_with_context(StatsContext::new(cell)).map_err(KafkaError::client(what))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A report as librdkafka writes it (trimmed to what the parser needs), read into the figures.
    #[test]
    fn a_report_becomes_figures() {
        let json = r#"{"name":"rdkafka#producer-1","client_id":"rdkafka","type":"producer","ts":1,"time":1,"age":1,
          "replyq":2,"msg_cnt":7,"msg_size":900,"msg_max":100000,"msg_size_max":1000000,"simple_cnt":0,"metadata_cache_cnt":1,
          "tx":10,"tx_bytes":1000,"rx":10,"rx_bytes":1000,"txmsgs":40,"txmsg_bytes":4000,"rxmsgs":0,"rxmsg_bytes":0,
          "brokers":{
            "127.0.0.1:9092/bootstrap":{"name":"127.0.0.1:9092/bootstrap","nodeid":-1,"nodename":"127.0.0.1:9092","source":"configured","state":"DOWN","stateage":1,
              "outbuf_cnt":0,"outbuf_msg_cnt":0,"waitresp_cnt":0,"waitresp_msg_cnt":0,"tx":0,"txbytes":0,"txerrs":0,"txretries":0,"txidle":-1,"req_timeouts":0,
              "rx":0,"rxbytes":0,"rxerrs":0,"rxcorriderrs":0,"rxpartial":0,"rxidle":-1,"zbuf_grow":0,"buf_grow":0,"wakeups":0,"connects":0,"disconnects":0,"req":{},"toppars":{}},
            "127.0.0.1:9092/1":{"name":"127.0.0.1:9092/1","nodeid":1,"nodename":"127.0.0.1:9092","source":"learned","state":"UP","stateage":1,
              "outbuf_cnt":1,"outbuf_msg_cnt":0,"waitresp_cnt":3,"waitresp_msg_cnt":0,"tx":5,"txbytes":500,"txerrs":1,"txretries":2,"txidle":1,"req_timeouts":4,
              "rx":5,"rxbytes":500,"rxerrs":0,"rxcorriderrs":0,"rxpartial":0,"rxidle":1,"zbuf_grow":0,"buf_grow":0,"wakeups":0,"connects":1,"disconnects":0,
              "rtt":{"min":100,"max":900,"avg":450,"sum":900,"cnt":2,"stddev":1,"hdrsize":1,"p50":450,"p75":900,"p90":900,"p95":900,"p99":900,"p99_99":900,"outofrange":0},
              "req":{},"toppars":{}}},
          "topics":{}}"#;
        let s: Statistics = serde_json::from_str(json).expect("librdkafka's statistics format");
        let f = ClientStats::of(&s);
        assert_eq!((f.replyq, f.msg_cnt, f.msg_size, f.txmsgs, f.txmsg_bytes), (2, 7, 900, 40, 4000));
        assert_eq!(f.brokers.len(), 1, "the bootstrap entry is not a broker");
        let b = &f.brokers["127.0.0.1:9092/1"];
        assert_eq!(b, &BrokerStats { state: "UP".into(), rtt_avg_us: Some(450), outbuf_cnt: 1, waitresp_cnt: 3, tx_bytes: 500, tx_errors: 1, tx_retries: 2, request_timeouts: 4 });
    }
}
