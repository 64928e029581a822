//! The ack task: waits for each batch's delivery reports in consumption order and only then stores
//! the batch's offsets, so a stored offset always means "its result or dead letter is durable".

use std::{collections::BTreeMap, sync::{atomic::Ordering, Arc}};

use rdkafka::{
    consumer::Consumer,
    producer::DeliveryFuture,
};
use tokio::sync::mpsc;

use super::StageError;
use crate::{kafka, telemetry::InferCounters};

/// Work whose offsets may be stored once its deliveries succeed.
pub(super) struct Pending {
    pub deliveries: Vec<Delivery>,
    pub positions: Vec<(String, i32, i64)>,
}

/// One queued record and what it counts as once delivered.
pub(super) struct Delivery {
    pub future: DeliveryFuture,
    pub topic: String,
    pub is_result: bool,
    pub has_error: bool,
    pub dead_class: Option<&'static str>,
}

pub(super) async fn ack_loop(mut rx: mpsc::Receiver<Pending>, consumer: Arc<super::InferConsumer>, counters: Arc<InferCounters>) -> Result<(), StageError> {
    while let Some(p) = rx.recv().await {
        for d in p.deliveries {
            kafka::delivered(d.future, &d.topic).await.map_err(StageError::Delivery)?;
            if d.is_result {
                counters.results.fetch_add(1, Ordering::Relaxed);
                if d.has_error {
                    counters.results_with_error.fetch_add(1, Ordering::Relaxed);
                }
            }
            if let Some(class) = d.dead_class {
                counters.dead_letter(class);
            }
        }
        // Highest offset per partition; earlier ones are implied.
        let mut last: BTreeMap<(String, i32), i64> = BTreeMap::new();
        for (t, part, off) in p.positions {
            let e = last.entry((t, part)).or_insert(off);
            *e = (*e).max(off);
        }
        for ((t, part), off) in last {
            match consumer.store_offset(&t, part, off) {
                Ok(()) => {
                    counters.offsets_stored.fetch_add(1, Ordering::Relaxed);
                }
                // The partition was revoked meanwhile: its new owner re-reads from the last commit.
                Err(e) => tracing::debug!(topic = %t, partition = part, offset = off, error = %e, "offset not stored"),
            }
        }
    }
    Ok(())
}
