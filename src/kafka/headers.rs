//! Message headers a person can read with `kcat -f '%h'`: every value is UTF-8 text.

use rdkafka::message::{Header, Headers, OwnedHeaders};

pub const CONTENT_TYPE: &str = "content-type";
pub const SCHEMA: &str = "schema";
pub const TRACE_ID: &str = "trace-id";
pub const MODEL_VERSIONS: &str = "model-versions";
pub const PROVIDER: &str = "provider";
pub const RESULT_ID: &str = "result-id";
pub const SOURCE: &str = "source";
pub const ERROR_CLASS: &str = "error.class";
pub const ERROR_MESSAGE: &str = "error.message";
pub const SOURCE_TOPIC: &str = "source.topic";
pub const SOURCE_PARTITION: &str = "source.partition";
pub const SOURCE_OFFSET: &str = "source.offset";
/// `baseline` or `canary`.
pub const COHORT: &str = "cohort";
/// The rollout decisions a document was routed under: `rollout_id@seq:traffic_percent`, comma-separated.
pub const ROLLOUT: &str = "rollout";

/// First value of header `key` as text (lossy for non-UTF-8).
pub fn get<H: Headers>(headers: Option<&H>, key: &str) -> Option<String> {
    let h = headers?;
    h.iter().find(|h| h.key.eq_ignore_ascii_case(key)).and_then(|h| h.value).map(|v| String::from_utf8_lossy(v).into_owned())
}

/// [`get`] without a copy when the value is valid UTF-8 (for the per-message paths).
pub fn get_str<'a, H: Headers>(headers: Option<&'a H>, key: &str) -> Option<std::borrow::Cow<'a, str>> {
    let h = headers?;
    h.iter().find(|h| h.key.eq_ignore_ascii_case(key)).and_then(|h| h.value).map(String::from_utf8_lossy)
}

/// Builder over `OwnedHeaders` for text values.
#[derive(Debug, Clone, Default)]
pub struct HeaderSet(Vec<(String, Vec<u8>)>);

impl HeaderSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Copies every header of `h` (binary values kept as they are).
    pub fn copy_from<H: Headers>(mut self, h: Option<&H>) -> Self {
        if let Some(h) = h {
            for hdr in h.iter() {
                self.0.push((hdr.key.to_string(), hdr.value.map(<[u8]>::to_vec).unwrap_or_default()));
            }
        }
        self
    }

    pub fn with(mut self, key: &str, value: impl AsRef<str>) -> Self {
        self.0.push((key.to_string(), value.as_ref().as_bytes().to_vec()));
        self
    }

    pub fn build(&self) -> OwnedHeaders {
        let mut out = OwnedHeaders::new_with_capacity(self.0.len());
        for (k, v) in &self.0 {
            out = out.insert(Header { key: k, value: Some(v) });
        }
        out
    }
}
