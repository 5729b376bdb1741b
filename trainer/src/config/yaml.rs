//! YAML text to a typed value, with errors that name the key path and the line: what the run
//! config (`read.rs`) and model files (`model.rs`) are read with.

use std::path::Path;

use super::ConfigError;

/// Deserialises YAML text, naming the key path and the line on error.
pub(super) fn deserialize_text<T: serde::de::DeserializeOwned>(
    text: &str,
    path: &Path,
) -> Result<T, ConfigError> {
    let de = serde_yaml::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner();
        // An error raised after a section was read (a conversion such as `loss:`'s) carries the
        // document's start, not the section's line: no location beats a wrong one.
        let first_key = key.split('.').next().unwrap_or_default();
        let location = inner
            .location()
            .filter(|l| {
                !(l.line() == 1 && l.column() == 1 && key != "." && !text.starts_with(first_key))
            })
            .map(|l| format!(" (line {}, column {})", l.line(), l.column()))
            .unwrap_or_default();
        // serde_yaml repeats the key path (or the path of the mapping holding the key) and the
        // location in its own message; keep its core.
        let mut message = inner.to_string();
        let parents: Vec<&str> =
            key.match_indices('.').map(|(i, _)| &key[..i]).chain([key.as_str()]).collect();
        if let Some(stripped) =
            parents.iter().rev().find_map(|p| message.strip_prefix(&format!("{p}: ")))
        {
            message = stripped.to_string();
        }
        if let Some(idx) = message.find(" at line ") {
            message.truncate(idx);
        }
        let key = if key == "." { String::new() } else { format!("{key}: ") };
        ConfigError::Invalid { path: path.into(), message: format!("{key}{message}{location}") }
    })
}
