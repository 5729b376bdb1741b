//! `index.json`, the index `oxclip data pack` and `data synth` write beside their shards: each
//! shard's name and sample count, so a loader plans an epoch without reading a shard.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::DataError;

/// `index.json` of a shard directory: each shard's name and sample count.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardIndex {
    pub shards: Vec<ShardIndexEntry>,
    /// Samples in all shards (indexes that lack it still give each shard's count).
    #[serde(default)]
    pub samples: u64,
    /// `oxclip data pack` for the indexes it writes: a folder whose index says so is pack's own
    /// earlier output, which a new pack may replace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub written_by: Option<String>,
}

/// One shard in an [`ShardIndex`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardIndexEntry {
    pub name: String,
    pub samples: u64,
}

impl ShardIndex {
    /// Reads `dir/index.json`.
    pub fn read(dir: &Path) -> Result<Self, DataError> {
        let path = dir.join("index.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|source| DataError::Read { path: path.clone(), source })?;
        serde_json::from_str(&text).map_err(|source| DataError::Json { path, source })
    }
}
