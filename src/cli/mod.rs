//! The binary's own modules: argument definitions and the terminal progress bar.

pub mod args;
pub mod progress;
