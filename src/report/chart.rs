//! Report charts with `plotters`: one chart per metric, a line per model version and cohort over
//! the period's windows, with vertical markers where alerts fired (red) or resolved (green) and
//! where rollout decisions were taken (blue). Text is measured (SVG) and drawn (PNG) with the
//! TrueType font given (Debian's DejaVu Sans by default, `fonts-dejavu-core`).

use plotters::{
    coord::Shift,
    prelude::*,
};

use super::{Point, Report, ReportError};

/// One chart: a file name, a title and the plotted value of a window.
pub struct Chart {
    pub file: &'static str,
    pub title: &'static str,
    pub y_label: &'static str,
    pub value: fn(&Point) -> Option<f64>,
}

pub const CHARTS: [Chart; 4] = [
    Chart { file: "volume", title: "Documents per window", y_label: "documents", value: |p| Some(p.count as f64) },
    Chart { file: "error_rate", title: "Error rate per window", y_label: "share of documents", value: |p| p.error_rate },
    Chart { file: "latency_p95", title: "Latency p95 per window", y_label: "ms", value: |p| p.latency_p95_ms },
    Chart { file: "accuracy", title: "Accuracy per window (labelled documents)", y_label: "share correct", value: |p| p.accuracy },
];

const COLORS: [RGBColor; 6] = [RGBColor(31, 119, 180), RGBColor(255, 127, 14), RGBColor(44, 160, 44), RGBColor(148, 103, 189), RGBColor(140, 86, 75), RGBColor(23, 190, 207)];

fn fmt_time(ms: i64, span: i64) -> String {
    let t = chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default();
    if span > 2 * 86_400_000 { t.format("%m-%d %H:%M").to_string() } else { t.format("%H:%M").to_string() }
}

fn draw<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, report: &Report, chart: &Chart) -> Result<(), String> {
    let e = |x: DrawingAreaErrorKind<DB::ErrorType>| x.to_string();
    root.fill(&WHITE).map_err(e)?;
    let series: Vec<(String, Vec<(i64, f64)>)> = report
        .versions
        .iter()
        .map(|v| (format!("{} {} ({})", v.model, v.version, v.cohort), v.series.iter().filter_map(|p| (chart.value)(p).filter(|y| y.is_finite()).map(|y| (p.window_start, y))).collect::<Vec<_>>()))
        .filter(|(_, pts)| !pts.is_empty())
        .collect();
    let y_max = series.iter().flat_map(|(_, pts)| pts.iter().map(|p| p.1)).fold(0.0f64, f64::max);
    let y_top = if y_max > 0.0 { y_max * 1.1 } else { 1.0 };
    let (from, to) = (report.from_ms, report.to_ms);
    let mut c = ChartBuilder::on(root)
        .caption(format!("{} — {} to {}", chart.title, &report.from[..16.min(report.from.len())], &report.to[..16.min(report.to.len())]), ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(from..to, 0.0..y_top)
        .map_err(e)?;
    c.configure_mesh()
        .x_labels(8)
        .x_label_formatter(&|x| fmt_time(*x, to - from))
        .y_desc(chart.y_label)
        .x_desc("window start (UTC)")
        .draw()
        .map_err(e)?;
    // markers first, so the lines stay on top
    for a in &report.alerts {
        let color = if a.status == "FIRING" { RED.mix(0.6) } else { GREEN.mix(0.6) };
        c.draw_series(std::iter::once(PathElement::new(vec![(a.emitted_at, 0.0), (a.emitted_at, y_top)], color.stroke_width(1)))).map_err(e)?;
    }
    for d in &report.decisions {
        c.draw_series(std::iter::once(PathElement::new(vec![(d.decided_at, 0.0), (d.decided_at, y_top)], BLUE.mix(0.5).stroke_width(2)))).map_err(e)?;
    }
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        c.draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
            .map_err(e)?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        c.draw_series(pts.iter().map(|p| Circle::new(*p, 2, color.filled()))).map_err(e)?;
    }
    if !series.is_empty() {
        c.configure_series_labels().background_style(WHITE.mix(0.85)).border_style(BLACK).position(SeriesLabelPosition::UpperLeft).draw().map_err(e)?;
    }
    root.present().map_err(e)?;
    Ok(())
}

const SIZE: (u32, u32) = (960, 420);

/// The chart as an SVG document (`font` measures its text).
pub fn svg(report: &Report, chart: &Chart, font: &std::path::Path) -> Result<String, ReportError> {
    register_font(font)?;
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, SIZE).into_drawing_area();
        draw(&root, report, chart).map_err(ReportError::Chart)?;
    }
    Ok(out)
}

static FONT: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();

/// Registers `font` for chart text once per process (the first font given wins).
fn register_font(font: &std::path::Path) -> Result<(), ReportError> {
    FONT.get_or_init(|| {
        let bytes = std::fs::read(font).map_err(|e| format!("cannot read the font {} ({e}); install fonts-dejavu-core or set report font", font.display()))?;
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).map_err(|_| format!("{} is not a TrueType font", font.display()))
    })
    .clone()
    .map_err(ReportError::Chart)
}

/// The chart as a PNG file at `path`.
pub fn png(report: &Report, chart: &Chart, path: &std::path::Path, font: &std::path::Path) -> Result<(), ReportError> {
    register_font(font)?;
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    draw(&root, report, chart).map_err(ReportError::Chart)
}

/// The default font for PNG charts.
pub const DEFAULT_FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn pct(v: Option<f64>) -> String {
    v.map(|x| format!("{:.2} %", x * 100.0)).unwrap_or_else(|| "–".into())
}

fn ms(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.1}")).unwrap_or_else(|| "–".into())
}

/// The HTML page: the charts (through `src`, e.g. a file name or an inline data URL), the table per
/// version, and the period's alerts and decisions.
pub fn html(report: &Report, src: impl Fn(&Chart) -> String) -> String {
    let mut h = String::new();
    h.push_str(&format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>payslip-stream {:?} report {}</title><style>body{{font-family:sans-serif;margin:24px}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}th{{background:#f4f4f4}}td.l{{text-align:left}}</style></head><body>",
        report.period,
        esc(&report.from)
    ));
    h.push_str(&format!("<h1>payslip-stream — {} report</h1><p>{} to {} (UTC) · {} documents through the pipeline · {} alert events · {} rollout decisions</p>", if matches!(report.period, super::Period::Day) { "daily" } else { "weekly" }, esc(&report.from), esc(&report.to), report.documents, report.alerts.len(), report.decisions.len()));
    h.push_str("<p>Markers: red = alert fired, green = alert resolved, blue = rollout decision.</p>");
    for c in CHARTS.iter() {
        h.push_str(&format!("<h2>{}</h2><img alt=\"{}\" src=\"{}\" width=\"960\" height=\"420\">", esc(c.title), esc(c.title), esc(&src(c))));
    }
    h.push_str("<h2>Per model version</h2><table><tr><th>model</th><th>version</th><th>cohort</th><th>documents</th><th>error rate</th><th>p50 ms</th><th>p95 ms</th><th>p99 ms</th><th>max ms</th><th>accuracy</th><th>PCDA accuracy</th><th>satisfaction</th></tr>");
    for v in &report.versions {
        h.push_str(&format!(
            "<tr><td class=l>{}</td><td class=l>{}</td><td class=l>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&v.model), esc(&v.version), esc(&v.cohort), v.documents, pct(v.error_rate), ms(v.latency_p50_ms), ms(v.latency_p95_ms), ms(v.latency_p99_ms), ms(v.latency_max_ms), pct(v.accuracy), pct(v.pcda_accuracy), pct(v.satisfaction)
        ));
    }
    h.push_str("</table><h2>Alerts</h2><table><tr><th>time</th><th>status</th><th>code</th><th>severity</th><th>subject</th><th>value</th><th>action</th></tr>");
    for a in &report.alerts {
        h.push_str(&format!(
            "<tr><td class=l>{}</td><td class=l>{}</td><td class=l>{}</td><td class=l>{}</td><td class=l>{} {} ({})</td><td>{:.4}</td><td class=l>{}</td></tr>",
            fmt_time(a.emitted_at, i64::MAX), esc(&a.status), esc(&a.code), esc(&a.severity), esc(&a.model), esc(&a.version), esc(&a.cohort), a.value, esc(&a.action)
        ));
    }
    h.push_str("</table><h2>Rollout decisions</h2><table><tr><th>time</th><th>rollout</th><th>action</th><th>phase</th><th>traffic</th><th>operator</th><th>reason</th></tr>");
    for d in &report.decisions {
        h.push_str(&format!(
            "<tr><td class=l>{}</td><td class=l>{}</td><td class=l>{}</td><td>{}</td><td>{} %</td><td class=l>{}</td><td class=l>{}</td></tr>",
            fmt_time(d.decided_at, i64::MAX), esc(&d.rollout_id), d.action, d.phase, d.traffic_percent, esc(d.operator.as_deref().unwrap_or("controller")), esc(&d.reason)
        ));
    }
    h.push_str("</table></body></html>\n");
    h
}
