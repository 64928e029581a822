//! Avro datums against the embedded schemas in `schemas/`.
//!
//! Values are plain Avro binary datums, no registry prefix. The writer's schema is identified by the
//! `schema` header (full name); this build knows exactly one writer schema per record (the file in
//! `schemas/`). Schema evolution follows `schemas/README.md`: optional fields are added only, and
//! readers are upgraded before writers.

use std::{any::TypeId, collections::HashMap, sync::{Mutex, OnceLock}};

use apache_avro::Schema;

use super::{DecodeError, Record};

fn schema_for<T: Record + 'static>() -> &'static Schema {
    static CACHE: OnceLock<Mutex<HashMap<TypeId, &'static Schema>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let mut guard = cache.lock().unwrap_or_else(|p| p.into_inner());
    guard.entry(TypeId::of::<T>()).or_insert_with(|| {
        // The schema text is compiled in and covered by tests: failing here is a build defect.
        let schema = Schema::parse_str(T::SCHEMA_TEXT)
            .unwrap_or_else(|e| panic!("embedded schema {} does not parse: {e}", T::SCHEMA_NAME));
        Box::leak(Box::new(schema))
    })
}

/// Parses an embedded schema (for `inspect` and tests).
pub fn parsed_schema<T: Record + 'static>() -> &'static Schema {
    schema_for::<T>()
}

pub(super) fn encode<T: Record>(value: &T) -> apache_avro::AvroResult<Vec<u8>>
where
    T: 'static,
{
    let schema = schema_for::<T>();
    let v = apache_avro::to_value(value)?.resolve(schema)?;
    apache_avro::to_avro_datum(schema, v)
}

pub(super) fn decode<T: Record + 'static>(bytes: &[u8]) -> Result<T, DecodeError> {
    let schema = schema_for::<T>();
    let mut reader = bytes;
    let value = apache_avro::from_avro_datum(schema, &mut reader, None)
        .map_err(|e| DecodeError::Undecodable { format: "avro", message: e.to_string() })?;
    if !reader.is_empty() {
        return Err(DecodeError::Undecodable {
            format: "avro",
            message: format!("{} trailing bytes after the {} datum", reader.len(), T::SCHEMA_NAME),
        });
    }
    apache_avro::from_value::<T>(&value).map_err(|e| DecodeError::SchemaMismatch(e.to_string()))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use crate::codec::{decode, encode, WireFormat};
    use crate::document::*;
    use crate::synth::{Generator, GeneratorConfig};

    fn result() -> InferenceResult {
        InferenceResult {
            result_id: "d/inference".into(),
            document_id: "d".into(),
            user_id: "u".into(),
            tenant: "t".into(),
            cohort: "baseline".into(),
            submitted_at: 1_700_000_000_000,
            processed_at: 1_700_000_000_100,
            provider: "CPUExecutionProvider".into(),
            model_versions: HashMap::from([("document_classifier".into(), "1.0.0".into())]),
            outputs: vec![ModelOutput {
                model: "document_classifier".into(),
                version: "1.0.0".into(),
                provider: "CPUExecutionProvider".into(),
                latency_ms: 1.5,
                batch_size: 4,
                error_code: None,
                label: Some("PCDA".into()),
                confidence: Some(0.9),
                regions: vec![Region { page: 1, x: 1.0, y: 2.0, w: 3.0, h: 4.0, score: 0.7 }],
                lines: vec!["BASIC PAY".into()],
                load_ms: Some(12.5),
            }],
            inference_ms: 1.5,
            end_to_end_ms: 100.0,
            error_code: Some("X".into()),
            true_format: None,
            source: "t/0/1".into(),
            process_rss_bytes: Some(50_000_000),
            process_cpu_percent: None,
        }
    }

    #[test]
    fn every_record_round_trips_through_avro_and_json() {
        let doc = Generator::new(GeneratorConfig::default()).document(1).document;
        for f in [WireFormat::Avro, WireFormat::Json] {
            let b = encode(&doc, f).unwrap();
            assert_eq!(decode::<PayslipDocument>(&b, Some(f.content_type())).unwrap(), doc);
            let r = result();
            assert_eq!(decode::<InferenceResult>(&encode(&r, f).unwrap(), Some(f.content_type())).unwrap(), r);
            let fb = DocumentFeedback { document_id: "d".into(), user_id: "u".into(), given_at: 5, corrected_format: None, corrected_net_pay: Some(1.0), rating: Some(4) };
            assert_eq!(decode::<DocumentFeedback>(&encode(&fb, f).unwrap(), Some(f.content_type())).unwrap(), fb);
        }
    }

    #[test]
    fn avro_without_header_is_sniffed() {
        let doc = Generator::new(GeneratorConfig::default()).document(2).document;
        let b = encode(&doc, WireFormat::Avro).unwrap();
        assert_eq!(decode::<PayslipDocument>(&b, None).unwrap(), doc);
    }

    #[test]
    fn truncated_or_trailing_avro_is_undecodable() {
        let doc = Generator::new(GeneratorConfig::default()).document(3).document;
        let b = encode(&doc, WireFormat::Avro).unwrap();
        assert_eq!(decode::<PayslipDocument>(&b[..b.len() / 2], Some("application/avro")).unwrap_err().class(), "undecodable");
        let mut longer = b.clone();
        longer.extend_from_slice(b"xx");
        assert_eq!(decode::<PayslipDocument>(&longer, Some("application/avro")).unwrap_err().class(), "undecodable");
        assert_eq!(decode::<PayslipDocument>(&[0xff; 7], None).unwrap_err().class(), "undecodable");
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = decode::<PayslipDocument>(&bytes, Some("application/avro"));
            let _ = decode::<PayslipDocument>(&bytes, Some("application/json"));
            let _ = decode::<InferenceResult>(&bytes, None);
        }
    }
}
