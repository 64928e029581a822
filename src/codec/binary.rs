//! Avro binary encoding of the records on the per-document path, written straight to and from the
//! typed structs.
//!
//! `apache-avro` decodes a datum into a `Value` tree and then deserialises the tree, and encodes by
//! serialising into a tree, resolving it against the schema and writing it: for a payslip document
//! (a few hundred strings and rasters) that is most of the decode and encode cost of the infer
//! stage. The records here (`PayslipDocument`, `InferenceResult`, `DocumentFeedback`) have exactly
//! one writer schema each (`schemas/`, see `schemas/README.md`), so their datums are read and
//! written field by field in schema order with no intermediate tree.
//!
//! Invariants (unit and property tests in this module):
//! - what this module writes, `apache-avro` reads as the same record, and what `apache-avro` writes,
//!   this module reads as the same record; the bytes are identical except that map entries are
//!   written in key order here (deterministic) and in hash order there;
//! - outside bytes never panic and never allocate more than they hold: every length and count is
//!   checked against the bytes left before anything is reserved; truncated input, a bad union or
//!   enum index, an `int` out of range or invalid UTF-8 are errors.

use std::collections::HashMap;

use crate::document::*;

/// Why a datum could not be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct ReadError(pub String);

type R<T> = Result<T, ReadError>;

/// A cursor over one datum.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> R<&'a [u8]> {
        if n > self.remaining() {
            return Err(ReadError(format!("{what}: needs {n} bytes at offset {}, {} left", self.pos, self.remaining())));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    /// A zig-zag varint `long`.
    pub fn long(&mut self) -> R<i64> {
        let mut v: u64 = 0;
        for i in 0..10 {
            let Some(&b) = self.buf.get(self.pos) else {
                return Err(ReadError(format!("truncated varint at offset {}", self.pos)));
            };
            self.pos += 1;
            v |= ((b & 0x7f) as u64) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(((v >> 1) as i64) ^ -((v & 1) as i64));
            }
        }
        Err(ReadError(format!("varint longer than 10 bytes before offset {}", self.pos)))
    }

    pub fn int(&mut self) -> R<i32> {
        let v = self.long()?;
        i32::try_from(v).map_err(|_| ReadError(format!("int {v} out of range before offset {}", self.pos)))
    }

    pub fn float(&mut self) -> R<f32> {
        let b = self.take(4, "float")?;
        Ok(f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn double(&mut self) -> R<f64> {
        let b = self.take(8, "double")?;
        Ok(f64::from_le_bytes(b.try_into().expect("8 bytes")))
    }

    fn len(&mut self, what: &str) -> R<usize> {
        let n = self.long()?;
        if n < 0 {
            return Err(ReadError(format!("negative {what} length {n}")));
        }
        Ok(n as usize)
    }

    pub fn bytes(&mut self) -> R<&'a [u8]> {
        let n = self.len("bytes")?;
        self.take(n, "bytes")
    }

    pub fn string(&mut self) -> R<String> {
        let n = self.len("string")?;
        let b = self.take(n, "string")?;
        std::str::from_utf8(b).map(str::to_owned).map_err(|e| ReadError(format!("string is not UTF-8: {e}")))
    }

    /// A string checked (length, UTF-8) and passed over without a copy.
    pub fn skip_string(&mut self) -> R<()> {
        let n = self.len("string")?;
        let b = self.take(n, "string")?;
        std::str::from_utf8(b).map(|_| ()).map_err(|e| ReadError(format!("string is not UTF-8: {e}")))
    }

    /// An array read item by item and kept nowhere.
    pub fn skip_array(&mut self, mut item: impl FnMut(&mut Self) -> R<()>) -> R<()> {
        loop {
            let n = self.block()?;
            if n == 0 {
                return Ok(());
            }
            for _ in 0..n {
                item(self)?;
            }
        }
    }

    /// A union's branch index, checked against the number of branches.
    pub fn branch(&mut self, branches: usize) -> R<usize> {
        let i = self.long()?;
        if i < 0 || i as usize >= branches {
            return Err(ReadError(format!("union branch {i} of a union with {branches} branches")));
        }
        Ok(i as usize)
    }

    /// `["null", T]`.
    pub fn optional<T>(&mut self, item: impl FnOnce(&mut Self) -> R<T>) -> R<Option<T>> {
        match self.branch(2)? {
            0 => Ok(None),
            _ => item(self).map(Some),
        }
    }

    /// An array of items of at least one byte each (true of every array in these schemas, so a
    /// forged count ends at the end of the bytes, not in an endless loop).
    pub fn array<T>(&mut self, mut item: impl FnMut(&mut Self) -> R<T>) -> R<Vec<T>> {
        let mut out = Vec::new();
        loop {
            let n = self.block()?;
            if n == 0 {
                return Ok(out);
            }
            out.reserve(n.min(self.remaining()));
            for _ in 0..n {
                out.push(item(self)?);
            }
        }
    }

    /// A map of string to string.
    pub fn string_map(&mut self) -> R<HashMap<String, String>> {
        let mut out = HashMap::new();
        loop {
            let n = self.block()?;
            if n == 0 {
                return Ok(out);
            }
            for _ in 0..n {
                let k = self.string()?;
                let v = self.string()?;
                out.insert(k, v);
            }
        }
    }

    /// The item count of the next block (a negative count is followed by the block's byte size).
    fn block(&mut self) -> R<usize> {
        let n = self.long()?;
        if n < 0 {
            let _size = self.long()?;
            return n.checked_neg().map(|n| n as usize).ok_or_else(|| ReadError("block count out of range".into()));
        }
        Ok(n as usize)
    }

    /// Fails unless every byte was read.
    pub fn finish(&self, what: &str) -> R<()> {
        if self.remaining() > 0 {
            return Err(ReadError(format!("{} trailing bytes after the {what} datum", self.remaining())));
        }
        Ok(())
    }
}

/// Appends Avro binary to a buffer.
pub struct Writer<'a>(pub &'a mut Vec<u8>);

impl Writer<'_> {
    pub fn long(&mut self, v: i64) {
        let mut z = ((v << 1) ^ (v >> 63)) as u64;
        while z >= 0x80 {
            self.0.push((z as u8) | 0x80);
            z >>= 7;
        }
        self.0.push(z as u8);
    }
    pub fn int(&mut self, v: i32) {
        self.long(v as i64)
    }
    pub fn float(&mut self, v: f32) {
        self.0.extend_from_slice(&v.to_le_bytes())
    }
    pub fn double(&mut self, v: f64) {
        self.0.extend_from_slice(&v.to_le_bytes())
    }
    pub fn bytes(&mut self, b: &[u8]) {
        self.long(b.len() as i64);
        self.0.extend_from_slice(b)
    }
    pub fn string(&mut self, s: &str) {
        self.bytes(s.as_bytes())
    }
    pub fn optional<T>(&mut self, v: &Option<T>, item: impl FnOnce(&mut Self, &T)) {
        match v {
            None => self.long(0),
            Some(x) => {
                self.long(1);
                item(self, x)
            }
        }
    }
    /// One block with every item, then the end marker (what `apache-avro` writes).
    pub fn array<T>(&mut self, items: &[T], mut item: impl FnMut(&mut Self, &T)) {
        if !items.is_empty() {
            self.long(items.len() as i64);
            for x in items {
                item(self, x);
            }
        }
        self.long(0);
    }
    /// Entries in key order, so equal maps encode to equal bytes.
    pub fn string_map(&mut self, m: &HashMap<String, String>) {
        if !m.is_empty() {
            let mut entries: Vec<(&String, &String)> = m.iter().collect();
            entries.sort_unstable();
            self.long(entries.len() as i64);
            for (k, v) in entries {
                self.string(k);
                self.string(v);
            }
        }
        self.long(0);
    }
}

/// A record read and written by this module.
pub trait Binary: Sized {
    fn read(r: &mut Reader<'_>) -> R<Self>;
    fn write(&self, w: &mut Writer<'_>);
    /// A first guess at the encoded size, to allocate the output once.
    fn size_hint(&self) -> usize {
        256
    }
}

/// Decodes a whole datum (no trailing bytes).
pub fn from_datum<T: Binary>(bytes: &[u8], what: &str) -> R<T> {
    let mut r = Reader::new(bytes);
    let v = T::read(&mut r)?;
    r.finish(what)?;
    Ok(v)
}

/// Encodes one datum.
pub fn to_datum<T: Binary>(v: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.size_hint());
    v.write(&mut Writer(&mut out));
    out
}

fn read_bbox(r: &mut Reader<'_>) -> R<BoundingBox> {
    Ok(BoundingBox { x: r.float()?, y: r.float()?, w: r.float()?, h: r.float()? })
}

fn write_bbox(w: &mut Writer<'_>, b: &BoundingBox) {
    w.float(b.x);
    w.float(b.y);
    w.float(b.w);
    w.float(b.h);
}

fn read_raster(r: &mut Reader<'_>) -> R<Raster> {
    let width = r.int()?;
    let height = r.int()?;
    let encoding = match r.int()? {
        0 => RasterEncoding::GRAY8,
        1 => RasterEncoding::GRAYF32LE,
        i => return Err(ReadError(format!("RasterEncoding symbol {i} (the schema has 2)"))),
    };
    let pixels = r.bytes()?.to_vec();
    Ok(Raster { width, height, encoding, pixels })
}

fn write_raster(w: &mut Writer<'_>, x: &Raster) {
    w.int(x.width);
    w.int(x.height);
    w.int(match x.encoding {
        RasterEncoding::GRAY8 => 0,
        RasterEncoding::GRAYF32LE => 1,
    });
    w.bytes(&x.pixels);
}

fn read_line(r: &mut Reader<'_>) -> R<TextLine> {
    Ok(TextLine { text: r.string()?, bbox: read_bbox(r)?, raster: r.optional(read_raster)? })
}

fn write_line(w: &mut Writer<'_>, l: &TextLine) {
    w.string(&l.text);
    write_bbox(w, &l.bbox);
    w.optional(&l.raster, write_raster);
}

fn read_page(r: &mut Reader<'_>) -> R<Page> {
    Ok(Page { number: r.int()?, width: r.float()?, height: r.float()?, lines: r.array(read_line)?, raster: r.optional(read_raster)? })
}

fn write_page(w: &mut Writer<'_>, p: &Page) {
    w.int(p.number);
    w.float(p.width);
    w.float(p.height);
    w.array(&p.lines, write_line);
    w.optional(&p.raster, write_raster);
}

impl Binary for PayslipDocument {
    fn read(r: &mut Reader<'_>) -> R<Self> {
        Ok(PayslipDocument {
            document_id: r.string()?,
            user_id: r.string()?,
            tenant: r.string()?,
            submitted_at: r.long()?,
            format_hint: r.optional(Reader::string)?,
            pages: r.array(read_page)?,
            labels: r.optional(|r| Ok(GroundTruth { format: r.string()?, tables: r.array(read_bbox)?, net_pay: r.optional(Reader::double)? }))?,
        })
    }

    fn write(&self, w: &mut Writer<'_>) {
        w.string(&self.document_id);
        w.string(&self.user_id);
        w.string(&self.tenant);
        w.long(self.submitted_at);
        w.optional(&self.format_hint, |w, s| w.string(s));
        w.array(&self.pages, write_page);
        w.optional(&self.labels, |w, g| {
            w.string(&g.format);
            w.array(&g.tables, write_bbox);
            w.optional(&g.net_pay, |w, v| w.double(*v));
        });
    }

    fn size_hint(&self) -> usize {
        let raster = |r: &Option<Raster>| r.as_ref().map_or(1, |r| r.pixels.len() + 16);
        128 + self.pages.iter().map(|p| 32 + raster(&p.raster) + p.lines.iter().map(|l| l.text.len() + 24 + raster(&l.raster)).sum::<usize>()).sum::<usize>()
    }
}

/// A string kept, or checked and passed over (left empty) when `keep` is false.
fn string_if(r: &mut Reader<'_>, keep: bool) -> R<String> {
    if keep {
        r.string()
    } else {
        r.skip_string().map(|()| String::new())
    }
}

/// An array kept, or read item by item and left empty when `keep` is false.
fn array_if<T>(r: &mut Reader<'_>, keep: bool, mut item: impl FnMut(&mut Reader<'_>) -> R<T>) -> R<Vec<T>> {
    if keep {
        r.array(item)
    } else {
        r.skip_array(|r| item(r).map(drop)).map(|()| Vec::new())
    }
}

fn read_output(r: &mut Reader<'_>, keep: bool) -> R<ModelOutput> {
    Ok(ModelOutput {
        model: r.string()?,
        version: r.string()?,
        provider: r.string()?,
        latency_ms: r.double()?,
        batch_size: r.int()?,
        error_code: r.optional(Reader::string)?,
        label: r.optional(Reader::string)?,
        confidence: r.optional(Reader::float)?,
        regions: array_if(r, keep, |r| Ok(Region { page: r.int()?, x: r.float()?, y: r.float()?, w: r.float()?, h: r.float()?, score: r.float()? }))?,
        lines: array_if(r, keep, |r| string_if(r, keep))?,
        load_ms: r.optional(Reader::double)?,
    })
}

/// An `InferenceResult`, whole (`keep`), or as the monitor counts it: then every field is still
/// read and checked (a datum decodes exactly when it decodes whole), but what no window uses is
/// left empty instead of copied: `user_id`, `tenant`, `model_versions`, `source`, and each
/// output's `regions` and `lines` (the recognised text, most of a result's strings). Measured with
/// `perf` on `benches/throughput.rs`: allocating and freeing those was most of the monitor's
/// decoding.
fn read_result(r: &mut Reader<'_>, keep: bool) -> R<InferenceResult> {
    Ok(InferenceResult {
        result_id: r.string()?,
        document_id: r.string()?,
        user_id: string_if(r, keep)?,
        tenant: string_if(r, keep)?,
        cohort: r.string()?,
        submitted_at: r.long()?,
        processed_at: r.long()?,
        provider: r.string()?,
        model_versions: if keep {
            r.string_map()?
        } else {
            r.skip_array(|r| r.skip_string().and_then(|()| r.skip_string()))?;
            HashMap::new()
        },
        outputs: r.array(|r| read_output(r, keep))?,
        inference_ms: r.double()?,
        end_to_end_ms: r.double()?,
        error_code: r.optional(Reader::string)?,
        true_format: r.optional(Reader::string)?,
        source: string_if(r, keep)?,
        process_rss_bytes: r.optional(Reader::long)?,
        process_cpu_percent: r.optional(Reader::double)?,
    })
}

/// A whole datum read as the monitor counts it ([`read_result`] without keeping the text).
pub fn read_result_counted(bytes: &[u8]) -> R<InferenceResult> {
    let mut r = Reader::new(bytes);
    let v = read_result(&mut r, false)?;
    r.finish("payslip.v1.InferenceResult")?;
    Ok(v)
}

fn write_output(w: &mut Writer<'_>, o: &ModelOutput) {
    w.string(&o.model);
    w.string(&o.version);
    w.string(&o.provider);
    w.double(o.latency_ms);
    w.int(o.batch_size);
    w.optional(&o.error_code, |w, s| w.string(s));
    w.optional(&o.label, |w, s| w.string(s));
    w.optional(&o.confidence, |w, v| w.float(*v));
    w.array(&o.regions, |w, g| {
        w.int(g.page);
        w.float(g.x);
        w.float(g.y);
        w.float(g.w);
        w.float(g.h);
        w.float(g.score);
    });
    w.array(&o.lines, |w, s| w.string(s));
    w.optional(&o.load_ms, |w, v| w.double(*v));
}

impl Binary for InferenceResult {
    fn read(r: &mut Reader<'_>) -> R<Self> {
        read_result(r, true)
    }

    fn write(&self, w: &mut Writer<'_>) {
        w.string(&self.result_id);
        w.string(&self.document_id);
        w.string(&self.user_id);
        w.string(&self.tenant);
        w.string(&self.cohort);
        w.long(self.submitted_at);
        w.long(self.processed_at);
        w.string(&self.provider);
        w.string_map(&self.model_versions);
        w.array(&self.outputs, write_output);
        w.double(self.inference_ms);
        w.double(self.end_to_end_ms);
        w.optional(&self.error_code, |w, s| w.string(s));
        w.optional(&self.true_format, |w, s| w.string(s));
        w.string(&self.source);
        w.optional(&self.process_rss_bytes, |w, v| w.long(*v));
        w.optional(&self.process_cpu_percent, |w, v| w.double(*v));
    }

    fn size_hint(&self) -> usize {
        256 + self.outputs.iter().map(|o| 96 + o.regions.len() * 24 + o.lines.iter().map(|l| l.len() + 2).sum::<usize>()).sum::<usize>()
    }
}

impl Binary for DocumentFeedback {
    fn read(r: &mut Reader<'_>) -> R<Self> {
        Ok(DocumentFeedback {
            document_id: r.string()?,
            user_id: r.string()?,
            given_at: r.long()?,
            corrected_format: r.optional(Reader::string)?,
            corrected_net_pay: r.optional(Reader::double)?,
            rating: r.optional(Reader::int)?,
        })
    }

    fn write(&self, w: &mut Writer<'_>) {
        w.string(&self.document_id);
        w.string(&self.user_id);
        w.long(self.given_at);
        w.optional(&self.corrected_format, |w, s| w.string(s));
        w.optional(&self.corrected_net_pay, |w, v| w.double(*v));
        w.optional(&self.rating, |w, v| w.int(*v));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{avro, Record};
    use crate::synth::{Generator, GeneratorConfig};
    use proptest::prelude::*;

    fn by_apache<T: Record + 'static>(v: &T) -> Vec<u8> {
        let schema = avro::parsed_schema::<T>();
        apache_avro::to_avro_datum(schema, apache_avro::to_value(v).unwrap().resolve(schema).unwrap()).unwrap()
    }

    fn read_by_apache<T: Record + 'static>(b: &[u8]) -> T {
        let v = apache_avro::from_avro_datum(avro::parsed_schema::<T>(), &mut &b[..], None).unwrap();
        apache_avro::from_value(&v).unwrap()
    }

    fn result(seed: u64, versions: usize) -> InferenceResult {
        let s = |p: &str| format!("{p}-{seed}");
        InferenceResult {
            result_id: s("r"),
            document_id: s("d"),
            user_id: s("u"),
            tenant: "t".into(),
            cohort: if seed % 2 == 0 { "baseline".into() } else { "canary".into() },
            submitted_at: -(seed as i64) * 977,
            processed_at: i64::MAX - seed as i64,
            provider: "CPUExecutionProvider".into(),
            model_versions: (0..versions).map(|i| (format!("m{i}"), format!("1.{i}.0"))).collect(),
            outputs: (0..versions)
                .map(|i| ModelOutput {
                    model: format!("m{i}"),
                    version: "1.0.0".into(),
                    provider: "CPU".into(),
                    latency_ms: seed as f64 / 7.0,
                    batch_size: i as i32 - 1,
                    error_code: (seed % 3 == 0).then(|| "X".into()),
                    label: (i == 0).then(|| "PCDA".into()),
                    confidence: (i == 0).then_some(0.25),
                    regions: (0..seed % 4).map(|k| Region { page: k as i32, x: 1.5, y: -2.0, w: 3.0, h: f32::MAX, score: 0.5 }).collect(),
                    lines: (0..seed % 5).map(|k| format!("line {k} ₹ ü")).collect(),
                    load_ms: (seed % 2 == 1).then_some(12.5),
                })
                .collect(),
            inference_ms: 1.0,
            end_to_end_ms: f64::MIN_POSITIVE,
            error_code: None,
            true_format: Some("CDA".into()),
            source: "t/0/1".into(),
            process_rss_bytes: Some(i64::MIN),
            process_cpu_percent: (seed % 2 == 0).then_some(99.5),
        }
    }

    #[test]
    fn documents_encode_to_the_bytes_apache_avro_writes_and_read_back() {
        let g = Generator::new(GeneratorConfig::default());
        for i in 0..50 {
            let d = g.document(i).document;
            let ours = to_datum(&d);
            assert_eq!(ours, by_apache(&d), "document {i}");
            assert_eq!(from_datum::<PayslipDocument>(&ours, "doc").unwrap(), d);
        }
        let worst = g.worst_case(3, &crate::config::LimitsConfig::default());
        assert_eq!(from_datum::<PayslipDocument>(&by_apache(&worst), "doc").unwrap(), worst);
    }

    #[test]
    fn results_and_feedback_match_apache_avro() {
        for seed in 0..40 {
            // one map entry: the bytes are identical; several: hash order there, key order here
            let r = result(seed, 1);
            assert_eq!(to_datum(&r), by_apache(&r));
            let r = result(seed, 3);
            assert_eq!(read_by_apache::<InferenceResult>(&to_datum(&r)), r);
            assert_eq!(from_datum::<InferenceResult>(&by_apache(&r), "r").unwrap(), r);
            assert_eq!(to_datum(&r), to_datum(&r.clone()), "map order is deterministic");
        }
        let f = DocumentFeedback { document_id: "d".into(), user_id: "u".into(), given_at: 5, corrected_format: Some("X".into()), corrected_net_pay: None, rating: Some(-3) };
        assert_eq!(to_datum(&f), by_apache(&f));
        assert_eq!(from_datum::<DocumentFeedback>(&to_datum(&f), "f").unwrap(), f);
    }

    /// What the monitor counts with: the full result less the fields it leaves empty.
    fn counted(mut r: InferenceResult) -> InferenceResult {
        r.user_id.clear();
        r.tenant.clear();
        r.model_versions.clear();
        r.source.clear();
        for o in &mut r.outputs {
            o.regions.clear();
            o.lines.clear();
        }
        r
    }

    #[test]
    fn a_result_read_for_counting_keeps_every_counted_field_and_fails_where_the_full_read_fails() {
        for seed in 0..40 {
            let r = result(seed, 3);
            let bytes = to_datum(&r);
            let lean = read_result_counted(&bytes).unwrap();
            assert_eq!(lean, counted(r.clone()), "seed {seed}");
            assert!(lean.outputs.iter().all(|o| o.lines.is_empty() && o.regions.is_empty()));
            // every truncation, and trailing bytes, fail both reads alike
            for cut in 0..bytes.len() {
                assert!(read_result_counted(&bytes[..cut]).is_err(), "seed {seed}, cut at {cut}");
                assert!(from_datum::<InferenceResult>(&bytes[..cut], "r").is_err());
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert!(read_result_counted(&longer).is_err() && from_datum::<InferenceResult>(&longer, "r").is_err());
        }
        // a skipped line that is not UTF-8 is refused as the full read refuses it
        let mut r = result(4, 1);
        r.outputs[0].lines = vec!["POISON line".into()];
        let mut bytes = to_datum(&r);
        let at = bytes.windows(6).position(|w| w == b"POISON").expect("the marker");
        bytes[at] = 0xff;
        assert!(from_datum::<InferenceResult>(&bytes, "r").is_err());
        assert!(read_result_counted(&bytes).is_err());
    }

    #[test]
    fn negative_block_counts_with_sizes_are_read() {
        // an array written as one block of -2 items with its byte size, as some writers do
        let mut b = Vec::new();
        let mut w = Writer(&mut b);
        for s in ["d", "u", "t"] {
            w.string(s);
        }
        w.long(7);
        w.long(0); // no format hint
        w.long(-1);
        w.long(14);
        w.int(1);
        w.float(1.0);
        w.float(2.0);
        w.long(0); // no lines
        w.long(0); // no raster
        w.long(0); // end of pages
        w.long(0); // no labels
        let d = from_datum::<PayslipDocument>(&b, "doc").unwrap();
        assert_eq!((d.pages.len(), d.pages[0].number, d.pages[0].height), (1, 1, 2.0));
        assert_eq!(d, read_by_apache::<PayslipDocument>(&b));
    }

    #[test]
    fn forged_lengths_and_indices_are_errors() {
        let d = Generator::new(GeneratorConfig::default()).document(1).document;
        let b = to_datum(&d);
        for cut in [0, 1, 5, b.len() / 3, b.len() - 1] {
            assert!(from_datum::<PayslipDocument>(&b[..cut], "doc").is_err(), "cut at {cut}");
        }
        let mut long = b.clone();
        long.push(0);
        assert!(from_datum::<PayslipDocument>(&long, "doc").unwrap_err().0.contains("trailing"));
        // a string claiming 2^62 bytes
        let mut forged = Vec::new();
        Writer(&mut forged).long(1 << 62);
        assert!(from_datum::<PayslipDocument>(&forged, "doc").is_err());
        // a document's three ids and its time, then `rest` as longs
        let forged = |rest: &[i64]| {
            let mut b = Vec::new();
            let mut w = Writer(&mut b);
            for s in ["d", "u", "t"] {
                w.string(s);
            }
            w.long(1);
            rest.iter().for_each(|&v| w.long(v));
            b
        };
        // no format hint, then an array claiming 2^62 pages and nothing after
        assert!(from_datum::<PayslipDocument>(&forged(&[0, 1 << 62]), "doc").is_err());
        // union branch 2 of ["null", string]
        assert!(from_datum::<PayslipDocument>(&forged(&[2]), "doc").unwrap_err().0.contains("union branch 2"));
        // invalid UTF-8
        let mut forged = Vec::new();
        Writer(&mut forged).bytes(&[0xff, 0xfe]);
        assert!(from_datum::<PayslipDocument>(&forged, "doc").unwrap_err().0.contains("UTF-8"));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = from_datum::<PayslipDocument>(&bytes, "doc");
            let _ = from_datum::<InferenceResult>(&bytes, "r");
            let _ = from_datum::<DocumentFeedback>(&bytes, "f");
            // the read for counting accepts exactly what the full read accepts
            let full = from_datum::<InferenceResult>(&bytes, "r");
            let lean = read_result_counted(&bytes);
            prop_assert_eq!(full.is_ok(), lean.is_ok());
            if let (Ok(full), Ok(lean)) = (full, lean) {
                prop_assert_eq!(counted(full), lean);
            }
        }

        #[test]
        fn longs_round_trip(v in any::<i64>()) {
            let mut b = Vec::new();
            Writer(&mut b).long(v);
            let mut r = Reader::new(&b);
            prop_assert_eq!(r.long().unwrap(), v);
            prop_assert_eq!(r.remaining(), 0);
        }
    }
}
