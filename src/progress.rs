//! Progress of long library operations (`produce`, replays), reported through a callback so the
//! library draws nothing itself; the binary turns the events into a progress bar on a terminal.

use std::sync::Arc;

/// One progress event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Work of `total` units (`unit`: "documents", "messages") begins.
    Start { total: u64, unit: &'static str },
    /// `n` more units are done.
    Advance(u64),
    /// The work is over.
    Finish,
}

/// Where progress goes; `None`: nowhere.
pub type ProgressSink = Option<Arc<dyn Fn(Progress) + Send + Sync>>;

pub(crate) fn report(sink: &ProgressSink, event: Progress) {
    if let Some(f) = sink {
        f(event);
    }
}
