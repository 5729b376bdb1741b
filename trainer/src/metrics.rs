//! Metrics out: TensorBoard events under `<run_dir>/tensorboard/` with open_clip's tags, and
//! the same numbers as one JSON object per line in `<run_dir>/results.jsonl`.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use tensorboard_rs::summary_writer::SummaryWriter;

use crate::error::{io_err, Result};

pub struct MetricsWriter {
    tensorboard: SummaryWriter,
    results: File,
    results_path: PathBuf,
}

impl MetricsWriter {
    pub fn new(run_dir: &Path) -> Result<Self> {
        let tb_dir = run_dir.join("tensorboard");
        // tensorboard-rs panics when it cannot create its directory; create it first so the
        // user gets an error naming the path instead.
        fs::create_dir_all(&tb_dir).map_err(io_err(&tb_dir))?;
        let results_path = run_dir.join("results.jsonl");
        let results = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&results_path)
            .map_err(io_err(&results_path))?;
        Ok(MetricsWriter { tensorboard: SummaryWriter::new(&tb_dir), results, results_path })
    }

    /// Writes scalars for `step` (the global optimizer step).
    pub fn log(&mut self, step: u64, scalars: &[(&str, f64)]) -> Result<()> {
        let mut row = serde_json::Map::new();
        row.insert("step".into(), step.into());
        for (tag, value) in scalars {
            self.tensorboard.add_scalar(tag, *value as f32, step as usize);
            row.insert((*tag).into(), serde_json::Value::from(*value));
        }
        let line = serde_json::Value::Object(row).to_string();
        writeln!(self.results, "{line}").map_err(io_err(&self.results_path))?;
        Ok(())
    }

    pub fn flush(&mut self) -> Result<()> {
        self.tensorboard.flush();
        self.results.flush().map_err(io_err(&self.results_path))
    }
}
