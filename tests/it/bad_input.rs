//! Every kind of bad input goes to the dead-letter topic with the right error class, its original
//! bytes and headers, and its source position; the valid documents around it still get results.

use std::{collections::BTreeMap, time::Duration};

use payslip_stream::{
    codec::{encode, WireFormat},
    document::{Raster, RasterEncoding},
    kafka::headers as h,
    synth::{Generator, GeneratorConfig},
};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_dead_lettered_and_valid_neighbours_get_results() {
    let mut cfg = isolated_config("dlq").await;
    cfg.limits.max_payload_bytes = 200_000;
    let gen = Generator::new(GeneratorConfig { seed: 77, ..Default::default() });
    let avro = ("content-type", "application/avro");
    let json = ("content-type", "application/json");

    let valid = |i: u64| gen.document(i).document;
    let mut bad: Vec<(String, Vec<u8>, Vec<(&str, &str)>, &str)> = Vec::new();
    bad.push(("bad-avro".into(), vec![0xff; 24], vec![avro], "undecodable"));
    bad.push(("bad-json".into(), br#"{"document_id": "x", "pages": ["#.to_vec(), vec![json], "undecodable"));
    bad.push(("bad-type".into(), br#"{"document_id": 5, "user_id": "u", "tenant": "t", "submitted_at": 1, "pages": []}"#.to_vec(), vec![json], "schema_mismatch"));
    let mut no_pages = serde_json::to_value(valid(900)).unwrap();
    no_pages.as_object_mut().unwrap().remove("pages");
    bad.push(("bad-missing".into(), serde_json::to_vec(&no_pages).unwrap(), vec![json], "missing_field"));
    let mut empty_pages = valid(901);
    empty_pages.pages.clear();
    bad.push(("bad-empty-pages".into(), encode(&empty_pages, WireFormat::Avro).unwrap(), vec![avro], "missing_field"));
    let mut big = serde_json::to_vec(&valid(902)).unwrap();
    big.extend(std::iter::repeat_n(b' ', 250_000));
    bad.push(("bad-oversized".into(), big, vec![json], "oversized"));
    let mut nan = valid(903);
    let px: Vec<u8> = [0.5f32, f32::NAN, 0.1, 0.2].iter().flat_map(|v| v.to_le_bytes()).collect();
    nan.pages[0].raster = Some(Raster { width: 2, height: 2, encoding: RasterEncoding::GRAYF32LE, pixels: px });
    bad.push(("bad-nan-raster".into(), encode(&nan, WireFormat::Avro).unwrap(), vec![avro], "invalid_raster"));
    let mut garbage = valid(904);
    garbage.pages[0].lines[0].raster = Some(Raster { width: 64, height: 8, encoding: RasterEncoding::GRAY8, pixels: vec![7; 100] });
    bad.push(("bad-garbage-raster".into(), encode(&garbage, WireFormat::Avro).unwrap(), vec![avro], "invalid_raster"));
    bad.push(("bad-content-type".into(), b"hello".to_vec(), vec![("content-type", "text/plain")], "unsupported_content_type"));
    // what `kcat -P` sends for a JSON line that is not an object, and for an empty line
    bad.push(("bad-json-array".into(), br#"[{"document_id": "x"}]"#.to_vec(), vec![], "schema_mismatch"));
    bad.push(("bad-empty".into(), Vec::new(), vec![], "undecodable"));
    // and for a line of text: named as text, not by Avro's reading of it
    bad.push(("bad-text".into(), b"doc-7,2026-11-30,NAVY".to_vec(), vec![], "undecodable"));

    // valid, bad, valid, bad, ... valid
    let mut messages = Vec::new();
    let mut valid_ids = Vec::new();
    for (i, (key, payload, headers, _)) in bad.iter().enumerate() {
        let d = valid(i as u64);
        valid_ids.push(d.document_id.clone());
        messages.push((d.document_id.clone(), encode(&d, WireFormat::Avro).unwrap(), vec![avro]));
        messages.push((key.clone(), payload.clone(), headers.clone()));
    }
    let last = valid(100);
    valid_ids.push(last.document_id.clone());
    messages.push((last.document_id.clone(), encode(&last, WireFormat::Json).unwrap(), vec![json]));

    // one partition's worth of order is enough here: produce before starting the stage
    produce_raw(&cfg.topics.documents, messages).await;
    let stage = RunningStage::start(&cfg, load_registry(&cfg));
    let (dlq_topic, res_topic) = (cfg.topics.documents_dlq.clone(), cfg.topics.inference.clone());
    let n_bad = bad.len();
    let n_valid = valid_ids.len();
    let (dead, results) = tokio::task::spawn_blocking(move || {
        (read_topic(&dlq_topic, n_bad, Duration::from_secs(120), Duration::from_secs(2)), read_topic(&res_topic, n_valid, Duration::from_secs(120), Duration::from_secs(2)))
    })
    .await
    .unwrap();
    let summary = stage.stop().await;

    assert_eq!(dead.len(), bad.len(), "exactly one dead letter per bad message");
    let by_key: BTreeMap<String, &Read> = dead.iter().map(|r| (r.key.clone().unwrap(), r)).collect();
    for (key, payload, headers, class) in &bad {
        let r = by_key.get(key).unwrap_or_else(|| panic!("no dead letter for {key}"));
        assert_eq!(r.header(h::ERROR_CLASS), Some(*class), "{key}: {:?}", r.header(h::ERROR_MESSAGE));
        assert!(!r.header(h::ERROR_MESSAGE).unwrap_or("").is_empty(), "{key} has a reason");
        assert_eq!(r.header(h::SOURCE_TOPIC), Some(cfg.topics.documents.as_str()));
        assert!(r.header(h::SOURCE_PARTITION).unwrap().parse::<i32>().is_ok());
        assert!(r.header(h::SOURCE_OFFSET).unwrap().parse::<i64>().is_ok());
        assert_eq!(&r.payload, payload, "{key}: original bytes kept");
        assert_eq!(r.header("content-type"), headers.first().map(|h| h.1), "{key}: original headers kept");
        if key == "bad-json-array" {
            assert!(r.header(h::ERROR_MESSAGE).unwrap().contains("JSON but an array, not an object"), "{key}: {:?}", r.header(h::ERROR_MESSAGE));
        }
        if key == "bad-text" {
            assert!(r.header(h::ERROR_MESSAGE).unwrap().contains("it is text (\"doc-7,2026-11-30,NAVY\"), neither JSON nor Avro"), "{key}: {:?}", r.header(h::ERROR_MESSAGE));
        }
    }
    assert_eq!(results.len(), valid_ids.len(), "every valid document has exactly one result");
    let mut got: Vec<String> = results.iter().map(|r| r.result().document_id).collect();
    got.sort();
    valid_ids.sort();
    assert_eq!(got, valid_ids);
    assert_eq!(summary.dead_letters, bad.len() as u64);
    assert_eq!(summary.results, valid_ids.len() as u64);
}

/// A message the broker accepted but whose dead letter is over the producer's `message.max.bytes`:
/// it becomes a shortened dead letter (key, headers, reason, original size and sha256, the start of
/// the payload) and the stage goes on; a later SIGTERM still drains at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_too_large_to_publish_is_shortened_and_the_stage_goes_on() {
    use rdkafka::{
        admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
        client::DefaultClientContext,
        producer::{FutureProducer, FutureRecord},
    };
    use sha2::{Digest, Sha256};

    let mut cfg = isolated_config("dlq-huge").await;
    // this deployment's documents topic accepts 3 MB messages (the default broker limit is 1 MB)
    cfg.topics.documents = format!("{}.big", cfg.topics.documents);
    let admin: AdminClient<DefaultClientContext> = payslip_stream::kafka::client_config(&brokers(), &Default::default()).create().unwrap();
    let topic = NewTopic::new(&cfg.topics.documents, 3, TopicReplication::Fixed(1)).set("max.message.bytes", "3145728");
    for r in admin.create_topics(&[topic], &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)))).await.unwrap() {
        r.expect("documents topic created");
    }
    let huge = vec![b'x'; 2_500_000];
    let p: FutureProducer = payslip_stream::kafka::client_config(&brokers(), &Default::default()).set("message.max.bytes", "3145728").create().unwrap();
    let hs = payslip_stream::kafka::headers::HeaderSet::new().with("content-type", "application/json").with("trace-id", "huge-1").build();
    p.send(FutureRecord::to(&cfg.topics.documents).key("huge-1").payload(&huge).headers(hs), Duration::from_secs(60)).await.map_err(|(e, _)| e).expect("the broker accepts 2.5 MB");

    let gen = Generator::new(GeneratorConfig { seed: 78, ..Default::default() });
    let docs: Vec<_> = (0..100).map(|i| gen.document(i).document).collect();
    let stage = RunningStage::start(&cfg, load_registry(&cfg));
    produce_raw(&cfg.topics.documents, docs.iter().map(|d| (d.document_id.clone(), encode(d, WireFormat::Avro).unwrap(), vec![("content-type", "application/avro")])).collect()).await;
    let (dlq_topic, res_topic) = (cfg.topics.documents_dlq.clone(), cfg.topics.inference.clone());
    let (dead, results) = tokio::task::spawn_blocking(move || {
        (read_topic(&dlq_topic, 1, Duration::from_secs(120), Duration::from_secs(1)), read_topic(&res_topic, 100, Duration::from_secs(120), Duration::from_secs(1)))
    })
    .await
    .unwrap();
    let stopping = std::time::Instant::now();
    let summary = stage.stop().await;
    assert!(stopping.elapsed() < Duration::from_secs(15), "drained in {:?}", stopping.elapsed());

    assert_eq!(dead.len(), 1);
    let d = &dead[0];
    assert_eq!(d.key.as_deref(), Some("huge-1"));
    assert_eq!(d.header(h::ERROR_CLASS), Some("oversized"));
    assert_eq!(d.header("trace-id"), Some("huge-1"), "original headers kept");
    assert_eq!(d.header("dlq.original-size"), Some("2500000"));
    assert_eq!(d.header("dlq.original-sha256"), Some(hex::encode(Sha256::digest(&huge)).as_str()));
    assert!(d.header("dlq.truncated-because").is_some_and(|r| r.contains("too large") || r.contains("MessageSizeTooLarge")), "{:?}", d.header("dlq.truncated-because"));
    assert!(!d.payload.is_empty() && huge.starts_with(&d.payload), "the start of the payload is kept");
    assert_eq!(results.len(), 100, "every later document has its result");
    assert_eq!(summary.dead_letters, 1);
    assert_eq!(summary.results, 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_stamped_outside_the_event_time_limits_are_dead_lettered() {
    let cfg = isolated_config("dlq-time").await;
    let gen = Generator::new(GeneratorConfig { seed: 79, ..Default::default() });
    let now = chrono::Utc::now().timestamp_millis();
    let stamped = |i: u64, ts: i64| {
        let mut d = gen.document(i).document;
        d.submitted_at = ts;
        d
    };
    let bad = [stamped(0, i64::MAX), stamped(1, now + 365 * 24 * 3_600_000), stamped(2, now / 1000), stamped(3, i64::MIN)];
    let good: Vec<_> = (10..20).map(|i| stamped(i, now)).collect();
    let avro = ("content-type", "application/avro");
    let messages = bad.iter().chain(&good).map(|d| (d.document_id.clone(), encode(d, WireFormat::Avro).unwrap(), vec![avro])).collect();
    produce_raw(&cfg.topics.documents, messages).await;
    let stage = RunningStage::start(&cfg, load_registry(&cfg));
    let (dlq_topic, res_topic) = (cfg.topics.documents_dlq.clone(), cfg.topics.inference.clone());
    let (dead, results) = tokio::task::spawn_blocking(move || {
        (read_topic(&dlq_topic, 4, Duration::from_secs(120), Duration::from_secs(1)), read_topic(&res_topic, 10, Duration::from_secs(120), Duration::from_secs(1)))
    })
    .await
    .unwrap();
    let summary = stage.stop().await;

    assert_eq!(dead.len(), 4);
    for d in &dead {
        assert_eq!(d.header(h::ERROR_CLASS), Some("bad_timestamp"), "{:?}", d.key);
        assert!(d.header(h::ERROR_MESSAGE).is_some_and(|m| m.contains("submitted_at") && m.contains("limits.max_")), "{:?}", d.header(h::ERROR_MESSAGE));
    }
    let mut dead_ids: Vec<String> = dead.iter().filter_map(|d| d.key.clone()).collect();
    dead_ids.sort();
    let mut bad_ids: Vec<String> = bad.iter().map(|d| d.document_id.clone()).collect();
    bad_ids.sort();
    assert_eq!(dead_ids, bad_ids);
    assert_eq!(results.len(), 10);
    assert_eq!(summary.results, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_limit_the_dead_letter_topic_cannot_hold_stops_start_up_naming_both_settings() {
    use rdkafka::{
        admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
        client::DefaultClientContext,
    };

    let mut cfg = isolated_config("dlq-small").await;
    // an operator's dead-letter topic that takes records of 100 kB at most
    cfg.topics.documents_dlq = format!("{}.small", cfg.topics.documents_dlq);
    let admin: AdminClient<DefaultClientContext> = payslip_stream::kafka::client_config(&brokers(), &Default::default()).create().unwrap();
    let topic = NewTopic::new(&cfg.topics.documents_dlq, 1, TopicReplication::Fixed(1)).set("max.message.bytes", "100000");
    for r in admin.create_topics(&[topic], &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)))).await.unwrap() {
        r.expect("created");
    }
    let (_stop, rx) = tokio::sync::watch::channel(false);
    let stage = payslip_stream::infer::InferStage::new(cfg.clone(), brokers(), load_registry(&cfg));
    let err = tokio::time::timeout(Duration::from_secs(60), stage.run(rx)).await.expect("refuses at once instead of running").expect_err("refuses to start");
    let msg = err.to_string();
    assert!(msg.contains("limits.max_payload_bytes") && msg.contains("max.message.bytes") && msg.contains(&cfg.topics.documents_dlq), "{msg}");
    assert!(!err.retryable());

    // within what the topic holds, it starts
    cfg.limits.max_payload_bytes = 30_000;
    let stage = RunningStage::start(&cfg, load_registry(&cfg));
    stage.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_the_heaviest_documents_within_limits_is_answered_in_full() {
    // the default limits (1 MB values, 1,024 text lines): 40 documents as heavy as they allow, with
    // ordinary ones between them; the stage answers every one and keeps running
    let cfg = isolated_config("heavy-burst").await;
    let gen = Generator::new(GeneratorConfig { seed: 79, ..Default::default() });
    let mut docs = Vec::new();
    for i in 0..40u64 {
        docs.push(gen.worst_case(i, &cfg.limits));
        docs.push(gen.document(1_000 + i).document);
    }
    let stage = RunningStage::start(&cfg, load_registry(&cfg));
    produce_raw(&cfg.topics.documents, docs.iter().map(|d| (d.document_id.clone(), encode(d, WireFormat::Avro).unwrap(), vec![("content-type", "application/avro")])).collect()).await;
    let res_topic = cfg.topics.inference.clone();
    let results = tokio::task::spawn_blocking(move || read_topic(&res_topic, 80, Duration::from_secs(180), Duration::from_secs(1))).await.unwrap();
    let summary = stage.stop().await;
    let answered: std::collections::BTreeSet<String> = results.iter().map(|r| r.result().document_id).collect();
    assert_eq!(answered, docs.iter().map(|d| d.document_id.clone()).collect(), "every document answered");
    assert_eq!((summary.results, summary.dead_letters), (80, 0));
    assert!(results.iter().all(|r| r.result().error_code.is_none()), "no document failed");
    let heavy = results.iter().map(|r| r.result()).find(|r| r.document_id == docs[0].document_id).unwrap();
    let text = heavy.outputs.iter().find(|o| o.model == "text_recognition").unwrap();
    assert_eq!(text.lines.len(), cfg.limits.max_lines_per_document, "every line of a heavy document read");
}
