//! Producing with backpressure, and waiting for delivery reports.
//!
//! [`enqueue`] (async) and [`enqueue_blocking`] (for stages on blocking threads) hand a record to
//! librdkafka. Only a full local queue is waited out (librdkafka drains it as the broker acknowledges
//! earlier records); every other refusal, such as a record over `message.max.bytes`, is returned at
//! once as [`KafkaError::Rejected`], because sending the same record again fails the same way.
//! [`delivered`] and [`wait_deliveries`] turn delivery reports into positions or typed errors;
//! [`released`] and [`wait_released`] wait for librdkafka to let go of the reported records before
//! a transaction's commit.

use std::time::Duration;

use rdkafka::{
    client::ClientContext,
    producer::{DeliveryFuture, FutureProducer, FutureRecord},
    types::RDKafkaErrorCode,
    message::ToBytes,
};

use super::KafkaError;

/// How long to wait before offering a record to a full queue again.
const QUEUE_FULL_BACKOFF: Duration = Duration::from_millis(5);

/// Where a record landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    pub partition: i32,
    pub offset: i64,
}

/// Either queued, or given back because the local queue is full.
fn try_enqueue<'a, K, P, C>(producer: &FutureProducer<C>, record: FutureRecord<'a, K, P>) -> Result<Result<DeliveryFuture, FutureRecord<'a, K, P>>, KafkaError>
where
    K: ToBytes + ?Sized,
    P: ToBytes + ?Sized,
    C: ClientContext + 'static,
{
    match producer.send_result(record) {
        Ok(f) => Ok(Ok(f)),
        Err((e, r)) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull) => Ok(Err(r)),
        Err((e, r)) => Err(KafkaError::Rejected { topic: r.topic.to_string(), source: e }),
    }
}

/// Offers `record` until it is queued; `wait` is how to pass the time while the queue is full.
async fn enqueue_with<'a, K, P, W, C>(producer: &FutureProducer<C>, mut record: FutureRecord<'a, K, P>, wait: impl Fn() -> W) -> Result<DeliveryFuture, KafkaError>
where
    K: ToBytes + ?Sized,
    P: ToBytes + ?Sized,
    C: ClientContext + 'static,
    W: std::future::Future<Output = ()>,
{
    loop {
        match try_enqueue(producer, record)? {
            Ok(f) => return Ok(f),
            Err(r) => {
                record = r;
                wait().await;
            }
        }
    }
}

/// Enqueues a record, waiting while librdkafka's local queue is full; the returned future resolves
/// with the delivery report.
pub async fn enqueue<'a, K, P, C>(producer: &FutureProducer<C>, record: FutureRecord<'a, K, P>) -> Result<DeliveryFuture, KafkaError>
where
    K: ToBytes + ?Sized,
    P: ToBytes + ?Sized,
    C: ClientContext + 'static,
{
    enqueue_with(producer, record, || tokio::time::sleep(QUEUE_FULL_BACKOFF)).await
}

/// [`enqueue`] for callers on a blocking thread (no async runtime needed).
pub fn enqueue_blocking<'a, K, P, C>(producer: &FutureProducer<C>, record: FutureRecord<'a, K, P>) -> Result<DeliveryFuture, KafkaError>
where
    K: ToBytes + ?Sized,
    P: ToBytes + ?Sized,
    C: ClientContext + 'static,
{
    let block = || {
        std::thread::sleep(QUEUE_FULL_BACKOFF);
        std::future::ready(())
    };
    futures::executor::block_on(enqueue_with(producer, record, block))
}

/// Waits for one delivery report.
pub async fn delivered(future: DeliveryFuture, topic: &str) -> Result<Delivered, KafkaError> {
    match future.await {
        Ok(Ok(d)) => Ok(Delivered { partition: d.partition, offset: d.offset }),
        Ok(Err((e, _))) => Err(KafkaError::Delivery { topic: topic.to_string(), source: e }),
        Err(_) => Err(KafkaError::Dropped { topic: topic.to_string() }),
    }
}

/// How long [`released`] yields the thread, looking again each time, before it gives up.
const RELEASE_SPIN: Duration = Duration::from_millis(1);

/// Whether librdkafka counts none of a producer's records in flight (`in_flight`: its
/// `in_flight_count`) within a millisecond, yielding the thread between looks. A delivery
/// report's future resolves inside the report's callback, on the producer's polling thread, and
/// that thread releases the record a few microseconds later; a commit's flush that still counts it
/// waits a whole poll round (rust-rdkafka's commit flushes first). Every transactional sender waits
/// for this between its last delivery report and its commit.
pub fn released(in_flight: impl Fn() -> i32) -> bool {
    let start = std::time::Instant::now();
    loop {
        if in_flight() <= 0 {
            return true;
        }
        if start.elapsed() >= RELEASE_SPIN {
            return false;
        }
        std::thread::yield_now();
    }
}

/// [`released`], then a look every millisecond until `limit` has passed: for stages on blocking
/// threads. Returns whether nothing is in flight.
pub fn wait_released(in_flight: impl Fn() -> i32, limit: Duration) -> bool {
    let start = std::time::Instant::now();
    if released(&in_flight) {
        return true;
    }
    while start.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(1));
        if in_flight() <= 0 {
            return true;
        }
    }
    false
}

/// Waits, on a blocking thread, for every delivery report in order; the first failure is returned.
pub fn wait_deliveries<T: AsRef<str>>(futures: impl IntoIterator<Item = (DeliveryFuture, T)>) -> Result<Vec<Delivered>, KafkaError> {
    futures.into_iter().map(|(f, topic)| futures::executor::block_on(delivered(f, topic.as_ref()))).collect()
}
