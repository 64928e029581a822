//! Records that cross topic boundaries: `PayslipDocument` in, `InferenceResult` out,
//! `DocumentFeedback` from users.
//!
//! The serde shapes here are the Avro schemas in `schemas/` field for field (a unit test in
//! `codec::avro` round-trips each one), and also the JSON that kcat users produce.
//! `PayslipDocument::validate` is the only place that decides whether a decoded document is usable;
//! everything it rejects goes to the dead-letter topic with the returned class.

use serde::{Deserialize, Serialize};

/// Row-major grayscale image. `GRAY8`: one byte per pixel, 255 = ink. `GRAYF32LE`: little-endian f32
/// per pixel in `[0, 1]`, 1 = ink.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Raster {
    pub width: i32,
    pub height: i32,
    pub encoding: RasterEncoding,
    #[serde(with = "serde_bytes")]
    pub pixels: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[allow(clippy::upper_case_acronyms)]
pub enum RasterEncoding {
    GRAY8,
    GRAYF32LE,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
pub struct BoundingBox {
    pub x: f32,
    pub y: f32,
    pub w: f32,
    pub h: f32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextLine {
    pub text: String,
    pub bbox: BoundingBox,
    #[serde(default)]
    pub raster: Option<Raster>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Page {
    pub number: i32,
    pub width: f32,
    pub height: f32,
    pub lines: Vec<TextLine>,
    #[serde(default)]
    pub raster: Option<Raster>,
}

/// Labels carried by golden traffic (documents whose truth is known).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroundTruth {
    pub format: String,
    #[serde(default)]
    pub tables: Vec<BoundingBox>,
    #[serde(default)]
    pub net_pay: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PayslipDocument {
    pub document_id: String,
    pub user_id: String,
    pub tenant: String,
    /// Milliseconds since the Unix epoch (Avro `timestamp-millis`).
    pub submitted_at: i64,
    #[serde(default)]
    pub format_hint: Option<String>,
    pub pages: Vec<Page>,
    #[serde(default)]
    pub labels: Option<GroundTruth>,
}

/// Limits a document must respect; from the `limits` section of the pipeline config.
#[derive(Debug, Clone, Copy)]
pub struct DocumentLimits {
    pub max_pages: usize,
    pub max_lines_per_page: usize,
    pub max_raster_pixels: usize,
}

impl Default for DocumentLimits {
    fn default() -> Self {
        Self { max_pages: 16, max_lines_per_page: 400, max_raster_pixels: 4_000_000 }
    }
}

/// Why a decoded document cannot be processed. The `class()` is written into the dead-letter
/// header `error.class`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InvalidDocument {
    #[error("missing field: {0}")]
    MissingField(&'static str),
    #[error("too large: {0}")]
    Oversized(String),
    #[error("invalid raster at {location}: {reason}")]
    InvalidRaster { location: String, reason: RasterError },
    /// A number that is NaN or infinite (it would come out as NaN coordinates or amounts).
    #[error("{field} is not a finite number ({value})")]
    NotFinite { field: String, value: f64 },
}

/// Why a raster's pixels cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RasterError {
    #[error("non-positive size {width}x{height}")]
    Size { width: i32, height: i32 },
    #[error("{bytes} bytes for {width}x{height} {encoding} (expected {expected})")]
    Length { bytes: usize, width: i32, height: i32, encoding: &'static str, expected: usize },
    #[error("pixel {index} is not finite ({value})")]
    NotFinite { index: usize, value: f32 },
    #[error("pixel {index} is {value}, outside [0, 1]")]
    OutOfRange { index: usize, value: f32 },
}

impl RasterError {
    /// Never: the document itself is wrong (it goes to the dead-letter topic).
    pub fn retryable(&self) -> bool {
        false
    }
}

impl InvalidDocument {
    /// Never: the document itself is wrong (it goes to the dead-letter topic).
    pub fn retryable(&self) -> bool {
        false
    }

    pub fn class(&self) -> &'static str {
        match self {
            InvalidDocument::MissingField(_) => "missing_field",
            InvalidDocument::Oversized(_) => "oversized",
            InvalidDocument::InvalidRaster { .. } => "invalid_raster",
            InvalidDocument::NotFinite { .. } => "not_finite",
        }
    }
}

impl Raster {
    /// Checks that the size is positive and the byte count matches it.
    pub fn check_size(&self) -> Result<(), RasterError> {
        if self.width <= 0 || self.height <= 0 {
            return Err(RasterError::Size { width: self.width, height: self.height });
        }
        let n = self.width as usize * self.height as usize;
        let (encoding, expected) = match self.encoding {
            RasterEncoding::GRAY8 => ("GRAY8", n),
            RasterEncoding::GRAYF32LE => ("GRAYF32LE", n * 4),
        };
        if self.pixels.len() != expected {
            return Err(RasterError::Length { bytes: self.pixels.len(), width: self.width, height: self.height, encoding, expected });
        }
        Ok(())
    }

    /// What [`Raster::intensities`] checks (size, length, and every GRAYF32LE value finite and in
    /// `[0, 1]`), without converting or allocating: validation runs on every raster of every
    /// document, and building the float image only to check it was a tenth of the stage's CPU.
    pub fn validate(&self) -> Result<(), RasterError> {
        self.check_size()?;
        if self.encoding == RasterEncoding::GRAYF32LE {
            for i in 0..self.pixels.len() / 4 {
                self.intensity_at(i)?;
            }
        }
        Ok(())
    }

    /// The intensity of pixel `i` (row-major) of a raster whose size was checked, in `[0, 1]`.
    pub fn intensity_at(&self, i: usize) -> Result<f32, RasterError> {
        match self.encoding {
            RasterEncoding::GRAY8 => Ok(self.pixels[i] as f32 / 255.0),
            RasterEncoding::GRAYF32LE => {
                let c = &self.pixels[i * 4..i * 4 + 4];
                let v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                if !v.is_finite() {
                    return Err(RasterError::NotFinite { index: i, value: v });
                }
                if !(0.0..=1.0).contains(&v) {
                    return Err(RasterError::OutOfRange { index: i, value: v });
                }
                Ok(v)
            }
        }
    }

    /// Pixel intensities in `[0, 1]` (1 = ink), checked: sizes agree, values finite and in range.
    pub fn intensities(&self) -> Result<Vec<f32>, RasterError> {
        self.check_size()?;
        (0..self.width as usize * self.height as usize).map(|i| self.intensity_at(i)).collect()
    }
}

impl PayslipDocument {
    /// Checks everything inference relies on. Rasters are fully checked here (NaN, sizes), so the
    /// inference stage never sees a malformed tensor.
    /// Every floating-point field is finite: page sizes, line boxes, labelled tables and amounts.
    fn check_finite(&self) -> Result<(), InvalidDocument> {
        let bad = |field: String, value: f64| Err(InvalidDocument::NotFinite { field, value });
        let check_box = |field: &str, b: &BoundingBox| -> Result<(), InvalidDocument> {
            for (name, v) in [("x", b.x), ("y", b.y), ("w", b.w), ("h", b.h)] {
                if !v.is_finite() {
                    return bad(format!("{field}.{name}"), v as f64);
                }
            }
            Ok(())
        };
        for page in &self.pages {
            for (name, v) in [("width", page.width), ("height", page.height)] {
                if !v.is_finite() {
                    return bad(format!("page {} {name}", page.number), v as f64);
                }
            }
            for (i, line) in page.lines.iter().enumerate() {
                check_box(&format!("page {} line {i} bbox", page.number), &line.bbox)?;
            }
        }
        if let Some(l) = &self.labels {
            for (i, t) in l.tables.iter().enumerate() {
                check_box(&format!("labels.tables[{i}]"), t)?;
            }
            if let Some(v) = l.net_pay.filter(|v| !v.is_finite()) {
                return bad("labels.net_pay".into(), v);
            }
        }
        Ok(())
    }

    pub fn validate(&self, limits: &DocumentLimits) -> Result<(), InvalidDocument> {
        if self.document_id.trim().is_empty() {
            return Err(InvalidDocument::MissingField("document_id"));
        }
        if self.user_id.trim().is_empty() {
            return Err(InvalidDocument::MissingField("user_id"));
        }
        if self.pages.is_empty() {
            return Err(InvalidDocument::MissingField("pages"));
        }
        if self.pages.len() > limits.max_pages {
            return Err(InvalidDocument::Oversized(format!("{} pages (limit {})", self.pages.len(), limits.max_pages)));
        }
        self.check_finite()?;
        for page in &self.pages {
            if page.lines.len() > limits.max_lines_per_page {
                return Err(InvalidDocument::Oversized(format!(
                    "page {} has {} lines (limit {})",
                    page.number,
                    page.lines.len(),
                    limits.max_lines_per_page
                )));
            }
            // (line index or None for the page raster, raster); where it is is spelled out on error only
            let rasters = page.raster.iter().map(|r| (None, r)).chain(page.lines.iter().enumerate().filter_map(|(i, l)| l.raster.as_ref().map(|r| (Some(i), r))));
            for (line, raster) in rasters {
                let location = || match line {
                    None => format!("page {}", page.number),
                    Some(i) => format!("page {} line {i}", page.number),
                };
                let pixels = raster.width.max(0) as usize * raster.height.max(0) as usize;
                if pixels > limits.max_raster_pixels {
                    return Err(InvalidDocument::Oversized(format!(
                        "{} raster has {pixels} pixels (limit {})",
                        location(),
                        limits.max_raster_pixels
                    )));
                }
                raster.validate().map_err(|reason| InvalidDocument::InvalidRaster { location: location(), reason })?;
            }
        }
        Ok(())
    }

    /// All text of the document, in reading order; the classifier's input.
    pub fn full_text(&self) -> String {
        let mut s = String::new();
        for page in &self.pages {
            for line in &page.lines {
                s.push_str(&line.text);
                s.push('\n');
            }
        }
        s
    }
}

/// One model's answer for one document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelOutput {
    pub model: String,
    pub version: String,
    pub provider: String,
    pub latency_ms: f64,
    pub batch_size: i32,
    #[serde(default)]
    pub error_code: Option<String>,
    #[serde(default)]
    pub label: Option<String>,
    #[serde(default)]
    pub confidence: Option<f32>,
    #[serde(default)]
    pub regions: Vec<Region>,
    #[serde(default)]
    pub lines: Vec<String>,
    #[serde(default)]
    pub load_ms: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Region {
    pub page: i32,
    pub x: f32,
    pub y: f32,
    pub w: f32,
    pub h: f32,
    pub score: f32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InferenceResult {
    pub result_id: String,
    pub document_id: String,
    pub user_id: String,
    pub tenant: String,
    pub cohort: String,
    pub submitted_at: i64,
    pub processed_at: i64,
    pub provider: String,
    pub model_versions: std::collections::HashMap<String, String>,
    pub outputs: Vec<ModelOutput>,
    pub inference_ms: f64,
    pub end_to_end_ms: f64,
    #[serde(default)]
    pub error_code: Option<String>,
    #[serde(default)]
    pub true_format: Option<String>,
    pub source: String,
    #[serde(default)]
    pub process_rss_bytes: Option<i64>,
    #[serde(default)]
    pub process_cpu_percent: Option<f64>,
}

impl InferenceResult {
    /// The result id for a document: stable across redeliveries, so a duplicate is recognisable.
    pub fn id_for(document_id: &str) -> String {
        format!("{document_id}/inference")
    }

    pub fn output(&self, model: &str) -> Option<&ModelOutput> {
        self.outputs.iter().find(|o| o.model == model)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DocumentFeedback {
    pub document_id: String,
    pub user_id: String,
    pub given_at: i64,
    #[serde(default)]
    pub corrected_format: Option<String>,
    #[serde(default)]
    pub corrected_net_pay: Option<f64>,
    #[serde(default)]
    pub rating: Option<i32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raster(enc: RasterEncoding, pixels: Vec<u8>) -> Raster {
        Raster { width: 2, height: 1, encoding: enc, pixels }
    }

    #[test]
    fn non_finite_numbers_are_refused_with_the_field_named() {
        let limits = DocumentLimits { max_pages: 16, max_lines_per_page: 400, max_raster_pixels: 4_000_000 };
        let good = crate::synth::Generator::new(Default::default()).document(0).document;
        good.validate(&limits).unwrap();
        let mut d = good.clone();
        d.pages[0].width = f32::NAN;
        let e = d.validate(&limits).unwrap_err();
        assert_eq!(e.class(), "not_finite");
        assert!(e.to_string().contains("width"), "{e}");
        let mut d = good.clone();
        d.pages[0].lines[0].bbox.h = f32::INFINITY;
        assert!(d.validate(&limits).unwrap_err().to_string().contains("line 0 bbox.h"));
        let mut d = good;
        if let Some(l) = d.labels.as_mut() {
            l.net_pay = Some(f64::NEG_INFINITY);
            assert_eq!(d.validate(&limits).unwrap_err().class(), "not_finite");
        }
    }

    #[test]
    fn gray8_size_must_match() {
        assert!(raster(RasterEncoding::GRAY8, vec![0, 255]).intensities().is_ok());
        assert!(raster(RasterEncoding::GRAY8, vec![0]).intensities().is_err());
    }

    #[test]
    fn f32_rejects_nan_and_out_of_range() {
        let ok: Vec<u8> = [0.0f32, 1.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(raster(RasterEncoding::GRAYF32LE, ok).intensities().unwrap(), vec![0.0, 1.0]);
        let nan: Vec<u8> = [0.0f32, f32::NAN].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert!(raster(RasterEncoding::GRAYF32LE, nan).intensities().unwrap_err().to_string().contains("not finite"));
        let big: Vec<u8> = [0.0f32, 7.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert!(raster(RasterEncoding::GRAYF32LE, big).intensities().unwrap_err().to_string().contains("outside"));
    }

    #[test]
    fn validate_refuses_exactly_what_intensities_refuses() {
        let f = |vals: &[f32]| vals.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
        let cases = [
            raster(RasterEncoding::GRAY8, vec![0, 255]),
            raster(RasterEncoding::GRAY8, vec![0]),
            raster(RasterEncoding::GRAY8, vec![0, 1, 2]),
            Raster { width: 0, height: 1, encoding: RasterEncoding::GRAY8, pixels: vec![] },
            raster(RasterEncoding::GRAYF32LE, f(&[0.0, 1.0])),
            raster(RasterEncoding::GRAYF32LE, f(&[0.0, f32::NAN])),
            raster(RasterEncoding::GRAYF32LE, f(&[f32::INFINITY, 0.5])),
            raster(RasterEncoding::GRAYF32LE, f(&[-0.1, 0.5])),
            raster(RasterEncoding::GRAYF32LE, f(&[0.0])),
        ];
        for r in cases {
            assert_eq!(r.validate().map_err(|e| e.to_string()), r.intensities().map(|_| ()).map_err(|e| e.to_string()), "{r:?}");
        }
    }

    #[test]
    fn an_invalid_line_raster_is_refused_with_its_place() {
        let limits = DocumentLimits { max_pages: 16, max_lines_per_page: 400, max_raster_pixels: 4_000_000 };
        let mut d = crate::synth::Generator::new(Default::default()).document(0).document;
        let line = d.pages[0].lines.iter().position(|l| l.raster.is_some()).expect("a line raster");
        let r = d.pages[0].lines[line].raster.as_mut().unwrap();
        r.pixels.pop();
        let e = d.validate(&limits).unwrap_err().to_string();
        assert!(e.contains(&format!("page {} line {line}", d.pages[0].number)), "{e}");
    }
}
