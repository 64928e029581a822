//! The classifier's accuracy measured through the whole pipeline matches what the training script
//! measured on its held-out set (model_metadata.json).
//!
//! Tolerance: both figures are estimates from samples of the same generator distribution (the
//! held-out set has 1,500 documents, this test 800). With accuracy near 0.93 the standard error of
//! their difference is about 0.011; the test allows 0.045 (about 4 standard errors), so chance
//! alone fails it less than once in ten thousand runs, while a preprocessing mismatch between
//! training and serving (which drops accuracy by tens of points) cannot pass.

use std::time::Duration;

use payslip_stream::{
    codec::WireFormat,
    inference::metadata::ModelMetadata,
    produce::{self, ProduceOptions, Source},
};

use crate::support::*;

const TOLERANCE: f64 = 0.045;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classifier_accuracy_through_pipeline_matches_metadata() {
    let cfg = isolated_config("accuracy").await;
    let meta = ModelMetadata::load(&cfg.models.metadata).unwrap();
    let version = cfg.models.serve["document_classifier"].clone();
    let recorded = meta.entry("document_classifier", &version).unwrap().heldout["accuracy"].as_f64().unwrap();

    let stage = RunningStage::start(&cfg, load_registry(&cfg));
    let n = 800;
    let opts = ProduceOptions { brokers: brokers(), topic: cfg.topics.documents.clone(), format: WireFormat::Avro, rate: None, progress: None, passthrough: Default::default(), producers: 1 };
    // seed 5150: neither the training (1001) nor the held-out (2002) documents
    produce::produce(&opts, Source::Synthetic { seed: 5150, start: 0, count: n, golden_fraction: 1.0, pool: None }).await.unwrap();
    let reads = tokio::task::spawn_blocking({
        let t = cfg.topics.inference.clone();
        move || read_topic(&t, n as usize, Duration::from_secs(180), Duration::from_millis(500))
    })
    .await
    .unwrap();
    stage.stop().await;

    let (mut correct, mut total) = (0, 0);
    for r in &reads {
        let res = r.result();
        let truth = res.true_format.clone().expect("golden documents carry their format");
        let predicted = res.output("document_classifier").and_then(|o| o.label.clone()).expect("classifier output");
        total += 1;
        correct += (truth == predicted) as usize;
    }
    assert_eq!(total, n as usize);
    let measured = correct as f64 / total as f64;
    println!("classifier {version}: pipeline accuracy {measured:.4} on {total} documents, metadata {recorded:.4}");
    assert!((measured - recorded).abs() <= TOLERANCE, "pipeline accuracy {measured:.4} differs from recorded {recorded:.4} by more than {TOLERANCE}");
}
