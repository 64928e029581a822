//! A terminal progress bar fed by the library's progress events ([`payslip_stream::progress`]).
//! indicatif hides the bar by itself when stderr is not a terminal.

use std::sync::{Arc, Mutex};

use indicatif::{ProgressBar, ProgressStyle};
use payslip_stream::progress::{Progress, ProgressSink};

/// A sink that draws a bar with position, rate and ETA.
pub fn bar() -> ProgressSink {
    let bar: Mutex<Option<ProgressBar>> = Mutex::new(None);
    Some(Arc::new(move |p: Progress| {
        let mut slot = bar.lock().unwrap_or_else(|e| e.into_inner());
        match p {
            Progress::Start { total, unit } => {
                let b = ProgressBar::new(total);
                let template = format!("{{spinner}} {{pos}}/{{len}} {unit} [{{elapsed_precise}}] {{per_sec}} eta {{eta}} {{wide_bar}}");
                b.set_style(ProgressStyle::with_template(&template).unwrap_or_else(|_| ProgressStyle::default_bar()));
                *slot = Some(b);
            }
            Progress::Advance(n) => {
                if let Some(b) = slot.as_ref() {
                    b.inc(n);
                }
            }
            Progress::Finish => {
                if let Some(b) = slot.take() {
                    b.finish_and_clear();
                }
            }
        }
    }))
}

/// [`bar`] when stderr is a terminal, else nothing.
pub fn bar_if_terminal() -> ProgressSink {
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        bar()
    } else {
        None
    }
}
