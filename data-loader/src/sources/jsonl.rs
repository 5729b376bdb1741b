//! JSON Lines sources: one object per line, `{"image": "imgs/0001.jpg", "caption": "..."}`,
//! the key names configurable (`jsonl:FILE?img_key=url&caption_key=text`). Image paths are
//! relative to the file's folder. Blank lines are ignored. A line that is not a JSON object,
//! or whose image or caption is not a string, is dropped while reading and counted as
//! `bad_record` (the log names its line number); a missing or empty key counts as
//! `missing_image`, `missing_caption` or `empty_caption`.
//!
//! With `label_key=KEY` (zero-shot evaluation) every object carries a class index under KEY,
//! a non-negative integer (or a string holding one); a line without one is an error naming
//! it. An object with no caption then takes the label's text as its caption.

use serde_json::Value;

use super::csv::class_index;
use super::files::{base_dir, skip_record, Caption, Entry, FileDataset, BAD_RECORD};
use super::spec::JsonlSpec;
use crate::error::{first_few, DataError};
use crate::skip::{SkipCounts, SkipReason};

/// Reads the lines of `spec.path` into a [`FileDataset`].
pub fn load(spec: &JsonlSpec) -> Result<FileDataset, DataError> {
    let path = spec.path.as_path();
    let bytes =
        std::fs::read(path).map_err(|source| DataError::Read { path: path.to_owned(), source })?;
    let base = base_dir(path);
    let mut entries = Vec::new();
    let mut skips = SkipCounts::new();
    // The first record's keys, and whether any record has the two keys asked for: a file
    // whose records all lack one is written with other names, not missing data.
    let mut first_keys: Option<(usize, Vec<String>)> = None;
    let (mut has_img_key, mut has_caption_key) = (false, false);
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let number = i + 1;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let origin = format!("line {number}");
        let mut skip = |reason: &str, detail: &str| {
            skip_record(&mut skips, reason, path, &origin, detail);
        };
        let object = match serde_json::from_slice::<Value>(line) {
            Ok(Value::Object(object)) => object,
            Ok(other) => {
                let detail = format!("a JSON {}, not an object", type_name(&other));
                skip(BAD_RECORD, &detail);
                continue;
            }
            Err(e) => {
                skip(BAD_RECORD, &e.to_string());
                continue;
            }
        };
        if first_keys.is_none() {
            first_keys = Some((number, object.keys().cloned().collect::<Vec<_>>()));
        }
        has_img_key |= object.contains_key(&spec.img_key);
        has_caption_key |= object.contains_key(&spec.caption_key);
        let image = match object.get(&spec.img_key) {
            Some(Value::String(s)) if !s.trim().is_empty() => s.trim(),
            None | Some(Value::Null) => {
                skip(SkipReason::MissingImage.as_str(), &format!("no `{}`", spec.img_key));
                continue;
            }
            Some(Value::String(_)) => {
                skip(SkipReason::MissingImage.as_str(), &format!("empty `{}`", spec.img_key));
                continue;
            }
            Some(other) => {
                let detail = format!("`{}` is a {}, not a path", spec.img_key, type_name(other));
                skip(BAD_RECORD, &detail);
                continue;
            }
        };
        let label = match &spec.label_key {
            None => None,
            Some(key) => Some(label_of(object.get(key), key, spec).map_err(|message| {
                DataError::Label { path: path.to_owned(), message: format!("{origin}: {message}") }
            })?),
        };
        let label_text = label.map(|l| l.to_string());
        let caption = match (object.get(&spec.caption_key), &label_text) {
            (None | Some(Value::Null), Some(text)) => text,
            (Some(Value::String(s)), _) if !s.trim().is_empty() => s,
            (None | Some(Value::Null), None) => {
                let detail = format!("no `{}`", spec.caption_key);
                skip(SkipReason::MissingCaption.as_str(), &detail);
                continue;
            }
            (Some(Value::String(_)), _) => {
                skip(SkipReason::EmptyCaption.as_str(), "");
                continue;
            }
            (Some(other), _) => {
                let detail = format!("`{}` is a {}, not text", spec.caption_key, type_name(other));
                skip(BAD_RECORD, &detail);
                continue;
            }
        };
        entries.push(Entry {
            label,
            key: format!("{number:09}"),
            image: base.join(image),
            caption: Caption::Text(caption.clone()),
            origin,
        });
    }
    // With labels read, a record's label stands in for a missing caption (zero-shot sets).
    let has_caption_key = has_caption_key || spec.label_key.is_some();
    if let Some((line, keys)) = first_keys.filter(|_| !(has_img_key && has_caption_key)) {
        let missing: Vec<String> =
            [(has_img_key, &spec.img_key), (has_caption_key, &spec.caption_key)]
                .into_iter()
                .filter(|(has, _)| !has)
                .map(|(_, key)| format!("`{key}`"))
                .collect();
        let found: Vec<String> = keys.iter().map(|k| format!("`{k}`")).collect();
        let found = if found.is_empty() { "no keys".to_owned() } else { first_few(&found, 12) };
        return Err(DataError::Spec {
            spec: spec.to_string(),
            message: format!(
                "no record of {} has the key {}; the first record (line {line}) has {found}. \
                 Name yours with jsonl:FILE?img_key=KEY&caption_key=KEY",
                path.display(),
                missing.join(" or "),
            ),
        });
    }
    Ok(FileDataset::new(path.to_owned(), entries, skips))
}

/// The class index under `key` of one object, or why there is none.
fn label_of(value: Option<&Value>, key: &str, spec: &JsonlSpec) -> Result<i64, String> {
    match value {
        None | Some(Value::Null) => Err(format!(
            "no `{key}` (the class index of each object, 0 for the first class name; name the key with jsonl:{}?label_key=KEY)",
            spec.path.display()
        )),
        Some(Value::Number(n)) => match n.as_i64() {
            Some(label) if label >= 0 => Ok(label),
            _ => Err(format!("label `{n}` is not a class index (0, 1, 2, ...)")),
        },
        Some(Value::String(s)) => class_index(s),
        Some(other) => Err(format!("label `{other}` is not a class index (0, 1, 2, ...)")),
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::image::test_images::{jpeg, png, write};
    use crate::sources::spec::DataSpec;
    use crate::sources::Dataset;

    fn jsonl_spec(spec: &str) -> JsonlSpec {
        match DataSpec::parse(spec).unwrap() {
            DataSpec::Jsonl(s) => s,
            other => panic!("{spec} parsed as {other:?}"),
        }
    }

    #[test]
    fn objects_per_line_with_broken_lines_counted() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(&d.join("imgs/a.jpg"), &jpeg(9, 7));
        write(&d.join("imgs/b.png"), &png(3, 3));
        let text = concat!(
            r#"{"image": "imgs/a.jpg", "caption": "a jpeg, with a comma", "extra": 1}"#,
            "\n",
            r#"{"image": "imgs/b.png", "caption": "a png"}"#,
            "\n\n",
            r#"{"image": "imgs/a.jpg", "caption": "cut off"#,
            "\n",
            r#"["not", "an", "object"]"#,
            "\n",
            r#"{"image": "imgs/a.jpg"}"#,
            "\n",
            r#"{"caption": "no image"}"#,
            "\n",
            r#"{"image": "imgs/a.jpg", "caption": "  "}"#,
            "\n",
            r#"{"image": 7, "caption": "number path"}"#,
            "\n",
            r#"{"image": "imgs/gone.jpg", "caption": "missing file"}"#,
            "\n",
        );
        write(&d.join("data.jsonl"), text.as_bytes());
        let ds = load(&jsonl_spec(d.join("data.jsonl").to_str().unwrap())).unwrap();
        assert_eq!(ds.len(), 3);
        let a = ds.get(0).unwrap();
        assert_eq!(a.caption, "a jpeg, with a comma");
        assert_eq!((a.key.as_str(), a.image.dimensions()), ("000000001", (9, 7)));
        assert_eq!(ds.get(1).unwrap().image.dimensions(), (3, 3));
        assert_eq!(ds.get(2), Err(SkipReason::MissingImage));
        assert!(ds.describe(2).contains("line 10"), "{}", ds.describe(2));
        let skips = ds.load_skips();
        assert_eq!(skips.get(BAD_RECORD), Some(&3));
        assert_eq!(skips.get("missing_caption"), Some(&1));
        assert_eq!(skips.get("missing_image"), Some(&1));
        assert_eq!(skips.get("empty_caption"), Some(&1));
        assert_eq!(skips.total(), 6);
    }

    #[test]
    fn configurable_keys() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(&d.join("x.jpg"), &jpeg(4, 4));
        write(&d.join("data.json-lines"), br#"{"url": "x.jpg", "text": "renamed keys"}"#);
        let spec = jsonl_spec(&format!(
            "jsonl:{}?img_key=url&caption_key=text",
            d.join("data.json-lines").display()
        ));
        let ds = load(&spec).unwrap();
        assert_eq!(ds.get(0).unwrap().caption, "renamed keys");
        assert_eq!(jsonl_spec(&spec.to_string()), spec);
        // Keys no record has are an error naming them and the keys the file does use.
        let err = load(&jsonl_spec(&format!("jsonl:{}", d.join("data.json-lines").display())))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("data.json-lines")
                && err.contains("the key `image` or `caption`")
                && err.contains("has `text`, `url`")
                && err.contains("img_key="),
            "{err}"
        );
        let bad = format!("jsonl:{}?sep=tab", d.join("data.json-lines").display());
        assert!(DataSpec::parse(&bad)
            .unwrap_err()
            .to_string()
            .contains("img_key, caption_key, label_key"));
        let err = DataSpec::parse(&bad).unwrap_err().to_string();
        assert!(err.contains("unknown jsonl option `sep`"), "{err}");
    }

    #[test]
    fn labels_are_class_indices_or_an_error_naming_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(&d.join("x.jpg"), &jpeg(4, 4));
        let file = d.join("val.jsonl");
        let spec = || jsonl_spec(&format!("jsonl:{}?label_key=label", file.display()));
        write(
            &file,
            concat!(
                r#"{"image": "x.jpg", "caption": "a dog", "label": 2}"#,
                "\n",
                r#"{"image": "x.jpg", "label": "0"}"#,
                "\n"
            )
            .as_bytes(),
        );
        let ds = load(&spec()).unwrap();
        let (a, b) = (ds.get(0).unwrap(), ds.get(1).unwrap());
        assert_eq!((a.label, a.caption.as_str()), (Some(2), "a dog"));
        // No caption: the label's text stands in, as in a CSV with no caption column.
        assert_eq!((b.label, b.caption.as_str()), (Some(0), "0"));
        assert_eq!(jsonl_spec(&spec().to_string()), spec());
        for (line, expect) in [
            (r#"{"image": "x.jpg", "caption": "c"}"#, "line 2: no `label`"),
            (r#"{"image": "x.jpg", "label": -1}"#, "line 2: label `-1` is not a class index"),
            (r#"{"image": "x.jpg", "label": 1.5}"#, "line 2: label `1.5`"),
            (r#"{"image": "x.jpg", "label": "cat"}"#, "line 2: label `cat`"),
            (r#"{"image": "x.jpg", "label": [1]}"#, "label `[1]` is not"),
        ] {
            write(&file, format!("{{\"image\": \"x.jpg\", \"label\": 0}}\n{line}\n").as_bytes());
            let err = load(&spec()).unwrap_err().to_string();
            assert!(err.contains("val.jsonl") && err.contains(expect), "{line}: {err}");
        }
        // Without label_key, labels are not read at all: a label that is no class index is
        // no error there.
        write(
            &file,
            concat!(r#"{"image": "x.jpg", "caption": "c", "label": [1]}"#, "\n").as_bytes(),
        );
        let plain = load(&jsonl_spec(file.to_str().unwrap())).unwrap();
        assert_eq!(plain.get(0).unwrap().label, None);
    }
}
