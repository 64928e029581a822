//! 1,000 valid documents in, exactly 1,000 results out, ids matching one to one.

use std::{collections::BTreeSet, time::Duration};

use payslip_stream::{
    codec::WireFormat,
    document::InferenceResult,
    kafka::headers as h,
    produce::{self, ProduceOptions, Source},
    synth::{Generator, GeneratorConfig},
};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_documents_give_exactly_thousand_results() {
    let cfg = isolated_config("counts").await;
    let stage = RunningStage::start(&cfg, load_registry(&cfg));

    // half Avro, half JSON, as producers of both kinds share the topic
    let gen = Generator::new(GeneratorConfig { seed: 31, ..Default::default() });
    let docs: Vec<_> = (0..1000).map(|i| gen.document(i).document).collect();
    let ids: BTreeSet<String> = docs.iter().map(|d| d.document_id.clone()).collect();
    assert_eq!(ids.len(), 1000);
    for (half, format) in [(&docs[..500], WireFormat::Avro), (&docs[500..], WireFormat::Json)] {
        let opts = ProduceOptions { brokers: brokers(), topic: cfg.topics.documents.clone(), format, rate: None, progress: None, passthrough: Default::default(), producers: 1 };
        let s = produce::produce(&opts, Source::Documents(half.to_vec())).await.expect("produce");
        assert_eq!((s.sent, s.failed), (500, 0));
    }

    let reads = tokio::task::spawn_blocking({
        let t = cfg.topics.inference.clone();
        move || read_topic(&t, 1000, Duration::from_secs(180), Duration::from_secs(3))
    })
    .await
    .unwrap();
    let summary = stage.stop().await;

    assert_eq!(reads.len(), 1000, "exactly one result per document");
    let mut seen = BTreeSet::new();
    for r in &reads {
        let res: InferenceResult = r.result();
        assert_eq!(r.key.as_deref(), Some(res.document_id.as_str()), "results are keyed by document id");
        assert_eq!(res.result_id, InferenceResult::id_for(&res.document_id));
        assert_eq!(r.header(h::RESULT_ID), Some(res.result_id.as_str()));
        assert_eq!(res.error_code, None, "{res:?}");
        assert_eq!(res.outputs.len(), 3);
        assert!(res.outputs.iter().all(|o| o.provider == res.provider && o.error_code.is_none()));
        assert!(r.header(h::MODEL_VERSIONS).unwrap().contains("document_classifier=1.0.0"));
        assert!(seen.insert(res.document_id.clone()), "duplicate result for {}", res.document_id);
    }
    assert_eq!(seen, ids, "result ids match document ids one to one");
    assert_eq!(summary.consumed, 1000);
    assert_eq!(summary.results, 1000);
    assert_eq!(summary.dead_letters, 0);
    assert!(summary.batches < 1000, "documents were batched ({} batches)", summary.batches);
}

/// `produce --rate` says whether it kept the rate: a rate no generator can reach is reported as
/// missed (with the rate achieved), a modest one as kept; every document is sent either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_says_when_it_misses_the_requested_rate() {
    let cfg = isolated_config("produce-rate").await;
    let run = |rate: f64, count: u64| {
        let opts = ProduceOptions { brokers: brokers(), topic: cfg.topics.documents.clone(), format: WireFormat::Avro, rate: Some(rate), progress: None, passthrough: Default::default(), producers: 1 };
        async move { produce::produce(&opts, Source::Synthetic { seed: 5, start: 0, count, golden_fraction: 1.0, pool: None }).await.expect("produce") }
    };
    let fast = run(1e7, 300).await;
    assert_eq!((fast.sent, fast.failed), (300, 0));
    assert!(fast.missed_rate && fast.achieved_rate < 1e7 && fast.max_behind_seconds > 0.0, "{fast:?}");
    assert_eq!(fast.requested_rate, Some(1e7));
    let kept = run(20.0, 60).await;
    assert_eq!((kept.sent, kept.failed), (60, 0));
    assert!(!kept.missed_rate, "20 documents/s is within reach: {kept:?}");
    assert!(kept.achieved_rate > 15.0 && kept.achieved_rate <= 21.0, "{kept:?}");
}

/// `produce --pool N`: N documents rendered, every one of `count` sent once under its own id, the
/// content of document i that of rendered document i mod N; spread over three producer clients
/// (as the CLI does with a pool), still each exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_from_a_pool_sends_every_document_once_under_its_own_id() {
    use payslip_stream::{codec, document::PayslipDocument};
    let cfg = isolated_config("produce-pool").await;
    let opts = ProduceOptions { brokers: brokers(), topic: cfg.topics.documents.clone(), format: WireFormat::Avro, rate: None, progress: None, passthrough: Default::default(), producers: 3 };
    let s = produce::produce(&opts, Source::Synthetic { seed: 7, start: 100, count: 500, golden_fraction: 1.0, pool: Some(16) }).await.expect("produce");
    assert_eq!((s.sent, s.failed), (500, 0));
    let reads = tokio::task::spawn_blocking(move || read_all(&cfg.topics.documents)).await.unwrap();
    assert_eq!(reads.len(), 500);
    let gen = Generator::new(GeneratorConfig { seed: 7, ..Default::default() });
    let rendered: Vec<PayslipDocument> = (100..116).map(|i| gen.document(i).document).collect();
    let mut ids = BTreeSet::new();
    for r in &reads {
        let d: PayslipDocument = codec::decode(&r.payload, r.header(h::CONTENT_TYPE)).expect("decodes");
        assert_eq!(r.key.as_deref(), Some(d.document_id.as_str()));
        let i: u64 = d.document_id.rsplit('-').next().unwrap().parse().unwrap();
        assert_eq!(d.document_id, format!("doc-7-{i:08}"));
        let source = &rendered[((i - 100) % 16) as usize];
        assert_eq!((&d.pages, &d.labels), (&source.pages, &source.labels), "document {i} is rendered document {}", (i - 100) % 16);
        assert!(d.submitted_at > 0);
        assert!(ids.insert(i), "document {i} sent twice");
    }
    assert_eq!(ids, (100..600).collect::<BTreeSet<u64>>());
}

/// A stage restarted with the same group and instance id but another documents topic (a new
/// `--topic-prefix`, a renamed topic) reads the new topic, every document once, and nothing of the
/// old one. Kafka's classic protocol hands a rejoining static member its previous assignment
/// without a rebalance even when its subscription changed (KAFKA-12759); before the stage checked
/// its assignment, it sat on the old topic's partitions and never read the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_restarted_on_another_topic_with_the_same_static_identity_reads_the_new_topic() {
    let mut old = isolated_config("stale-old").await;
    let mut new = isolated_config("stale-new").await;
    old.kafka.instance_id = Some(unique("instance"));
    new.kafka.instance_id = old.kafka.instance_id.clone();
    new.kafka.infer_group = old.kafka.infer_group.clone();
    assert!(old.kafka.static_membership && new.kafka.static_membership, "the default joins as a static member");
    let gen = Generator::new(GeneratorConfig { seed: 41, ..Default::default() });
    let send = |topic: String, from: u64, n: u64| {
        let docs: Vec<_> = (from..from + n).map(|i| gen.document(i).document).collect();
        async move {
            let opts = ProduceOptions { brokers: brokers(), topic, format: WireFormat::Avro, rate: None, progress: None, passthrough: Default::default(), producers: 1 };
            let s = produce::produce(&opts, Source::Documents(docs)).await.expect("produce");
            assert_eq!((s.sent, s.failed), (n, 0));
        }
    };
    let results = |topic: String, n: usize| tokio::task::spawn_blocking(move || read_topic(&topic, n, Duration::from_secs(90), Duration::from_secs(2)));

    send(old.topics.documents.clone(), 0, 40).await;
    let stage = RunningStage::start(&old, load_registry(&old));
    assert_eq!(results(old.topics.inference.clone(), 40).await.unwrap().len(), 40);
    assert_eq!(stage.stop().await.results, 40);

    // the old topic gets more documents too: a stage holding its stale partitions would read them
    send(old.topics.documents.clone(), 40, 20).await;
    send(new.topics.documents.clone(), 100, 60).await;
    let stage = RunningStage::start(&new, load_registry(&new));
    let reads = results(new.topics.inference.clone(), 60).await.unwrap();
    let summary = stage.stop().await;
    let ids: BTreeSet<String> = reads.iter().map(|r| r.result().document_id).collect();
    assert_eq!((reads.len(), ids.len()), (60, 60), "every document of the new topic answered once");
    assert_eq!(ids, (100..160).map(|i| gen.document(i).document.document_id).collect::<BTreeSet<_>>());
    assert_eq!((summary.consumed, summary.results), (60, 60), "nothing of the old topic read: {summary:?}");
    let old_results = tokio::task::spawn_blocking(move || read_all(&old.topics.inference)).await.unwrap();
    assert_eq!(old_results.len(), 40, "no result for the old topic's later documents");
}

/// Two pipelines on one host, each under its own `--topic-prefix`, with the configured group and
/// the same instance id (the default is the host name): each answers its own documents, each once,
/// and both keep running. The prefix namespaces the infer group too; before it did, both processes
/// joined `payslip-infer` as the same static member with the same transactional id, and the second
/// fenced the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pipelines_under_different_topic_prefixes_on_one_host_answer_their_own_documents() {
    use std::process::{Command, Stdio};
    let instance = unique("host");
    let gen = Generator::new(GeneratorConfig { seed: 43, ..Default::default() });
    let mut runs = Vec::new();
    for name in ["ns-a", "ns-b"] {
        let prefix = format!("{}.", unique(name));
        let mut cfg = repo_config();
        cfg.topics = cfg.topics.clone().with_prefix(&prefix);
        payslip_stream::kafka::admin::ensure_topics(&brokers(), &cfg).await.expect("topics created");
        let log = std::env::temp_dir().join(format!("{}.log", unique(name)));
        let child = Reaped(
            Command::new(env!("CARGO_BIN_EXE_payslip-stream"))
                .current_dir(repo())
                .args(["run", "--stage", "infer", "--brokers", &brokers(), "--topic-prefix", &prefix, "--instance-id", &instance])
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .expect("spawn payslip-stream"),
        );
        runs.push((cfg, child, log));
    }
    let n = 30u64;
    for (i, (cfg, _, _)) in runs.iter().enumerate() {
        let docs: Vec<_> = (0..n).map(|k| gen.document(i as u64 * 1000 + k).document).collect();
        let opts = ProduceOptions { brokers: brokers(), topic: cfg.topics.documents.clone(), format: WireFormat::Avro, rate: None, progress: None, passthrough: Default::default(), producers: 1 };
        let s = produce::produce(&opts, Source::Documents(docs)).await.expect("produce");
        assert_eq!((s.sent, s.failed), (n, 0));
    }
    for (i, (cfg, child, log)) in runs.iter_mut().enumerate() {
        let topic = cfg.topics.inference.clone();
        let reads = tokio::task::spawn_blocking(move || read_topic(&topic, n as usize, Duration::from_secs(90), Duration::from_secs(2))).await.unwrap();
        let tail = || std::fs::read_to_string(&*log).unwrap_or_default().lines().rev().take(15).collect::<Vec<_>>().join("\n");
        assert!(child.try_wait().unwrap().is_none(), "pipeline {i} exited: {}", tail());
        let ids: BTreeSet<String> = reads.iter().map(|r| r.result().document_id).collect();
        assert_eq!((reads.len(), ids.len()), (n as usize, n as usize), "pipeline {i}: every document answered once: {}", tail());
        assert_eq!(ids, (0..n).map(|k| gen.document(i as u64 * 1000 + k).document.document_id).collect::<BTreeSet<_>>());
    }
}
