//! Rasterisation of generated payslips.
//!
//! Page rasters are `PAGE_RASTER_W x PAGE_RASTER_H` GRAY8 images: text lines as ink bars, tables as
//! ruled boxes, optional distractor boxes (stamps) that are not tables. Line rasters are
//! `GLYPH_H` pixels high with one `GLYPH_W`-wide cell per character in a synthetic 8x8 glyph set
//! (deterministic bit patterns, one per character of [`CHARSET`]): the text recognition model
//! learns to read this glyph set, not a real font.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::document::{BoundingBox, Page, Raster, RasterEncoding};
use crate::inference::preprocess::{GLYPH_H, GLYPH_W, MAX_LINE_CHARS, PAGE_RASTER_H, PAGE_RASTER_W};

/// Characters the glyph set covers; index 0 (space) doubles as padding. Anything else renders as `?`.
pub const CHARSET: &str = " 0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ.,:-/()&?";

/// Bit pattern of character class `class` (row-major, `GLYPH_H` rows of `GLYPH_W` bits).
pub fn glyph(class: usize) -> [[bool; GLYPH_W]; GLYPH_H] {
    let mut g = [[false; GLYPH_W]; GLYPH_H];
    if class == 0 {
        return g;
    }
    // splitmix64 stream per class: fixed forever, since the trained models depend on it.
    let mut state = 0x51A7_0000_0000_0000u64 ^ (class as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for row in g.iter_mut() {
        for px in row.iter_mut() {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            *px = z % 100 < 42;
        }
    }
    g
}

/// Class index of a character in [`CHARSET`] (`?` for anything outside it).
pub fn char_class(c: char) -> usize {
    let c = c.to_ascii_uppercase();
    CHARSET.find(c).unwrap_or_else(|| CHARSET.len() - 1)
}

/// Renders `text` (clipped to `MAX_LINE_CHARS`) to a line raster; returns it with the text shown.
pub fn line_raster(text: &str, ink_noise: f64, rng: &mut ChaCha8Rng) -> (Raster, String) {
    let shown: String = text.chars().take(MAX_LINE_CHARS).map(|c| CHARSET.chars().nth(char_class(c)).unwrap_or('?')).collect();
    let shown = shown.trim_end().to_string();
    let n = shown.chars().count().max(1);
    let width = n * GLYPH_W;
    let mut pixels = vec![0u8; width * GLYPH_H];
    for (i, c) in shown.chars().enumerate() {
        let g = glyph(char_class(c));
        for (r, row) in g.iter().enumerate() {
            for (col, &on) in row.iter().enumerate() {
                if on {
                    pixels[r * width + i * GLYPH_W + col] = rng.random_range(170..=255);
                }
            }
        }
    }
    for p in pixels.iter_mut() {
        if rng.random_bool(ink_noise) {
            *p = if *p > 0 { 0 } else { rng.random_range(120..=255) };
        }
    }
    (Raster { width: width as i32, height: GLYPH_H as i32, encoding: RasterEncoding::GRAY8, pixels }, shown)
}

/// Renders a page: text bars, ruled tables at `tables`, optionally a distractor stamp box.
pub fn page_raster(page: &Page, tables: &[BoundingBox], distractor: bool, ink_noise: f64, rng: &mut ChaCha8Rng) -> Raster {
    let (w, h) = (PAGE_RASTER_W, PAGE_RASTER_H);
    let sx = w as f32 / page.width;
    let sy = h as f32 / page.height;
    let mut px = vec![0u8; w * h];
    let put = |x: i64, y: i64, v: u8, px: &mut Vec<u8>| {
        if x >= 0 && y >= 0 && (x as usize) < w && (y as usize) < h {
            let i = y as usize * w + x as usize;
            px[i] = px[i].max(v);
        }
    };
    for line in &page.lines {
        let y = ((line.bbox.y + line.bbox.h / 2.0) * sy) as i64;
        let x0 = (line.bbox.x * sx) as i64;
        let x1 = ((line.bbox.x + line.bbox.w) * sx) as i64;
        for x in x0..=x1 {
            put(x, y, rng.random_range(90..160), &mut px);
        }
    }
    let mut boxes: Vec<(BoundingBox, bool)> = tables.iter().map(|b| (*b, true)).collect();
    if distractor {
        let bw = rng.random_range(60.0..160.0);
        let bh = rng.random_range(40.0..90.0);
        let b = BoundingBox { x: rng.random_range(300.0..(page.width - bw - 10.0)), y: rng.random_range(page.height * 0.7..(page.height - bh - 10.0)), w: bw, h: bh };
        boxes.push((b, false));
    }
    for (b, ruled) in boxes {
        let (x0, y0) = ((b.x * sx) as i64, (b.y * sy) as i64);
        let (x1, y1) = (((b.x + b.w) * sx) as i64, ((b.y + b.h) * sy) as i64);
        for x in x0..=x1 {
            put(x, y0, 255, &mut px);
            put(x, y1, 255, &mut px);
        }
        for y in y0..=y1 {
            put(x0, y, 255, &mut px);
            put(x1, y, 255, &mut px);
            if ruled {
                // a column rule between item and amount
                put(x0 + (x1 - x0) * 2 / 3, y, 230, &mut px);
            }
        }
    }
    for p in px.iter_mut() {
        if rng.random_bool(ink_noise) {
            *p = rng.random_range(0..=255);
        }
    }
    Raster { width: w as i32, height: h as i32, encoding: RasterEncoding::GRAY8, pixels: px }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glyphs_are_distinct() {
        let n = CHARSET.chars().count();
        for a in 1..n {
            for b in (a + 1)..n {
                assert_ne!(glyph(a), glyph(b), "classes {a} and {b} share a glyph");
            }
        }
    }

    #[test]
    fn unknown_characters_map_to_question_mark() {
        assert_eq!(char_class('é'), CHARSET.len() - 1);
        assert_eq!(char_class('a'), char_class('A'));
    }
}
