//! Synthetic payslip generator: the only source of documents for the demo, the load generator
//! (`produce --synthetic`) and the training data dump (`dataset dump`), so the models are trained
//! on exactly what the pipeline later sees.
//!
//! Formats: PCDA (officers' statement of account), Army, Navy, Air Force, corporate, unknown. Field
//! names are the real ones (Basic Pay, DA, MSP, DSOP, AGIF, Income Tax, ...); amounts add up:
//! gross = sum of earnings, net = gross - sum of deductions. Each document is rendered to text lines,
//! a page raster with its tables, and a raster per text line ([`render`]). Noise (character errors,
//! dropped headers, shared vocabulary between formats, distractor boxes) keeps the tasks honest.
//! Generation is a pure function of `(seed, index)`.

pub mod render;

use rand::{seq::IndexedRandom, Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::document::{BoundingBox, GroundTruth, Page, PayslipDocument, TextLine};

/// Payslip formats the classifier tells apart, in label order.
pub const FORMATS: [&str; 6] = ["PCDA", "ARMY", "NAVY", "AIR_FORCE", "CORPORATE", "UNKNOWN"];

/// Page size in points (A4).
pub const PAGE_WIDTH: f32 = 595.0;
pub const PAGE_HEIGHT: f32 = 842.0;

/// Tunables of the generator.
#[derive(Debug, Clone)]
pub struct GeneratorConfig {
    pub seed: u64,
    /// Probability that a document carries ground-truth labels (golden traffic).
    pub golden_fraction: f64,
    /// Number of distinct users documents are spread over.
    pub users: u32,
    /// Tenants documents are spread over.
    pub tenants: Vec<String>,
    /// Attach rasters (page and lines); without them only the classifier has input.
    pub rasters: bool,
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        Self { seed: 7, golden_fraction: 1.0, users: 5_000, tenants: vec!["acme".into(), "defence".into()], rasters: true }
    }
}

struct FormatSpec {
    headers: &'static [&'static str],
    earnings: &'static [(&'static str, f64, f64)],
    deductions: &'static [(&'static str, f64, f64)],
}

const PCDA: FormatSpec = FormatSpec {
    headers: &[
        "PRINCIPAL CONTROLLER OF DEFENCE ACCOUNTS (OFFICERS) PUNE",
        "PCDA (O) STATEMENT OF ACCOUNT",
        "PAO (OR) PCDA MONTHLY STATEMENT",
    ],
    earnings: &[("BASIC PAY", 56100.0, 120000.0), ("DA", 20000.0, 60000.0), ("MSP", 15500.0, 15500.0), ("TPTA", 3600.0, 7200.0), ("CLOTHING ALLOWANCE", 1000.0, 2000.0)],
    deductions: &[("DSOP", 5000.0, 20000.0), ("AGIF", 5000.0, 10000.0), ("INCOME TAX", 5000.0, 40000.0), ("CGEIS", 60.0, 120.0), ("E-TICKET", 0.0, 500.0)],
};
const ARMY: FormatSpec = FormatSpec {
    headers: &["INDIAN ARMY PAY SLIP", "CDA (ARMY) PAY ACCOUNT", "ARMY GROUP INSURANCE PAY STATEMENT"],
    earnings: &[("BASIC PAY", 25000.0, 90000.0), ("DA", 10000.0, 40000.0), ("MSP", 5200.0, 15500.0), ("KIT MAINTENANCE ALLOWANCE", 500.0, 1500.0), ("FIELD AREA ALLOWANCE", 0.0, 10000.0)],
    deductions: &[("DSOP", 3000.0, 12000.0), ("AGIF", 3000.0, 10000.0), ("INCOME TAX", 0.0, 20000.0), ("REGIMENTAL FUND", 100.0, 500.0)],
};
const NAVY: FormatSpec = FormatSpec {
    headers: &["NAVAL PAY OFFICE MUMBAI", "NPO INDIAN NAVY PAY STATEMENT", "NAVY PAY AND ALLOWANCES"],
    earnings: &[("BASIC PAY", 25000.0, 90000.0), ("DA", 10000.0, 40000.0), ("MSP", 5200.0, 15500.0), ("SEA GOING ALLOWANCE", 1000.0, 8000.0), ("SUBMARINE ALLOWANCE", 0.0, 9000.0)],
    deductions: &[("DSOP", 3000.0, 12000.0), ("NGIF", 2000.0, 8000.0), ("INCOME TAX", 0.0, 20000.0), ("MESS SUBSCRIPTION", 200.0, 900.0)],
};
const AIR_FORCE: FormatSpec = FormatSpec {
    headers: &["AIR FORCE CENTRAL ACCOUNTS OFFICE", "AFCAO PAY SLIP", "INDIAN AIR FORCE PAY STATEMENT"],
    earnings: &[("BASIC PAY", 25000.0, 90000.0), ("DA", 10000.0, 40000.0), ("MSP", 5200.0, 15500.0), ("FLYING ALLOWANCE", 0.0, 25000.0), ("TECHNICAL ALLOWANCE", 0.0, 6000.0)],
    deductions: &[("AFPP FUND", 3000.0, 12000.0), ("AFGIS", 2000.0, 8000.0), ("INCOME TAX", 0.0, 20000.0)],
};
const CORPORATE: FormatSpec = FormatSpec {
    headers: &["SALARY SLIP", "PAYSLIP FOR THE MONTH", "EMPLOYEE PAY STATEMENT PRIVATE LIMITED"],
    earnings: &[("BASIC", 20000.0, 150000.0), ("HRA", 8000.0, 60000.0), ("SPECIAL ALLOWANCE", 2000.0, 40000.0), ("CONVEYANCE", 1600.0, 1600.0), ("BONUS", 0.0, 20000.0)],
    deductions: &[("PROVIDENT FUND", 1800.0, 18000.0), ("PROFESSIONAL TAX", 200.0, 200.0), ("INCOME TAX", 0.0, 40000.0), ("ESI", 0.0, 800.0)],
};
const UNKNOWN_POOL: FormatSpec = FormatSpec {
    headers: &["PAY STATEMENT", "STATEMENT OF EARNINGS", "REMUNERATION ADVICE", "MONTHLY STATEMENT"],
    earnings: &[("BASIC PAY", 10000.0, 90000.0), ("BASIC", 10000.0, 90000.0), ("DA", 2000.0, 30000.0), ("ALLOWANCES", 1000.0, 20000.0), ("OVERTIME", 0.0, 9000.0), ("ARREARS", 0.0, 15000.0)],
    deductions: &[("INCOME TAX", 0.0, 20000.0), ("LOAN RECOVERY", 0.0, 9000.0), ("INSURANCE", 100.0, 3000.0), ("PENSION FUND", 500.0, 6000.0)],
};

fn spec(label: usize) -> &'static FormatSpec {
    match label {
        0 => &PCDA,
        1 => &ARMY,
        2 => &NAVY,
        3 => &AIR_FORCE,
        4 => &CORPORATE,
        _ => &UNKNOWN_POOL,
    }
}

const MONTHS: [&str; 12] = ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"];
const NAMES: [&str; 10] = ["R SHARMA", "A KUMAR", "P SINGH", "S IYER", "M KHAN", "V NAIR", "K REDDY", "D GUPTA", "N DAS", "T MENON"];
const RANKS: [&str; 6] = ["CAPT", "MAJ", "LT COL", "SUB", "HAV", "SGT"];

/// A generated document and what the models should say about it.
#[derive(Debug, Clone)]
pub struct Generated {
    pub document: PayslipDocument,
    /// Index into [`FORMATS`].
    pub label: usize,
    /// Text of each line as rendered into its raster (upper case, clipped to the raster width).
    pub rendered_text: Vec<String>,
}

/// Deterministic generator: document `i` of seed `s` is always the same document.
#[derive(Debug, Clone)]
pub struct Generator {
    cfg: GeneratorConfig,
}

impl Generator {
    pub fn new(cfg: GeneratorConfig) -> Self {
        Self { cfg }
    }

    pub fn config(&self) -> &GeneratorConfig {
        &self.cfg
    }

    /// Document number `index`, with a format drawn from the default mix (PCDA-heavy, as in the
    /// runbook's user base).
    pub fn document(&self, index: u64) -> Generated {
        let mut rng = self.rng(index);
        let label = pick_label(&mut rng);
        self.build(index, label, &mut rng)
    }

    /// Document number `index` of a given format.
    pub fn document_of(&self, index: u64, label: usize) -> Generated {
        let mut rng = self.rng(index);
        let _ = pick_label(&mut rng);
        self.build(index, label.min(FORMATS.len() - 1), &mut rng)
    }

    /// Document `index` made as heavy for the infer stage as `limits` allow: the most text lines a
    /// document may have (`max_lines_per_document`, spread over as few pages as
    /// `max_lines_per_page` allows), every line and page carrying a raster, the rasters as large as
    /// the payload limit leaves room for (Avro-encoded it stays just under `max_payload_bytes`).
    /// Used to measure the memory bound (BENCHMARKS.md) and by the burst test.
    pub fn worst_case(&self, index: u64, limits: &crate::config::LimitsConfig) -> PayslipDocument {
        use crate::document::{Raster, RasterEncoding};
        let mut doc = self.document(index).document;
        let lines = limits.max_lines_per_document.min(limits.max_pages * limits.max_lines_per_page).max(1);
        let pages = lines.div_ceil(limits.max_lines_per_page.max(1)).clamp(1, limits.max_pages);
        // about 120 bytes of text, box and framing per line; the rest of 90 % of the limit is pixels,
        // a third of them page rasters and two thirds line rasters (8 rows each)
        let budget = (limits.max_payload_bytes * 9 / 10).saturating_sub(lines * 120 + 4_096);
        let line_w = (budget * 2 / 3 / lines / 8).clamp(1, limits.max_raster_pixels / 8);
        let page_px = (budget / 3 / pages).clamp(1, limits.max_raster_pixels);
        let page_w = (page_px as f64).sqrt().max(1.0) as usize;
        let page_h = (page_px / page_w).max(1);
        let mut rng = self.rng(index);
        let mut fill = |n: usize| (0..n).map(|_| rng.random::<u8>()).collect::<Vec<u8>>();
        doc.pages = (0..pages)
            .map(|p| {
                let per = lines.div_ceil(pages);
                let here = per.min(lines.saturating_sub(p * per));
                Page {
                    number: p as i32 + 1,
                    width: 595.0,
                    height: 842.0,
                    lines: (0..here)
                        .map(|l| TextLine {
                            text: format!("LINE {l:04} OF PAGE {}", p + 1),
                            bbox: BoundingBox { x: 10.0, y: 10.0 + l as f32, w: 500.0, h: 1.0 },
                            raster: Some(Raster { width: line_w as i32, height: 8, encoding: RasterEncoding::GRAY8, pixels: fill(line_w * 8) }),
                        })
                        .collect(),
                    raster: Some(Raster { width: page_w as i32, height: page_h as i32, encoding: RasterEncoding::GRAY8, pixels: fill(page_w * page_h) }),
                }
            })
            .collect();
        doc
    }

    fn rng(&self, index: u64) -> ChaCha8Rng {
        let mut rng = ChaCha8Rng::seed_from_u64(self.cfg.seed);
        rng.set_stream(index);
        rng
    }

    fn build(&self, index: u64, label: usize, rng: &mut ChaCha8Rng) -> Generated {
        let fmt = spec(label);
        let noise = rng.random_range(0.0..0.08);
        let mut texts: Vec<String> = Vec::new();
        if rng.random_bool(0.8) {
            texts.push(corrupt(fmt.headers.choose(rng).copied().unwrap_or("PAY"), noise, rng));
        }
        let month = MONTHS.choose(rng).copied().unwrap_or("JAN");
        let year = rng.random_range(2019..2026);
        texts.push(corrupt(&format!("STATEMENT FOR {month} {year}"), noise, rng));
        let name = NAMES.choose(rng).copied().unwrap_or("X");
        if label <= 3 && rng.random_bool(0.7) {
            let rank = RANKS.choose(rng).copied().unwrap_or("");
            texts.push(corrupt(&format!("{rank} {name} NO {}", rng.random_range(100000..999999)), noise, rng));
        } else {
            texts.push(corrupt(&format!("EMPLOYEE {name} ID {}", rng.random_range(1000..99999)), noise, rng));
        }
        // Unknown documents borrow a few fields of other formats so vocabulary alone is not enough.
        let borrow = if label == 5 { Some(spec(rng.random_range(0..5))) } else { None };
        let (earn, gross) = amounts(fmt.earnings, borrow.map(|b| b.earnings), rng);
        let (dedu, total_ded) = amounts(fmt.deductions, borrow.map(|b| b.deductions), rng);
        let net = ((gross - total_ded) * 100.0).round() / 100.0;

        let header_count = texts.len();
        texts.push(corrupt("EARNINGS", noise, rng));
        let earn_start = texts.len();
        for (name, v) in &earn {
            texts.push(corrupt(&format!("{name} {v:.2}"), noise, rng));
        }
        texts.push(format!("GROSS EARNINGS {gross:.2}"));
        let earn_end = texts.len();
        texts.push(corrupt("DEDUCTIONS", noise, rng));
        let ded_start = texts.len();
        for (name, v) in &dedu {
            texts.push(corrupt(&format!("{name} {v:.2}"), noise, rng));
        }
        texts.push(format!("TOTAL DEDUCTIONS {total_ded:.2}"));
        let ded_end = texts.len();
        texts.push(format!("NET PAY {net:.2}"));
        if rng.random_bool(0.5) {
            texts.push(corrupt("THIS IS A COMPUTER GENERATED STATEMENT", noise, rng));
        }

        // Layout: header block, earnings table, deductions table, footer. Line height 18 pt.
        let line_h = 18.0f32;
        let mut y = 40.0 + rng.random_range(0.0..40.0);
        let mut lines = Vec::with_capacity(texts.len());
        let mut tables = Vec::new();
        let mut table_open: Option<f32> = None;
        for (i, text) in texts.iter().enumerate() {
            if i == earn_start || i == ded_start {
                table_open = Some(y - 4.0);
            }
            let w = (text.chars().count() as f32 * 7.0).min(PAGE_WIDTH - 80.0);
            lines.push(TextLine { text: text.clone(), bbox: BoundingBox { x: 40.0, y, w, h: 12.0 }, raster: None });
            y += line_h;
            if i + 1 == earn_end || i + 1 == ded_end {
                if let Some(top) = table_open.take() {
                    tables.push(BoundingBox { x: 30.0, y: top, w: PAGE_WIDTH - 60.0, h: y - top });
                }
                y += line_h * rng.random_range(1.0..3.0);
            }
            if i + 1 == header_count {
                y += line_h * rng.random_range(0.5..4.0);
            }
        }
        let mut page = Page { number: 1, width: PAGE_WIDTH, height: PAGE_HEIGHT, lines, raster: None };
        let mut rendered_text = Vec::new();
        if self.cfg.rasters {
            let ink_noise = rng.random_range(0.0..0.06);
            page.raster = Some(render::page_raster(&page, &tables, rng.random_bool(0.3), ink_noise, rng));
            let glyph_noise = rng.random_range(0.02..0.16);
            for line in &mut page.lines {
                let (raster, shown) = render::line_raster(&line.text, glyph_noise, rng);
                line.raster = Some(raster);
                rendered_text.push(shown);
            }
        }
        let user = rng.random_range(0..self.cfg.users.max(1));
        let tenant = self.cfg.tenants.choose(rng).cloned().unwrap_or_else(|| "default".into());
        let golden = rng.random_bool(self.cfg.golden_fraction.clamp(0.0, 1.0));
        let document = PayslipDocument {
            document_id: format!("doc-{}-{index:08}", self.cfg.seed),
            user_id: format!("user-{user:05}"),
            tenant,
            submitted_at: chrono::Utc::now().timestamp_millis(),
            format_hint: None,
            pages: vec![page],
            labels: golden.then(|| GroundTruth { format: FORMATS[label].to_string(), tables: tables.clone(), net_pay: Some(net) }),
        };
        Generated { document, label, rendered_text }
    }
}

fn pick_label(rng: &mut ChaCha8Rng) -> usize {
    // PCDA 35 %, Army 15 %, Navy 12 %, Air Force 12 %, corporate 16 %, unknown 10 %.
    let r: f64 = rng.random();
    let cuts = [0.35, 0.50, 0.62, 0.74, 0.90];
    cuts.iter().position(|&c| r < c).unwrap_or(5)
}

fn amounts(
    fields: &[(&'static str, f64, f64)],
    borrow: Option<&[(&'static str, f64, f64)]>,
    rng: &mut ChaCha8Rng,
) -> (Vec<(&'static str, f64)>, f64) {
    let mut chosen: Vec<(&'static str, f64, f64)> = fields.iter().copied().filter(|_| rng.random_bool(0.85)).collect();
    if chosen.is_empty() {
        chosen.push(fields[0]);
    }
    if let Some(b) = borrow {
        if let Some(&f) = b.choose(rng) {
            if !chosen.iter().any(|c| c.0 == f.0) {
                chosen.push(f);
            }
        }
    }
    let mut total = 0.0;
    let out = chosen
        .into_iter()
        .map(|(name, lo, hi)| {
            let v = if hi > lo { rng.random_range(lo..hi) } else { lo };
            let v = (v * 100.0).round() / 100.0;
            total += v;
            (name, v)
        })
        .collect();
    (out, (total * 100.0_f64).round() / 100.0)
}

/// OCR-like noise: each letter is replaced with probability `p`.
fn corrupt(text: &str, p: f64, rng: &mut ChaCha8Rng) -> String {
    const SWAPS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0";
    text.chars()
        .map(|c| if c.is_ascii_alphabetic() && rng.random_bool(p) { *SWAPS.choose(rng).unwrap_or(&b'X') as char } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_amount(line: &str) -> f64 {
        line.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or(f64::NAN)
    }

    #[test]
    fn deterministic_per_seed_and_index() {
        let g = Generator::new(GeneratorConfig::default());
        assert_eq!(g.document(3).document.pages, g.document(3).document.pages);
        assert_ne!(g.document(3).document.pages, g.document(4).document.pages);
    }

    #[test]
    fn amounts_add_up_and_documents_validate() {
        let g = Generator::new(GeneratorConfig::default());
        for i in 0..200 {
            let d = g.document(i).document;
            d.validate(&Default::default()).unwrap();
            let lines: Vec<&str> = d.pages[0].lines.iter().map(|l| l.text.as_str()).collect();
            let find = |p: &str| lines.iter().find(|l| l.starts_with(p)).map(|l| parse_amount(l)).unwrap();
            let (gross, ded, net) = (find("GROSS EARNINGS"), find("TOTAL DEDUCTIONS"), find("NET PAY"));
            assert!((gross - ded - net).abs() < 0.011, "doc {i}: {gross} - {ded} != {net}");
            assert_eq!(d.labels.as_ref().unwrap().net_pay, Some(net));
            assert_eq!(d.labels.as_ref().unwrap().tables.len(), 2);
        }
    }

    #[test]
    fn every_format_occurs() {
        let g = Generator::new(GeneratorConfig::default());
        let mut seen = [0usize; 6];
        for i in 0..600 {
            seen[g.document(i).label] += 1;
        }
        assert!(seen.iter().all(|&n| n > 20), "{seen:?}");
    }
}

#[cfg(test)]
mod worst_case_tests {
    use super::*;

    #[test]
    fn the_worst_case_document_fills_the_limits_and_passes_them() {
        let limits = crate::config::LimitsConfig::default();
        let doc = Generator::new(Default::default()).worst_case(3, &limits);
        doc.validate(&limits.document_limits()).expect("within limits");
        let lines: usize = doc.pages.iter().map(|p| p.lines.len()).sum();
        assert_eq!(lines, limits.max_lines_per_document);
        let bytes = crate::codec::encode(&doc, crate::codec::WireFormat::Avro).unwrap().len();
        assert!(bytes <= limits.max_payload_bytes && bytes > limits.max_payload_bytes * 3 / 4, "{bytes} bytes");
    }
}
