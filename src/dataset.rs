//! `dataset dump`: training data for `models/train.py`, produced by the same generator and the
//! same preprocessing code the infer stage runs, so the Python side never re-implements features.
//!
//! Layout of the output directory (little-endian, row-major):
//! - `meta.json`: counts, dimensions, labels, charset
//! - `classifier_x.f32` `[docs, CLASSIFIER_DIM]`, `classifier_y.u8` `[docs]` (index into FORMATS)
//! - `table_x.u8` `[docs, PAGE_RASTER_H * PAGE_RASTER_W]` (intensity * 255), `table_y.u8` `[docs, cells]`
//! - `text_x.u8` `[lines, MAX_LINE_CHARS, GLYPH_H * GLYPH_W]`, `text_y.u8` `[lines, MAX_LINE_CHARS]`
//!   (class index into CHARSET; 0 = space/padding)

use std::{fs::File, io::{BufWriter, Write}, path::Path};

use rand::{Rng, SeedableRng};

use crate::{
    inference::preprocess::*,
    synth::{render::{char_class, CHARSET}, Generator, GeneratorConfig, FORMATS},
};

/// Writes `count` documents of generator seed `seed` to `dir`, with at most `lines_per_doc` line
/// rasters per document for the text model.
pub fn dump(dir: &Path, seed: u64, count: u64, lines_per_doc: usize) -> std::io::Result<serde_json::Value> {
    std::fs::create_dir_all(dir)?;
    let gen = Generator::new(GeneratorConfig { seed, ..Default::default() });
    let mut cx = BufWriter::new(File::create(dir.join("classifier_x.f32"))?);
    let mut cy = BufWriter::new(File::create(dir.join("classifier_y.u8"))?);
    let mut tx = BufWriter::new(File::create(dir.join("table_x.u8"))?);
    let mut ty = BufWriter::new(File::create(dir.join("table_y.u8"))?);
    let mut gx = BufWriter::new(File::create(dir.join("text_x.u8"))?);
    let mut gy = BufWriter::new(File::create(dir.join("text_y.u8"))?);
    let mut pick = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x7E57);
    let mut lines = 0u64;
    let mut per_format = [0u64; FORMATS.len()];
    for i in 0..count {
        let g = gen.document(i);
        let d = &g.document;
        per_format[g.label] += 1;
        for v in classifier_features(&d.full_text()) {
            cx.write_all(&v.to_le_bytes())?;
        }
        cy.write_all(&[g.label as u8])?;
        let page = &d.pages[0];
        let raster = page.raster.as_ref().ok_or_else(|| std::io::Error::other("generator made a page without raster"))?;
        let pix = page_tensor(raster).map_err(std::io::Error::other)?;
        tx.write_all(&pix.iter().map(|v| (v * 255.0).round() as u8).collect::<Vec<_>>())?;
        let tables = d.labels.as_ref().map(|l| l.tables.clone()).unwrap_or_default();
        ty.write_all(&table_cell_targets(&tables, page.width, page.height).iter().map(|&v| v as u8).collect::<Vec<_>>())?;
        for _ in 0..lines_per_doc.min(page.lines.len()) {
            let li = pick.random_range(0..page.lines.len());
            let Some(r) = &page.lines[li].raster else { continue };
            let cells = line_cells(r).map_err(std::io::Error::other)?;
            gx.write_all(&cells.iter().map(|v| (v * 255.0).round() as u8).collect::<Vec<_>>())?;
            let mut target = vec![0u8; MAX_LINE_CHARS];
            for (k, c) in g.rendered_text[li].chars().take(MAX_LINE_CHARS).enumerate() {
                target[k] = char_class(c) as u8;
            }
            gy.write_all(&target)?;
            lines += 1;
        }
    }
    for w in [&mut cx, &mut cy, &mut tx, &mut ty, &mut gx, &mut gy] {
        w.flush()?;
    }
    let meta = serde_json::json!({
        "seed": seed,
        "documents": count,
        "lines": lines,
        "per_format": FORMATS.iter().zip(per_format).map(|(f, n)| (f.to_string(), n)).collect::<std::collections::BTreeMap<_, _>>(),
        "formats": FORMATS,
        "charset": CHARSET.chars().map(|c| c.to_string()).collect::<Vec<_>>(),
        "classifier_dim": CLASSIFIER_DIM,
        "page_raster": [PAGE_RASTER_H, PAGE_RASTER_W],
        "table_grid": [TABLE_GRID_H, TABLE_GRID_W],
        "max_line_chars": MAX_LINE_CHARS,
        "glyph": [GLYPH_H, GLYPH_W],
    });
    std::fs::write(dir.join("meta.json"), serde_json::to_vec_pretty(&meta)?)?;
    Ok(meta)
}
