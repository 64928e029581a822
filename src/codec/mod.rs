//! Encoding of every record the project puts on or takes off a topic.
//!
//! Values are Avro datums (schemas in `schemas/`, embedded at build time) or JSON; the
//! `content-type` header says which. A value without the header is sniffed: `{` starts JSON, anything
//! else is tried as Avro. Decoding never panics on outside bytes; it returns a [`DecodeError`] whose
//! class names the dead-letter reason.

pub mod avro;
pub mod binary;
pub mod text_enum;

use serde::{de::DeserializeOwned, Serialize};

pub const CONTENT_TYPE_AVRO: &str = "application/avro";
pub const CONTENT_TYPE_JSON: &str = "application/json";

/// Wire format of a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WireFormat {
    Avro,
    Json,
}

impl std::str::FromStr for WireFormat {
    type Err = text_enum::UnknownVariant;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "avro" => Ok(WireFormat::Avro),
            "json" => Ok(WireFormat::Json),
            _ => Err(text_enum::UnknownVariant { kind: "wire format", value: s.to_string(), expected: &["avro", "json"] }),
        }
    }
}

impl WireFormat {
    pub fn content_type(self) -> &'static str {
        match self {
            WireFormat::Avro => CONTENT_TYPE_AVRO,
            WireFormat::Json => CONTENT_TYPE_JSON,
        }
    }
}

/// A record type with an Avro schema in `schemas/`.
pub trait Record: Serialize + DeserializeOwned + 'static {
    /// Full Avro name, written to the `schema` header.
    const SCHEMA_NAME: &'static str;
    /// The `.avsc` text.
    const SCHEMA_TEXT: &'static str;

    /// The Avro datum of `self`: through `apache-avro` unless the record has a direct codec
    /// ([`binary`], for the records on the per-document path).
    fn to_avro(&self) -> Result<Vec<u8>, EncodeError> {
        avro::encode(self).map_err(|e| EncodeError { record: Self::SCHEMA_NAME, format: WireFormat::Avro, message: e.to_string() })
    }

    /// Reads one whole Avro datum (see [`to_avro`](Self::to_avro)).
    fn from_avro(bytes: &[u8]) -> Result<Self, DecodeError> {
        avro::decode(bytes)
    }
}

/// The records with a direct codec.
macro_rules! binary_avro {
    () => {
        fn to_avro(&self) -> Result<Vec<u8>, EncodeError> {
            Ok(binary::to_datum(self))
        }
        fn from_avro(bytes: &[u8]) -> Result<Self, DecodeError> {
            binary::from_datum(bytes, Self::SCHEMA_NAME).map_err(|e| DecodeError::Undecodable { format: "avro", message: e.0 })
        }
    };
}

impl Record for crate::document::PayslipDocument {
    const SCHEMA_NAME: &'static str = "payslip.v1.PayslipDocument";
    const SCHEMA_TEXT: &'static str = include_str!("../../schemas/payslip_document.avsc");
    binary_avro!();
}
impl Record for crate::document::InferenceResult {
    const SCHEMA_NAME: &'static str = "payslip.v1.InferenceResult";
    const SCHEMA_TEXT: &'static str = include_str!("../../schemas/inference_result.avsc");
    binary_avro!();
}
impl Record for crate::document::DocumentFeedback {
    const SCHEMA_NAME: &'static str = "payslip.v1.DocumentFeedback";
    const SCHEMA_TEXT: &'static str = include_str!("../../schemas/document_feedback.avsc");
    binary_avro!();
}

/// Why bytes could not become a record. `class()` goes into the dead-letter headers.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    /// The bytes are not a value of the declared format at all.
    #[error("undecodable {format}: {message}")]
    Undecodable { format: &'static str, message: String },
    /// Well-formed, but not the shape of the record (wrong types, unknown writer schema).
    #[error("schema mismatch: {0}")]
    SchemaMismatch(String),
    /// Well-formed, but a required field is absent.
    #[error("missing field: {0}")]
    MissingField(String),
    /// A `content-type` this project does not read.
    #[error("unsupported content-type {0:?} (expected application/avro or application/json)")]
    UnsupportedContentType(String),
}

impl DecodeError {
    /// Never: the same bytes decode the same way every time (they go to a dead-letter topic).
    pub fn retryable(&self) -> bool {
        false
    }

    pub fn class(&self) -> &'static str {
        match self {
            DecodeError::Undecodable { .. } => "undecodable",
            DecodeError::SchemaMismatch(_) => "schema_mismatch",
            DecodeError::MissingField(_) => "missing_field",
            DecodeError::UnsupportedContentType(_) => "unsupported_content_type",
        }
    }
}

/// Failure to encode one of our own records: a bug, never outside input.
#[derive(Debug, thiserror::Error)]
#[error("cannot encode {record} as {format:?}: {message}")]
pub struct EncodeError {
    pub record: &'static str,
    pub format: WireFormat,
    pub message: String,
}

impl EncodeError {
    /// Never: our own record is wrong (a defect), and it stays wrong.
    pub fn retryable(&self) -> bool {
        false
    }
}

pub fn encode<T: Record>(value: &T, format: WireFormat) -> Result<Vec<u8>, EncodeError> {
    let err = |message: String| EncodeError { record: T::SCHEMA_NAME, format, message };
    match format {
        WireFormat::Json => serde_json::to_vec(value).map_err(|e| err(e.to_string())),
        WireFormat::Avro => value.to_avro(),
    }
}

/// Decodes a value whose `content-type` header is `content_type` (None: sniff).
pub fn decode<T: Record>(bytes: &[u8], content_type: Option<&str>) -> Result<T, DecodeError> {
    match wire_format(bytes, content_type)? {
        WireFormat::Json => decode_json(bytes),
        WireFormat::Avro => T::from_avro(bytes).map_err(|e| unlabelled::<T>(bytes, content_type, e)),
    }
}

/// [`decode`] of an inference result for counting it: in Avro, the fields no window uses are
/// checked but left empty ([`binary::read_result_counted`]); JSON decodes in full.
pub fn decode_result_counted(bytes: &[u8], content_type: Option<&str>) -> Result<crate::document::InferenceResult, DecodeError> {
    match wire_format(bytes, content_type)? {
        WireFormat::Json => decode_json(bytes),
        WireFormat::Avro => binary::read_result_counted(bytes)
            .map_err(|e| unlabelled::<crate::document::InferenceResult>(bytes, content_type, DecodeError::Undecodable { format: "avro", message: e.0 })),
    }
}

/// The error for a value that failed as Avro. A value without a `content-type` header that is not
/// Avro may be JSON that does not start with `{` (`kcat -P` with an array, a number, `null`): its
/// error then says what it is and that a record in JSON is one object, where Avro's own message
/// (a negative string length, a truncated varint) would mislead. An empty value says so.
fn unlabelled<T: Record>(bytes: &[u8], content_type: Option<&str>, avro: DecodeError) -> DecodeError {
    if content_type.is_some() {
        return avro;
    }
    if bytes.is_empty() {
        return DecodeError::Undecodable { format: "value", message: "it is empty (0 bytes): expected an Avro datum or a JSON object".into() };
    }
    // well-formed JSON, checked without building it (a value may be a megabyte of array)
    if let Err(json) = serde_json::from_slice::<serde::de::IgnoredAny>(bytes) {
        return not_json(bytes, avro, &json);
    }
    let what = match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'[') => "an array",
        Some(b'"') => "a string",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        Some(b'-' | b'0'..=b'9') => "a number",
        // `{` after whitespace is sniffed as JSON and never gets here
        _ => return avro,
    };
    DecodeError::SchemaMismatch(format!(
        "the value is JSON but {what}, not an object: a {} in JSON is one object (without a content-type header, a value is read as JSON only when it starts with `{{`)",
        T::SCHEMA_NAME
    ))
}

/// An unlabelled value that is neither Avro nor JSON. Text (a line typed into `kcat -P`, CSV, a
/// truncated JSON array) is named as text, with why it is not JSON and why not Avro, since Avro's
/// message alone ("negative string length") says nothing to whoever typed it; other bytes keep
/// Avro's message.
fn not_json(bytes: &[u8], avro: DecodeError, json: &serde_json::Error) -> DecodeError {
    let Ok(text) = std::str::from_utf8(bytes) else { return avro };
    if text.chars().any(|c| c.is_control() && !c.is_whitespace()) {
        return avro;
    }
    let as_avro = match avro {
        DecodeError::Undecodable { message, .. } => message,
        other => other.to_string(),
    };
    let start: String = text.trim_start().chars().take(24).collect();
    let more = if text.trim_start().chars().nth(24).is_some() { "..." } else { "" };
    DecodeError::Undecodable {
        format: "value",
        message: format!(
            "it is text ({start:?}{more}), neither JSON nor Avro: as JSON, {json}; as Avro, {as_avro} (a record in JSON is one object, starting with `{{`)"
        ),
    }
}

/// The format named by the content type, or sniffed from the bytes without one.
fn wire_format(bytes: &[u8], content_type: Option<&str>) -> Result<WireFormat, DecodeError> {
    Ok(match content_type.map(|c| c.split(';').next().unwrap_or("").trim().to_ascii_lowercase()) {
        Some(c) if c == CONTENT_TYPE_AVRO || c == "avro/binary" => WireFormat::Avro,
        Some(c) if c == CONTENT_TYPE_JSON || c == "json" => WireFormat::Json,
        Some(c) => return Err(DecodeError::UnsupportedContentType(c)),
        None => sniff(bytes),
    })
}

fn sniff(bytes: &[u8]) -> WireFormat {
    match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => WireFormat::Json,
        _ => WireFormat::Avro,
    }
}

fn decode_json<T: Record>(bytes: &[u8]) -> Result<T, DecodeError> {
    serde_json::from_slice(bytes).map_err(|e| {
        use serde_json::error::Category;
        let message = e.to_string();
        match e.classify() {
            Category::Data if message.starts_with("missing field") => DecodeError::MissingField(message),
            Category::Data => DecodeError::SchemaMismatch(message),
            Category::Syntax | Category::Eof | Category::Io => DecodeError::Undecodable { format: "json", message },
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::document::PayslipDocument;

    #[test]
    fn json_error_classes() {
        let e = decode::<PayslipDocument>(b"{not json", Some("application/json")).unwrap_err();
        assert_eq!(e.class(), "undecodable");
        let e = decode::<PayslipDocument>(br#"{"document_id": 7}"#, None).unwrap_err();
        assert_eq!(e.class(), "schema_mismatch");
        let e = decode::<PayslipDocument>(br#"{"document_id": "a"}"#, None).unwrap_err();
        assert_eq!(e.class(), "missing_field");
        let e = decode::<PayslipDocument>(b"{}", Some("text/plain")).unwrap_err();
        assert_eq!(e.class(), "unsupported_content_type");
    }

    #[test]
    fn unlabelled_json_that_is_not_an_object_is_named_as_such_and_avro_errors_stay_for_the_rest() {
        for (bytes, what) in [(&b"[1, 2]"[..], "an array"), (b" 12345\n", "a number"), (b"null", "null"), (b"\"payslip\"", "a string"), (b"true", "a boolean")] {
            let e = decode::<PayslipDocument>(bytes, None).unwrap_err();
            assert_eq!(e.class(), "schema_mismatch", "{e}");
            assert!(e.to_string().contains(&format!("JSON but {what}, not an object")), "{e}");
            let e = decode_result_counted(bytes, None).unwrap_err();
            assert!(e.to_string().contains(&format!("JSON but {what}")) && e.to_string().contains("InferenceResult"), "{e}");
        }
        let e = decode::<PayslipDocument>(b"", None).unwrap_err();
        assert_eq!((e.class(), e.to_string().as_str()), ("undecodable", "undecodable value: it is empty (0 bytes): expected an Avro datum or a JSON object"));
        // labelled Avro keeps Avro's own message, and so do bytes that are neither JSON nor text
        for (bytes, ct) in [(&b"12345"[..], Some("application/avro")), (b"\x02\xff\xff", None), (b"hello\x01world", None)] {
            let e = decode::<PayslipDocument>(bytes, ct).unwrap_err();
            assert!(e.to_string().starts_with("undecodable avro:"), "{e}");
        }
        // text that is not JSON says so, with both reasons
        for (bytes, start) in [(&b"[[["[..], "\"[[[\""), (b"hello world", "\"hello world\""), (b"  doc-1,2026-01-01,NAVY,extra text past the cut\n", "\"doc-1,2026-01-01,NAVY,ex\"...")] {
            let e = decode::<PayslipDocument>(bytes, None).unwrap_err();
            let m = e.to_string();
            assert_eq!(e.class(), "undecodable", "{m}");
            assert!(m.starts_with(&format!("undecodable value: it is text ({start}), neither JSON nor Avro: as JSON, ")), "{m}");
            assert!(m.contains("; as Avro, ") && m.ends_with("(a record in JSON is one object, starting with `{`)"), "{m}");
            assert!(decode_result_counted(bytes, None).unwrap_err().to_string().contains("it is text"), "the monitor's inputs too");
        }
        // a deeply nested array is checked without recursion, and named like any other array
        let deep = "[".repeat(100_000) + &"]".repeat(100_000);
        assert!(decode::<PayslipDocument>(deep.as_bytes(), None).unwrap_err().to_string().contains("JSON but an array"));
        let unclosed = "[".repeat(100_000);
        assert!(decode::<PayslipDocument>(unclosed.as_bytes(), None).unwrap_err().to_string().starts_with("undecodable value: it is text (\"[[[[[[[[[[[[[[[[[[[[[[[[\"...), neither JSON nor Avro"));
    }
}
