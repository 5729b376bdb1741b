//! CSV/TSV sources as open_clip reads them (`open_clip_train/data.py`, `CsvDataset`:
//! `pd.read_csv(input_filename, sep=sep)`, columns `--csv-img-key` (default `filepath`) and
//! `--csv-caption-key` (default `title`)). open_clip's default separator is a tab and its
//! files are often tab-separated under a `.csv` name, so the separator is detected from the
//! header line: a tab there means TSV, otherwise commas. Quoted fields (`"a, b"`, doubled
//! quotes) are read as the `csv` crate reads them, which is what pandas does.
//!
//! Image paths are relative to the CSV's folder (absolute paths stay as they are). Rows with
//! no image path, an empty or non-UTF-8 caption are dropped while reading and counted; a
//! missing or undecodable image file is a skip on `get`.

use std::path::Path;

use super::files::{base_dir, skip_record, Caption, Entry, FileDataset, BAD_RECORD};
use super::spec::CsvSpec;
use crate::error::{first_few, DataError};
use crate::skip::{SkipCounts, SkipReason};

/// Reads the rows of `spec.path` into a [`FileDataset`]. A header without the image or
/// caption column is an error naming the file and the columns it has.
pub fn load(spec: &CsvSpec) -> Result<FileDataset, DataError> {
    let path = spec.path.as_path();
    let bytes =
        std::fs::read(path).map_err(|source| DataError::Read { path: path.to_owned(), source })?;
    let body = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(&bytes);
    let separator = spec.separator.unwrap_or_else(|| detect_separator(body));
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(separator)
        .has_headers(true)
        // Short or long rows are read as they are; a missing field is an empty one.
        .flexible(true)
        .from_reader(body);
    let header: Vec<String> = reader
        .byte_headers()
        .map_err(|e| csv_error(path, &e))?
        .iter()
        .map(|h| String::from_utf8_lossy(h).trim().to_owned())
        .collect();
    let column = |key: &str| header.iter().position(|h| h == key);
    let label_col = match &spec.label_key {
        Some(key) => Some(column(key).ok_or_else(|| DataError::Label {
            path: path.to_owned(),
            message: format!(
                "no label column `{key}` (the class index of each row, 0 for the first class name); \
                 its columns are {}. Name yours with csv:{}?label_key=COLUMN",
                quoted(&header.iter().map(String::as_str).collect::<Vec<_>>()),
                path.display()
            ),
        })?),
        None => None,
    };
    // A classification list (image and label) needs no caption column: the label stands in.
    let caption_col = column(&spec.caption_key).or(label_col);
    let (Some(img_col), Some(caption_col)) = (column(&spec.img_key), caption_col) else {
        let missing: Vec<&str> = [spec.img_key.as_str(), spec.caption_key.as_str()]
            .into_iter()
            .filter(|k| column(k).is_none())
            .collect();
        let sep_name = if separator == b'\t' { "tab" } else { "comma" };
        return Err(DataError::Spec {
            spec: spec.to_string(),
            message: format!(
                "{} has no column {}; its columns ({sep_name}-separated) are {}. Name yours \
                 with csv:FILE?img_key=COLUMN&caption_key=COLUMN",
                path.display(),
                quoted(&missing),
                quoted(&header.iter().map(String::as_str).collect::<Vec<_>>()),
            ),
        });
    };

    let base = base_dir(path);
    let mut entries = Vec::new();
    let mut skips = SkipCounts::new();
    let mut record = csv::ByteRecord::new();
    loop {
        let line = reader.position().line();
        match reader.read_byte_record(&mut record) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => {
                // Reading from memory, only a malformed record can fail here; the reader
                // goes on with the next one.
                let origin = format!("line {line}");
                skip_record(&mut skips, BAD_RECORD, path, &origin, &e.to_string());
                continue;
            }
        }
        let line = record.position().map_or(line, |p| p.line());
        let origin = format!("line {line}");
        let field = |i: usize| record.get(i).unwrap_or_default();
        let image = match std::str::from_utf8(field(img_col)).map(str::trim) {
            Ok(p) if !p.is_empty() => p,
            bad => {
                let detail = if bad.is_ok() { "no image path" } else { "image path is not UTF-8" };
                skip_record(&mut skips, SkipReason::MissingImage.as_str(), path, &origin, detail);
                continue;
            }
        };
        // Before the caption: where the label stands in for it, an empty one is a missing
        // label, not an empty caption.
        let label = match label_col {
            None => None,
            Some(col) => {
                Some(class_index(&String::from_utf8_lossy(field(col))).map_err(|message| {
                    DataError::Label {
                        path: path.to_owned(),
                        message: format!("{origin}: {message}"),
                    }
                })?)
            }
        };
        let caption = match std::str::from_utf8(field(caption_col)) {
            Ok(c) if !c.trim().is_empty() => c,
            Ok(_) => {
                let reason = SkipReason::EmptyCaption.as_str();
                skip_record(&mut skips, reason, path, &origin, "");
                continue;
            }
            Err(_) => {
                let reason = SkipReason::NonUtf8Caption.as_str();
                skip_record(&mut skips, reason, path, &origin, "");
                continue;
            }
        };
        entries.push(Entry {
            label,
            key: format!("{line:09}"),
            image: base.join(image),
            caption: Caption::Text(caption.to_owned()),
            origin,
        });
    }
    Ok(FileDataset::new(path.to_owned(), entries, skips))
}

/// A label as written in a CSV field or JSONL string: a class index 0, 1, 2, ...; otherwise
/// why not. A bad label is an error rather than a skipped row: zero-shot accuracy over the
/// rows left would not be the accuracy on the set.
pub(crate) fn class_index(text: &str) -> Result<i64, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("no label (the label field is empty)".to_owned());
    }
    match text.parse::<i64>() {
        Ok(label) if label >= 0 => Ok(label),
        _ => Err(format!("label `{text}` is not a class index (0, 1, 2, ...)")),
    }
}

/// Tab if the first line holds one, else comma (pandas reads whatever it is told; open_clip
/// tells it tab).
pub fn detect_separator(bytes: &[u8]) -> u8 {
    let first_line = bytes.split(|&b| b == b'\n').next().unwrap_or_default();
    if first_line.contains(&b'\t') {
        b'\t'
    } else {
        b','
    }
}

fn csv_error(path: &Path, e: &csv::Error) -> DataError {
    DataError::Read {
        path: path.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
    }
}

/// Column names in backquotes, a wide header cut to its first dozen with a count.
fn quoted(names: &[&str]) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
    first_few(&quoted, 12)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::image::test_images::{jpeg, png, write};
    use crate::sources::spec::DataSpec;
    use crate::sources::Dataset;

    #[test]
    fn a_label_column_labels_rows_and_may_stand_in_for_captions() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(&d.join("a.jpg"), &jpeg(8, 8));
        write(&d.join("b.jpg"), &jpeg(8, 8));
        std::fs::write(d.join("cls.csv"), "filepath,label\na.jpg,3\nb.jpg,0\n").unwrap();
        let dataset =
            load(&csv_spec(&format!("csv:{}?label_key=label", d.join("cls.csv").display())))
                .unwrap();
        assert_eq!(dataset.len(), 2);
        let (a, b) = (dataset.get(0).unwrap(), dataset.get(1).unwrap());
        assert_eq!((a.label, a.caption.as_str()), (Some(3), "3"));
        assert_eq!(b.label, Some(0));
        let err = load(&csv_spec(&format!("csv:{}?label_key=class", d.join("cls.csv").display())))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cls.csv")
                && err.contains("no label column `class`")
                && err.contains("`filepath`, `label`")
                && err.contains("?label_key=COLUMN"),
            "{err}"
        );
        // A label that is not a class index stops the reading, naming the line and the label.
        for (bad, expect) in [
            ("x", "line 3: label `x` is not a class index"),
            ("-1", "line 3: label `-1`"),
            ("1.5", "label `1.5`"),
            ("", "line 3: no label"),
        ] {
            std::fs::write(
                d.join("cls.csv"),
                format!("filepath,title,label\na.jpg,a,3\nb.jpg,b,{bad}\n"),
            )
            .unwrap();
            let err =
                load(&csv_spec(&format!("csv:{}?label_key=label", d.join("cls.csv").display())))
                    .unwrap_err()
                    .to_string();
            assert!(err.contains("cls.csv") && err.contains(expect), "{bad}: {err}");
        }
    }

    fn csv_spec(spec: &str) -> CsvSpec {
        match DataSpec::parse(spec).unwrap() {
            DataSpec::Csv(s) => s,
            other => panic!("{spec} parsed as {other:?}"),
        }
    }

    fn images(d: &Path) {
        write(&d.join("img/a.jpg"), &jpeg(10, 8));
        write(&d.join("img/b.png"), &png(6, 6));
        write(&d.join("img/bad.jpg"), b"\xff\xd8\xff garbage");
    }

    #[test]
    fn comma_separated_with_quoted_captions() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        images(d);
        let text = "filepath,title\n\
                    img/a.jpg,\"a dog, a cat, and a \"\"bird\"\"\"\n\
                    img/b.png,plain caption\n\
                    img/bad.jpg,broken image\n\
                    img/gone.jpg,missing file\n\
                    img/a.jpg,\n\
                    ,no image path\n\
                    img/a.jpg,\"multi\nline\"\n";
        write(&d.join("list.csv"), text.as_bytes());
        let ds = load(&csv_spec(d.join("list.csv").to_str().unwrap())).unwrap();
        assert_eq!(ds.len(), 5);
        let a = ds.get(0).unwrap();
        assert_eq!(a.caption, "a dog, a cat, and a \"bird\"");
        assert_eq!(a.image.dimensions(), (10, 8));
        assert_eq!(a.key, "000000002");
        assert_eq!(ds.get(1).unwrap().caption, "plain caption");
        assert_eq!(ds.get(2), Err(SkipReason::UndecodableImage));
        assert_eq!(ds.get(3), Err(SkipReason::MissingImage));
        assert_eq!(ds.get(4).unwrap().caption, "multi\nline");
        let skips = ds.load_skips();
        assert_eq!(skips.get("empty_caption"), Some(&1));
        assert_eq!(skips.get("missing_image"), Some(&1));
        assert_eq!(skips.total(), 2);
        assert!(ds.describe(3).contains("line 5"), "{}", ds.describe(3));
    }

    #[test]
    fn tab_separated_under_a_csv_name_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        images(d);
        // open_clip's own layout: tab-separated, extra columns, a comma inside a caption.
        let text = "\u{feff}id\ttitle\tfilepath\n\
                    1\ta red, round thing\timg/a.jpg\n\
                    2\t\"quoted\ttab\"\timg/b.png\n";
        write(&d.join("train.csv"), text.as_bytes());
        assert_eq!(detect_separator(text.as_bytes()), b'\t');
        let ds = load(&csv_spec(&format!("csv:{}", d.join("train.csv").display()))).unwrap();
        assert_eq!(ds.len(), 2);
        assert_eq!(ds.get(0).unwrap().caption, "a red, round thing");
        assert_eq!(ds.get(1).unwrap().caption, "quoted\ttab");
        // The same file forced to commas has one column `id\ttitle\tfilepath`.
        let spec = csv_spec(&format!("csv:{}?sep=comma", d.join("train.csv").display()));
        let err = load(&spec).unwrap_err().to_string();
        assert!(err.contains("`filepath`, `title`"), "{err}");
    }

    #[test]
    fn configurable_columns_and_a_named_error_for_missing_ones() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        images(d);
        write(&d.join("data.tsv"), b"path\ttext\n img/a.jpg \ta jpeg\n/abs/none.jpg\tabsolute\n");
        let file = d.join("data.tsv");
        let err = load(&csv_spec(file.to_str().unwrap())).unwrap_err().to_string();
        assert!(
            err.contains("data.tsv")
                && err.contains("`filepath`, `title`")
                && err.contains("`path`, `text`"),
            "{err}"
        );
        let spec = csv_spec(&format!("csv:{}?img_key=path&caption_key=text", file.display()));
        assert_eq!(spec.img_key, "path");
        let ds = load(&spec).unwrap();
        assert_eq!(ds.get(0).unwrap().caption, "a jpeg");
        // Absolute paths are not joined to the CSV's folder.
        assert_eq!(ds.entries()[1].image, Path::new("/abs/none.jpg"));
        assert_eq!(ds.get(1), Err(SkipReason::MissingImage));
        // A wide header is cut to its first dozen columns in the message.
        let wide: Vec<String> = (0..40).map(|i| format!("c{i}")).collect();
        write(&d.join("wide.csv"), format!("{}\n", wide.join(",")).as_bytes());
        let err = load(&csv_spec(d.join("wide.csv").to_str().unwrap())).unwrap_err().to_string();
        assert!(err.contains("`c11` and 28 more (40 in all)") && !err.contains("`c12`"), "{err}");
        // The error's spec string parses back to the same spec.
        assert_eq!(csv_spec(&spec.to_string()), spec);
    }
}
