//! Turning documents into model inputs. Pure functions, shared by the infer stage and by the
//! training data dump, so training and serving cannot disagree on features.
//!
//! - `document_classifier`: hashed unigram+bigram counts of the document text, `log1p`, L2-normalised,
//!   `[CLASSIFIER_DIM]`.
//! - `table_detection`: the page raster resampled to `PAGE_RASTER_H x PAGE_RASTER_W`, intensities in
//!   `[0, 1]`; the model scores each `TABLE_CELL` x `TABLE_CELL` cell of it.
//! - `text_recognition`: a line raster resampled to `GLYPH_H` rows and cut into `MAX_LINE_CHARS` cells of
//!   `GLYPH_W` columns (zero padded), `[MAX_LINE_CHARS, GLYPH_H * GLYPH_W]`.

use crate::document::{BoundingBox, Raster, RasterError, Region};

pub const CLASSIFIER_DIM: usize = 512;
pub const PAGE_RASTER_W: usize = 48;
pub const PAGE_RASTER_H: usize = 64;
pub const TABLE_CELL: usize = 8;
pub const TABLE_GRID_W: usize = PAGE_RASTER_W / TABLE_CELL;
pub const TABLE_GRID_H: usize = PAGE_RASTER_H / TABLE_CELL;
pub const GLYPH_W: usize = 8;
pub const GLYPH_H: usize = 8;
pub const MAX_LINE_CHARS: usize = 48;

/// Continues an FNV-1a hash over `bytes`, upper-casing ASCII letters on the way.
fn fnv1a_upper(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h ^= b.to_ascii_uppercase() as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// Classifier features of a document's text.
pub fn classifier_features(text: &str) -> Vec<f32> {
    let mut v = vec![0f32; CLASSIFIER_DIM];
    classifier_features_into(std::iter::once(text), &mut v);
    v
}

/// [`classifier_features`] of the concatenation of `pieces` (each ending a token, as the lines of a
/// document do), written into `out` (`CLASSIFIER_DIM` long). Tokens are the maximal runs of ASCII
/// letters and digits; an all-digit token counts as `#`, others upper-cased; every token and every
/// pair of neighbours (`A_B`) adds one to its FNV-1a bucket. Hashes are computed on the text in
/// place: nothing is allocated per token.
pub fn classifier_features_into<'a>(pieces: impl IntoIterator<Item = &'a str>, out: &mut [f32]) {
    let out = &mut out[..CLASSIFIER_DIM];
    out.fill(0.0);
    let bucket = |h: u64| (h % CLASSIFIER_DIM as u64) as usize;
    let mut prev: Option<u64> = None;
    for piece in pieces {
        for tok in piece.split(|c: char| !c.is_ascii_alphanumeric()).filter(|t| !t.is_empty()) {
            let norm: &[u8] = if tok.bytes().all(|b| b.is_ascii_digit()) { b"#" } else { tok.as_bytes() };
            let h = fnv1a_upper(FNV_OFFSET, norm);
            out[bucket(h)] += 1.0;
            if let Some(p) = prev {
                out[bucket(fnv1a_upper(fnv1a_upper(p, b"_"), norm))] += 1.0;
            }
            prev = Some(h);
        }
    }
    for x in out.iter_mut() {
        *x = x.ln_1p();
    }
    let norm = out.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        out.iter_mut().for_each(|x| *x /= norm);
    }
}

/// The intensity of each GRAY8 value, `v / 255` (the same floats as dividing each time: the table
/// is computed with the same IEEE division, at compile time). A lookup costs a load where the
/// division cost most of the text model's preprocessing.
const GRAY8_INTENSITY: [f32; 256] = {
    let mut t = [0f32; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = i as f32 / 255.0;
        i += 1;
    }
    t
};

/// Nearest-neighbour sample of `raster` onto an `out_w x out_h` grid, for the first `cols` output
/// columns only; `put(x, y, value)` receives each sample. Pixels are read where they are sampled,
/// so a large raster costs its sampled pixels, not its size: nothing the size of the input (or of
/// the resampled image before cropping) is allocated. The source pixel of output `(x, y)` is
/// `(x * w / out_w, y * h / out_h)`, clamped: the same as resampling the whole image first.
fn sample(raster: &Raster, out_w: usize, out_h: usize, cols: usize, mut put: impl FnMut(usize, usize, f32)) -> Result<(), RasterError> {
    raster.check_size()?;
    let (w, h) = (raster.width as usize, raster.height as usize);
    let cols = cols.min(out_w).min(MAX_SAMPLED_COLS);
    // the source column of each output column, computed once per raster rather than once per row
    // (the division per pixel was most of the text model's preprocessing)
    let mut source = [0usize; MAX_SAMPLED_COLS];
    for (x, s) in source[..cols].iter_mut().enumerate() {
        *s = (x * w / out_w).min(w - 1);
    }
    let source = &source[..cols];
    for y in 0..out_h {
        let row = (y * h / out_h).min(h - 1) * w;
        match raster.encoding {
            // the common case without a per-pixel check
            crate::document::RasterEncoding::GRAY8 => {
                let pixels = &raster.pixels[row..row + w];
                for (x, &s) in source.iter().enumerate() {
                    put(x, y, GRAY8_INTENSITY[pixels[s] as usize]);
                }
            }
            crate::document::RasterEncoding::GRAYF32LE => {
                for (x, &s) in source.iter().enumerate() {
                    put(x, y, raster.intensity_at(row + s)?);
                }
            }
        }
    }
    Ok(())
}

/// The most output columns [`sample`] produces: a text line's glyph cells (a page has fewer).
const MAX_SAMPLED_COLS: usize = MAX_LINE_CHARS * GLYPH_W;
const _: () = assert!(PAGE_RASTER_W <= MAX_SAMPLED_COLS);

/// Length of one table detection input.
pub const PAGE_TENSOR_LEN: usize = PAGE_RASTER_W * PAGE_RASTER_H;
/// Length of one text recognition input.
pub const LINE_CELLS_LEN: usize = MAX_LINE_CHARS * GLYPH_H * GLYPH_W;

/// Table detection input for a page raster.
pub fn page_tensor(raster: &Raster) -> Result<Vec<f32>, RasterError> {
    let mut out = vec![0f32; PAGE_TENSOR_LEN];
    page_tensor_into(raster, &mut out)?;
    Ok(out)
}

/// [`page_tensor`] written into `out` (`PAGE_TENSOR_LEN` long).
pub fn page_tensor_into(raster: &Raster, out: &mut [f32]) -> Result<(), RasterError> {
    let out = &mut out[..PAGE_TENSOR_LEN];
    sample(raster, PAGE_RASTER_W, PAGE_RASTER_H, PAGE_RASTER_W, |x, y, v| out[y * PAGE_RASTER_W + x] = v)
}

/// Text recognition input for a line raster: scaled to glyph height, then cut into glyph cells;
/// only the columns that fit `MAX_LINE_CHARS` cells are computed (the line is cropped before it
/// is resampled).
pub fn line_cells(raster: &Raster) -> Result<Vec<f32>, RasterError> {
    let mut cells = vec![0f32; LINE_CELLS_LEN];
    line_cells_into(raster, &mut cells)?;
    Ok(cells)
}

/// [`line_cells`] written into `out` (`LINE_CELLS_LEN` long): each sample goes straight to its
/// place in its glyph cell; the cells past the line's end are zeroed.
pub fn line_cells_into(raster: &Raster, out: &mut [f32]) -> Result<(), RasterError> {
    line_cells_over(raster, out, MAX_LINE_CHARS).map(|_| ())
}

/// [`line_cells_into`] over a slot whose glyph cells past the first `written` are known to be zero
/// already: only the cells between the line's end and `written` are cleared. Returns the line's
/// cells (what may be non-zero now). On an error `out` is left partly written.
pub fn line_cells_over(raster: &Raster, out: &mut [f32], written: usize) -> Result<usize, RasterError> {
    raster.check_size()?;
    let out = &mut out[..LINE_CELLS_LEN];
    let (w, h) = (raster.width as usize, raster.height as usize);
    let out_w = if h == GLYPH_H { w } else { ((w * GLYPH_H) as f64 / h as f64).round().max(1.0) as usize };
    let cells = out_w.min(MAX_LINE_CHARS * GLYPH_W) / GLYPH_W;
    let cols = cells * GLYPH_W;
    let (used, padding) = out.split_at_mut(cols * GLYPH_H);
    padding[..written.min(MAX_LINE_CHARS).saturating_sub(cells) * GLYPH_H * GLYPH_W].fill(0.0);
    let cell_of = |x: usize, y: usize| (x / GLYPH_W) * GLYPH_H * GLYPH_W + y * GLYPH_W + x % GLYPH_W;
    if raster.encoding != crate::document::RasterEncoding::GRAY8 || h != GLYPH_H {
        return sample(raster, out_w, GLYPH_H, cols, |x, y, v| used[cell_of(x, y)] = v).map(|()| cells);
    }
    // a glyph-high GRAY8 line (the common case: nothing to resample) a glyph cell's row at a time,
    // eight contiguous pixels to eight contiguous floats
    for (c, cell) in used.chunks_exact_mut(GLYPH_H * GLYPH_W).enumerate() {
        for y in 0..GLYPH_H {
            let src: &[u8; GLYPH_W] = raster.pixels[y * w + c * GLYPH_W..][..GLYPH_W].try_into().expect("GLYPH_W pixels");
            let dst: &mut [f32; GLYPH_W] = (&mut cell[y * GLYPH_W..][..GLYPH_W]).try_into().expect("GLYPH_W cells");
            for j in 0..GLYPH_W {
                dst[j] = GRAY8_INTENSITY[src[j] as usize];
            }
        }
    }
    Ok(cells)
}

/// Target of the table model: 1 for each grid cell whose centre lies in a table.
pub fn table_cell_targets(tables: &[BoundingBox], page_w: f32, page_h: f32) -> Vec<f32> {
    let mut t = vec![0f32; TABLE_GRID_W * TABLE_GRID_H];
    for gy in 0..TABLE_GRID_H {
        for gx in 0..TABLE_GRID_W {
            let cx = (gx as f32 + 0.5) / TABLE_GRID_W as f32 * page_w;
            let cy = (gy as f32 + 0.5) / TABLE_GRID_H as f32 * page_h;
            if tables.iter().any(|b| cx >= b.x && cx <= b.x + b.w && cy >= b.y && cy <= b.y + b.h) {
                t[gy * TABLE_GRID_W + gx] = 1.0;
            }
        }
    }
    t
}

/// Regions from per-cell table probabilities: 4-connected cells above `threshold`, as boxes in page
/// points with the mean probability as score.
pub fn regions_from_cells(probs: &[f32], page: i32, page_w: f32, page_h: f32, threshold: f32) -> Vec<Region> {
    let (gw, gh) = (TABLE_GRID_W, TABLE_GRID_H);
    let mut seen = vec![false; gw * gh];
    let mut out = Vec::new();
    for start in 0..gw * gh {
        if seen[start] || probs.get(start).copied().unwrap_or(0.0) < threshold {
            continue;
        }
        let (mut x0, mut y0, mut x1, mut y1) = (gw, gh, 0, 0);
        let (mut sum, mut n) = (0f32, 0usize);
        let mut stack = vec![start];
        seen[start] = true;
        while let Some(i) = stack.pop() {
            let (x, y) = (i % gw, i / gw);
            (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x), y1.max(y));
            sum += probs[i];
            n += 1;
            let mut push = |j: usize| {
                if !seen[j] && probs[j] >= threshold {
                    seen[j] = true;
                    stack.push(j);
                }
            };
            if x > 0 { push(i - 1); }
            if x + 1 < gw { push(i + 1); }
            if y > 0 { push(i - gw); }
            if y + 1 < gh { push(i + gw); }
        }
        let cw = page_w / gw as f32;
        let ch = page_h / gh as f32;
        out.push(Region {
            page,
            x: x0 as f32 * cw,
            y: y0 as f32 * ch,
            w: (x1 - x0 + 1) as f32 * cw,
            h: (y1 - y0 + 1) as f32 * ch,
            score: sum / n as f32,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::document::RasterEncoding;
    use proptest::prelude::*;

    /// The preprocessing as it was before it learnt to crop first: resample the whole raster, then
    /// cut cells. Kept here as the reference the cropping version must match bit for bit.
    fn reference_line_cells(raster: &Raster) -> Vec<f32> {
        let px = raster.intensities().unwrap();
        let (w, h) = (raster.width as usize, raster.height as usize);
        let out_w = if h == GLYPH_H { w } else { ((w * GLYPH_H) as f64 / h as f64).round().max(1.0) as usize };
        let mut img = vec![0f32; out_w * GLYPH_H];
        for y in 0..GLYPH_H {
            for x in 0..out_w {
                img[y * out_w + x] = px[(y * h / GLYPH_H).min(h - 1) * w + (x * w / out_w).min(w - 1)];
            }
        }
        let mut cells = vec![0f32; MAX_LINE_CHARS * GLYPH_H * GLYPH_W];
        for c in 0..(out_w / GLYPH_W).min(MAX_LINE_CHARS) {
            for r in 0..GLYPH_H {
                for k in 0..GLYPH_W {
                    cells[c * GLYPH_H * GLYPH_W + r * GLYPH_W + k] = img[r * out_w + c * GLYPH_W + k];
                }
            }
        }
        cells
    }

    /// The features as first written: a `String` per token and a `format!` per bigram.
    fn reference_features(text: &str) -> Vec<f32> {
        fn fnv1a(bytes: &[u8]) -> u64 {
            let mut h = 0xcbf2_9ce4_8422_2325u64;
            for b in bytes {
                h ^= *b as u64;
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
            h
        }
        let toks: Vec<String> = text
            .split(|c: char| !c.is_ascii_alphanumeric())
            .filter(|t| !t.is_empty())
            .map(|t| if t.chars().all(|c| c.is_ascii_digit()) { "#".to_string() } else { t.to_ascii_uppercase() })
            .collect();
        let mut v = vec![0f32; CLASSIFIER_DIM];
        for (i, t) in toks.iter().enumerate() {
            v[(fnv1a(t.as_bytes()) % CLASSIFIER_DIM as u64) as usize] += 1.0;
            if let Some(next) = toks.get(i + 1) {
                v[(fnv1a(format!("{t}_{next}").as_bytes()) % CLASSIFIER_DIM as u64) as usize] += 1.0;
            }
        }
        v.iter_mut().for_each(|x| *x = x.ln_1p());
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        if norm > 0.0 {
            v.iter_mut().for_each(|x| *x /= norm);
        }
        v
    }

    #[test]
    fn features_of_a_document_are_its_full_texts() {
        let g = crate::synth::Generator::new(Default::default());
        for i in 0..20 {
            let d = g.document(i).document;
            let mut v = vec![7f32; CLASSIFIER_DIM];
            classifier_features_into(d.pages.iter().flat_map(|p| p.lines.iter().flat_map(|l| [l.text.as_str(), "\n"])), &mut v);
            assert_eq!(v, reference_features(&d.full_text()));
        }
    }

    proptest! {
        #[test]
        fn features_match_the_first_implementation(text in "[ -~\\n\u{e9}\u{20b9}]{0,200}") {
            prop_assert_eq!(classifier_features(&text), reference_features(&text));
        }

        #[test]
        fn gray_f32_rasters_sample_like_gray8(w in 1i32..300, h in 1i32..30, seed in any::<u64>()) {
            let n = (w * h) as usize;
            let g8: Vec<u8> = (0..n).map(|i| (seed.wrapping_mul(i as u64 + 1) >> 13) as u8).collect();
            let f: Vec<u8> = g8.iter().flat_map(|&p| (p as f32 / 255.0).to_le_bytes()).collect();
            let a = Raster { width: w, height: h, encoding: RasterEncoding::GRAY8, pixels: g8 };
            let b = Raster { width: w, height: h, encoding: RasterEncoding::GRAYF32LE, pixels: f };
            prop_assert_eq!(line_cells(&a).unwrap(), line_cells(&b).unwrap());
            prop_assert_eq!(page_tensor(&a).unwrap(), page_tensor(&b).unwrap());
        }

        #[test]
        fn cells_written_into_a_dirty_buffer_are_the_same(w in 1i32..600, h in 1i32..30) {
            let r = Raster { width: w, height: h, encoding: RasterEncoding::GRAY8, pixels: vec![9; (w * h) as usize] };
            let mut dirty = vec![f32::NAN; LINE_CELLS_LEN];
            line_cells_into(&r, &mut dirty).unwrap();
            prop_assert_eq!(dirty, reference_line_cells(&r));
        }

        #[test]
        fn glyph_high_lines_are_copied_cell_by_cell(w in 1i32..500, seed in any::<u64>()) {
            let n = w as usize * GLYPH_H;
            let pixels: Vec<u8> = (0..n).map(|i| (seed.wrapping_mul(i as u64 + 1) >> 17) as u8).collect();
            let r = Raster { width: w, height: GLYPH_H as i32, encoding: RasterEncoding::GRAY8, pixels };
            let mut dirty = vec![f32::NAN; LINE_CELLS_LEN];
            line_cells_into(&r, &mut dirty).unwrap();
            prop_assert_eq!(dirty, reference_line_cells(&r));
        }

        #[test]
        fn a_reused_slot_clears_only_what_its_last_line_wrote(widths in prop::collection::vec(1i32..500, 1..8), h in 1i32..20) {
            let mut slot = vec![0f32; LINE_CELLS_LEN];
            let mut written = 0;
            for (i, w) in widths.into_iter().enumerate() {
                let pixels: Vec<u8> = (0..(w * h) as usize).map(|p| (p * 7 + i * 13) as u8 | 1).collect();
                let r = Raster { width: w, height: h, encoding: RasterEncoding::GRAY8, pixels };
                written = line_cells_over(&r, &mut slot, written).unwrap();
                prop_assert_eq!(&slot, &reference_line_cells(&r));
                prop_assert!(slot[written * GLYPH_H * GLYPH_W..].iter().all(|&v| v == 0.0));
            }
        }

        #[test]
        fn cropping_before_resampling_gives_the_same_cells(w in 1i32..1200, h in 1i32..40, seed in any::<u64>()) {
            let n = (w * h) as usize;
            let pixels: Vec<u8> = (0..n).map(|i| (seed.wrapping_mul(i as u64 + 1) >> 17) as u8).collect();
            let r = Raster { width: w, height: h, encoding: RasterEncoding::GRAY8, pixels };
            prop_assert_eq!(line_cells(&r).unwrap(), reference_line_cells(&r));
        }
    }

    #[test]
    fn the_gray8_table_is_the_division() {
        for v in 0..=255u8 {
            assert_eq!(GRAY8_INTENSITY[v as usize].to_bits(), (v as f32 / 255.0).to_bits());
        }
    }

    #[test]
    fn a_very_long_line_costs_its_cells_not_its_length() {
        // 1 x 999,000: resampled whole it would be an 8 x 7,992,000 image (256 MB of f32)
        let r = Raster { width: 999_000, height: 1, encoding: RasterEncoding::GRAY8, pixels: vec![200; 999_000] };
        let cells = line_cells(&r).unwrap();
        assert_eq!(cells.len(), MAX_LINE_CHARS * GLYPH_H * GLYPH_W);
        assert!(cells.iter().all(|&v| (v - 200.0 / 255.0).abs() < 1e-6));
    }

    #[test]
    fn features_are_unit_length_and_ignore_amounts() {
        let a = classifier_features("BASIC PAY 56100.00 DSOP 9000");
        let b = classifier_features("BASIC PAY 12.50 DSOP 1");
        assert_eq!(a, b);
        let norm: f32 = a.iter().map(|x| x * x).sum();
        assert!((norm - 1.0).abs() < 1e-5);
        assert!(classifier_features("").iter().all(|&x| x == 0.0));
    }

    #[test]
    fn line_cells_pad_and_rescale() {
        let r = Raster { width: 16, height: 8, encoding: RasterEncoding::GRAY8, pixels: vec![255; 128] };
        let c = line_cells(&r).unwrap();
        assert_eq!(c.len(), MAX_LINE_CHARS * 64);
        assert!(c[..128].iter().all(|&x| x == 1.0));
        assert!(c[128..].iter().all(|&x| x == 0.0));
        // a 16-pixel-high raster of the same line is scaled down to the same cells
        let r2 = Raster { width: 32, height: 16, encoding: RasterEncoding::GRAY8, pixels: vec![255; 512] };
        assert_eq!(line_cells(&r2).unwrap(), c);
    }

    #[test]
    fn connected_cells_become_one_region() {
        let mut p = vec![0f32; TABLE_GRID_W * TABLE_GRID_H];
        p[0] = 0.9;
        p[1] = 0.7;
        p[TABLE_GRID_W * 5 + 3] = 0.6;
        let r = regions_from_cells(&p, 1, 600.0, 800.0, 0.5);
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].x, r[0].w), (0.0, 200.0));
        assert!((r[0].score - 0.8).abs() < 1e-6);
    }

    #[test]
    fn targets_cover_table_cells() {
        let t = table_cell_targets(&[BoundingBox { x: 0.0, y: 0.0, w: 600.0, h: 100.0 }], 600.0, 800.0);
        assert_eq!(t.iter().sum::<f32>(), TABLE_GRID_W as f32);
    }
}
