//! The progress bar the commands show while they pack, count, embed, index or evaluate:
//! one style, on stderr, hidden where stderr is not a terminal. The libraries report
//! progress through callbacks; only launch draws it.

use indicatif::{ProgressBar, ProgressStyle};

/// A progress bar on stderr counting `unit` (hidden when stderr is not a terminal), its
/// length set by the caller or the first progress call.
pub fn progress_bar(message: &'static str, unit: &str) -> ProgressBar {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{{msg}} [{{bar:40}}] {{pos}}/{{len}} {unit} ({{per_sec}}, eta {{eta}})"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(message);
    bar
}
