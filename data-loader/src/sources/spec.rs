//! What data to train on, as the user writes it: `synthetic:N`, a brace pattern of shards
//! (`data/{00000..01243}.tar`, as webdataset and img2dataset write them), one `.tar`, or a
//! directory of `.tar` shards, or `pipe:CMD` (each brace expansion of CMD one shard, read from
//! its standard output, as webdataset does: `pipe:aws s3 cp s3://bucket/{000..099}.tar -`).
//! Several shard specs can be joined with `::`; each stays a source of its own, for sampling
//! weights.
//!
//! Image-caption files that are not shards (see `sources`): `csv:FILE` (or a `.csv`/`.tsv`
//! path), `jsonl:FILE` (or a `.jsonl` path), both taking `?img_key=COL&caption_key=COL`, and
//! `folder:DIR` (or a directory holding images rather than `.tar` shards). These stand alone:
//! `oxclip data pack` turns them into shards, which can then be joined.
//!
//! Hugging Face datasets (`sources/table.rs`): `parquet:PATH` (or a `.parquet` path, or a
//! folder holding `.parquet` files: a file, a folder, a glob, a hub dataset repo) and
//! `arrow:PATH` (or a `.arrow` path, or a folder with `state.json` or `dataset_dict.json`:
//! `save_to_disk`'s output), both taking `?split=&image_key=&caption_key=&label_key=`.

use std::path::{Path, PathBuf};

use super::shards::{ShardLocation, ShardSource};
use super::table::{TableFormat, TableSpec};
use crate::error::DataError;

/// Most shard paths one spec may expand to; far above any real dataset, low enough that a
/// typo like `{0..99999999999}` fails at once instead of filling memory.
const MAX_EXPANSION: usize = 10_000_000;

/// A parsed data spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DataSpec {
    /// `synthetic:N`: N procedurally drawn scenes (see `synth`), nothing read from disk.
    Synthetic(u64),
    /// WebDataset shards, one [`ShardSource`] per `::` part, in order; every local one exists.
    Shards(Vec<ShardSource>),
    /// A CSV/TSV file with an image-path column and a caption column.
    Csv(CsvSpec),
    /// A directory of images with a `NAME.txt` caption beside each `NAME.jpg`.
    Folder(PathBuf),
    /// `classes:DIR`: a folder per class (`DIR/<class>/*.jpg`), labelled, for zero-shot
    /// evaluation.
    Classes(PathBuf),
    /// A JSON Lines file, one `{"image": PATH, "caption": TEXT}` object per line.
    Jsonl(JsonlSpec),
    /// `parquet:PATH` or `arrow:PATH`: a Hugging Face dataset (or any table of images),
    /// streamed a row group or record batch at a time (`sources/table.rs`).
    Table(TableSpec),
}

/// What the spec reads, for messages: the file, folder or shard spec as the user wrote it
/// (`synthetic:N`, `data/{0..9}.tar`, `list.csv`), without the options.
impl std::fmt::Display for DataSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DataSpec::Synthetic(n) => write!(f, "synthetic:{n}"),
            DataSpec::Shards(sources) => {
                let specs: Vec<&str> = sources.iter().map(|s| s.spec.as_str()).collect();
                f.write_str(&specs.join("::"))
            }
            DataSpec::Csv(csv) => write!(f, "{}", csv.path.display()),
            DataSpec::Folder(dir) | DataSpec::Classes(dir) => write!(f, "{}", dir.display()),
            DataSpec::Jsonl(jsonl) => write!(f, "{}", jsonl.path.display()),
            DataSpec::Table(table) => f.write_str(&table.path),
        }
    }
}

/// `csv:FILE?img_key=COL&caption_key=COL&sep=tab|comma`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CsvSpec {
    /// The CSV file; image paths in it are relative to its folder.
    pub path: PathBuf,
    /// Column of image paths (open_clip's `--csv-img-key`, default `filepath`).
    pub img_key: String,
    /// Column of captions (open_clip's `--csv-caption-key`, default `title`).
    pub caption_key: String,
    /// Field separator; `None` detects tab or comma from the header line.
    pub separator: Option<u8>,
    /// Column of integer class labels, for zero-shot evaluation (`label_key=COL`); without a
    /// caption column the label's text stands in for the caption.
    pub label_key: Option<String>,
}

/// `jsonl:FILE?img_key=KEY&caption_key=KEY&label_key=KEY`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JsonlSpec {
    /// The JSONL file; image paths in it are relative to its folder.
    pub path: PathBuf,
    /// Key of the image path (default `image`).
    pub img_key: String,
    /// Key of the caption (default `caption`).
    pub caption_key: String,
    /// Key of integer class labels, for zero-shot evaluation (`label_key=KEY`); without a
    /// caption the label's text stands in for it.
    pub label_key: Option<String>,
}

/// open_clip's defaults for `--csv-img-key` and `--csv-caption-key`.
pub const CSV_DEFAULT_IMG_KEY: &str = "filepath";
pub const CSV_DEFAULT_CAPTION_KEY: &str = "title";
/// Default keys of a JSONL object.
pub const JSONL_DEFAULT_IMG_KEY: &str = "image";
pub const JSONL_DEFAULT_CAPTION_KEY: &str = "caption";
/// The CSV column or JSONL key zero-shot evaluation reads class labels from when the spec
/// names none (`label_key=`).
pub const DEFAULT_LABEL_KEY: &str = "label";

impl std::fmt::Display for CsvSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "csv:{}?img_key={}&caption_key={}",
            self.path.display(),
            self.img_key,
            self.caption_key
        )?;
        if let Some(label) = &self.label_key {
            write!(f, "&label_key={label}")?;
        }
        match self.separator {
            Some(b'\t') => f.write_str("&sep=tab"),
            Some(b',') => f.write_str("&sep=comma"),
            Some(other) => write!(f, "&sep={}", other as char),
            None => Ok(()),
        }
    }
}

impl std::fmt::Display for JsonlSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "jsonl:{}?img_key={}&caption_key={}",
            self.path.display(),
            self.img_key,
            self.caption_key
        )?;
        match &self.label_key {
            Some(label) => write!(f, "&label_key={label}"),
            None => Ok(()),
        }
    }
}

impl DataSpec {
    /// Parses `spec` and checks that every shard it names exists (the error names the first
    /// missing path).
    pub fn parse(spec: &str) -> Result<DataSpec, DataError> {
        let spec_err = |message: String| DataError::Spec { spec: spec.to_owned(), message };
        let trimmed = spec.trim();
        if trimmed.is_empty() {
            return Err(spec_err("empty".into()));
        }
        if let Some(n) = trimmed.strip_prefix("synthetic:") {
            let n: u64 = n
                .trim()
                .parse()
                .map_err(|_| spec_err(format!("`{n}` is not a sample count (synthetic:N)")))?;
            if n == 0 {
                return Err(spec_err("synthetic:N needs at least one sample".into()));
            }
            return Ok(DataSpec::Synthetic(n));
        }
        let parts: Vec<&str> = trimmed.split("::").map(str::trim).collect();
        let mut sources = Vec::new();
        for part in &parts {
            if part.is_empty() {
                return Err(spec_err("empty source between `::`".into()));
            }
            if part.starts_with("synthetic:") {
                return Err(spec_err("synthetic:N cannot be joined with shards".into()));
            }
            if let Some(cmd) = part.strip_prefix("pipe:") {
                let cmds = expand_braces(cmd.trim()).map_err(spec_err)?;
                if cmds.iter().any(|c| c.trim().is_empty()) {
                    return Err(spec_err("pipe: needs a command".into()));
                }
                sources.push(ShardSource {
                    spec: (*part).to_owned(),
                    shards: cmds.into_iter().map(ShardLocation::Pipe).collect(),
                });
                continue;
            }
            if let Some(source) = file_source(spec, part)? {
                if parts.len() > 1 {
                    return Err(spec_err(format!(
                        "`{part}` cannot be joined with `::`; only shards can \
                         (`oxclip data pack` writes shards from it)"
                    )));
                }
                return Ok(source);
            }
            sources.push(ShardSource {
                spec: (*part).to_owned(),
                shards: shards_of(spec, part)?.into_iter().map(ShardLocation::File).collect(),
            });
        }
        Ok(DataSpec::Shards(sources))
    }
}

/// A CSV, JSONL, image-folder or table source, or `None` when `source` is something else
/// (shards).
fn file_source(spec: &str, source: &str) -> Result<Option<DataSpec>, DataError> {
    let spec_err = |message: String| DataError::Spec { spec: spec.to_owned(), message };
    if let Some(dir) = source.strip_prefix("classes:") {
        let dir = PathBuf::from(dir);
        if !dir.is_dir() {
            return Err(spec_err(format!("{} is not a directory", dir.display())));
        }
        return Ok(Some(DataSpec::Classes(dir)));
    }
    if let Some(dir) = source.strip_prefix("folder:") {
        let dir = PathBuf::from(dir);
        if !dir.is_dir() {
            return Err(spec_err(format!("{} is not a directory", dir.display())));
        }
        return Ok(Some(DataSpec::Folder(dir)));
    }
    for (prefix, format) in [("parquet:", TableFormat::Parquet), ("arrow:", TableFormat::Arrow)] {
        if let Some(rest) = source.strip_prefix(prefix) {
            return table_source(spec, format, rest).map(Some);
        }
    }
    let (kind, rest) = if let Some(rest) = source.strip_prefix("csv:") {
        ("csv", rest)
    } else if let Some(rest) = source.strip_prefix("jsonl:") {
        ("jsonl", rest)
    } else {
        // A plain path: by extension (a `?options` suffix allowed), or an image directory.
        let file = source.split_once('?').map_or(source, |(f, _)| f);
        let ext = Path::new(file).extension().map(|e| e.to_string_lossy().to_lowercase());
        match ext.as_deref() {
            Some("csv" | "tsv") => ("csv", source),
            Some("jsonl") => ("jsonl", source),
            Some("parquet") => return table_source(spec, TableFormat::Parquet, source).map(Some),
            Some("arrow") => return table_source(spec, TableFormat::Arrow, source).map(Some),
            _ => {
                // Options (`?split=train`) are a table folder's; an image folder takes none.
                let path = Path::new(file);
                if !path.is_dir() || has_tar_files(path) {
                    return Ok(None);
                }
                if file == source && holds_images(path) {
                    return Ok(Some(DataSpec::Folder(path.to_owned())));
                }
                // `save_to_disk`'s folder (a Dataset or a DatasetDict), or a folder of
                // Parquet files (a hub dataset repo).
                if path.join("state.json").is_file() || path.join("dataset_dict.json").is_file() {
                    return table_source(spec, TableFormat::Arrow, source).map(Some);
                }
                if holds_parquet(path) {
                    return table_source(spec, TableFormat::Parquet, source).map(Some);
                }
                return Ok(None);
            }
        }
    };
    let (file, query) = rest.split_once('?').unwrap_or((rest, ""));
    let path = PathBuf::from(file);
    if !path.is_file() {
        return Err(spec_err(format!("no such file: {}", path.display())));
    }
    let (default_img, default_caption) = if kind == "csv" {
        (CSV_DEFAULT_IMG_KEY, CSV_DEFAULT_CAPTION_KEY)
    } else {
        (JSONL_DEFAULT_IMG_KEY, JSONL_DEFAULT_CAPTION_KEY)
    };
    let mut img_key = default_img.to_owned();
    let mut caption_key = default_caption.to_owned();
    let mut separator = None;
    let mut label_key = None;
    for option in query.split('&').filter(|o| !o.is_empty()) {
        let (name, value) = option
            .split_once('=')
            .ok_or_else(|| spec_err(format!("option `{option}` is not NAME=VALUE")))?;
        if value.is_empty() {
            return Err(spec_err(format!("option `{name}` has no value")));
        }
        match (name, kind) {
            ("img_key", _) => img_key = value.to_owned(),
            ("caption_key", _) => caption_key = value.to_owned(),
            ("label_key", _) => label_key = Some(value.to_owned()),
            ("sep", "csv") => {
                separator = Some(match value {
                    "tab" | "\\t" | "\t" => b'\t',
                    "comma" | "," => b',',
                    other => {
                        return Err(spec_err(format!(
                            "sep={other}: use sep=tab or sep=comma (or leave it out to detect)"
                        )))
                    }
                })
            }
            _ => {
                let known = if kind == "csv" {
                    "img_key, caption_key, label_key, sep"
                } else {
                    "img_key, caption_key, label_key"
                };
                return Err(spec_err(format!("unknown {kind} option `{name}` (known: {known})")));
            }
        }
    }
    Ok(Some(if kind == "csv" {
        DataSpec::Csv(CsvSpec { path, img_key, caption_key, separator, label_key })
    } else {
        DataSpec::Jsonl(JsonlSpec { path, img_key, caption_key, label_key })
    }))
}

/// `parquet:` or `arrow:` with `rest` after the prefix; the path must exist (a Parquet glob
/// is matched when the source is opened).
fn table_source(spec: &str, format: TableFormat, rest: &str) -> Result<DataSpec, DataError> {
    let spec_err = |message: String| DataError::Spec { spec: spec.to_owned(), message };
    let table = TableSpec::parse(format, rest).map_err(spec_err)?;
    let globbed = format == TableFormat::Parquet && table.path.contains('*');
    if !globbed && !Path::new(&table.path).exists() {
        return Err(spec_err(format!("no such file or folder: {}", table.path)));
    }
    Ok(DataSpec::Table(table))
}

/// Whether `dir` or a folder below it holds a `.parquet` file.
fn holds_parquet(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|e| {
        let path = e.path();
        match e.file_type() {
            Ok(t) if t.is_dir() => holds_parquet(&path),
            Ok(_) => path.extension().is_some_and(|x| x == "parquet"),
            Err(_) => false,
        }
    })
}

/// Whether `dir` holds `.tar` files directly (then it is a shard directory).
fn has_tar_files(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries.flatten().any(|e| e.path().extension().is_some_and(|x| x == "tar"))
    })
}

/// Whether `dir` or a folder below it holds a file with an image extension.
fn holds_images(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|e| {
        let path = e.path();
        match e.file_type() {
            Ok(t) if t.is_dir() => holds_images(&path),
            Ok(_) => crate::formats::image::is_image_path(&path),
            Err(_) => false,
        }
    })
}

/// The shards of one `::`-separated source.
fn shards_of(spec: &str, source: &str) -> Result<Vec<PathBuf>, DataError> {
    let spec_err = |message: String| DataError::Spec { spec: spec.to_owned(), message };
    if source.contains('{') || source.contains('}') {
        let paths = expand_braces(source).map_err(spec_err)?;
        for p in &paths {
            if !Path::new(p).is_file() {
                return Err(DataError::MissingShard {
                    spec: spec.to_owned(),
                    path: PathBuf::from(p),
                });
            }
        }
        return Ok(paths.into_iter().map(PathBuf::from).collect());
    }
    let path = PathBuf::from(source);
    if path.is_dir() {
        let entries = std::fs::read_dir(&path)
            .map_err(|source| DataError::Read { path: path.clone(), source })?;
        let mut shards: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "tar"))
            .collect();
        shards.sort();
        if shards.is_empty() {
            return Err(spec_err(format!(
                "directory {} holds no .tar shards, no images and no .parquet files (a folder \
                 of .arrow files without save_to_disk's state.json is read as arrow:DIR)",
                path.display()
            )));
        }
        return Ok(shards);
    }
    if !path.exists() {
        return Err(DataError::MissingShard { spec: spec.to_owned(), path });
    }
    if path.extension().is_some_and(|e| e == "tar") {
        return Ok(vec![path]);
    }
    Err(spec_err(format!(
        "{} is not a .tar shard, a directory of shards or images, a brace pattern, a .csv, \
         .tsv, .jsonl, .parquet or .arrow file, or synthetic:N",
        path.display()
    )))
}

/// Bash-style brace expansion as the `braceexpand` package does it for webdataset:
/// `{00000..00012}` (zero-padded to the wider bound when either has a leading zero; an
/// optional `..step`; descending ranges count down) and `{a,b,c}` lists. Several groups
/// expand left to right, the first varying slowest. Nested braces are an error.
pub fn expand_braces(pattern: &str) -> Result<Vec<String>, String> {
    let Some(open) = pattern.find('{') else {
        if pattern.contains('}') {
            return Err("`}` without `{`".into());
        }
        return Ok(vec![pattern.to_owned()]);
    };
    if pattern[..open].contains('}') {
        return Err("`}` without `{`".into());
    }
    let close =
        pattern[open..].find('}').map(|i| i + open).ok_or_else(|| "`{` without `}`".to_string())?;
    let body = &pattern[open + 1..close];
    if body.contains('{') {
        return Err("nested braces are not supported".into());
    }
    let alternatives = if body.contains(',') {
        body.split(',').map(str::to_owned).collect()
    } else if body.contains("..") {
        expand_range(body)?
    } else {
        return Err(format!("`{{{body}}}` is neither a range `{{a..b}}` nor a list `{{a,b}}`"));
    };
    let prefix = &pattern[..open];
    let rest = expand_braces(&pattern[close + 1..])?;
    if alternatives.len().saturating_mul(rest.len()) > MAX_EXPANSION {
        return Err(format!("expands to more than {MAX_EXPANSION} paths"));
    }
    let mut out = Vec::with_capacity(alternatives.len() * rest.len());
    for alt in &alternatives {
        for tail in &rest {
            out.push(format!("{prefix}{alt}{tail}"));
        }
    }
    Ok(out)
}

/// `a..b` or `a..b..step` over integers.
fn expand_range(body: &str) -> Result<Vec<String>, String> {
    let parts: Vec<&str> = body.split("..").collect();
    let bad = || format!("`{{{body}}}` is not an integer range `{{a..b}}`");
    let (lo_s, hi_s, step) = match parts.as_slice() {
        [a, b] => (*a, *b, 1u64),
        [a, b, s] => (*a, *b, s.trim_start_matches('-').parse::<u64>().map_err(|_| bad())?.max(1)),
        _ => return Err(bad()),
    };
    let lo: i64 = lo_s.parse().map_err(|_| bad())?;
    let hi: i64 = hi_s.parse().map_err(|_| bad())?;
    let count = (lo.abs_diff(hi) / step) as usize + 1;
    if count > MAX_EXPANSION {
        return Err(format!("`{{{body}}}` expands to more than {MAX_EXPANSION} paths"));
    }
    let padded = |s: &str| {
        let digits = s.trim_start_matches('-');
        digits.len() > 1 && digits.starts_with('0')
    };
    let width = if padded(lo_s) || padded(hi_s) { lo_s.len().max(hi_s.len()) } else { 0 };
    let step = step as i64;
    let mut out = Vec::with_capacity(count);
    let mut v = lo;
    for _ in 0..count {
        out.push(if v < 0 {
            format!("-{:0>w$}", v.unsigned_abs(), w = width.saturating_sub(1))
        } else {
            format!("{v:0>width$}")
        });
        v = if lo <= hi { v + step } else { v - step };
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn braces_expand_like_braceexpand() {
        assert_eq!(
            expand_braces("d/{00000..00003}.tar").unwrap(),
            ["d/00000.tar", "d/00001.tar", "d/00002.tar", "d/00003.tar"]
        );
        assert_eq!(expand_braces("{8..11}").unwrap(), ["8", "9", "10", "11"]);
        assert_eq!(expand_braces("{09..11}").unwrap(), ["09", "10", "11"]);
        assert_eq!(expand_braces("{3..1}").unwrap(), ["3", "2", "1"]);
        assert_eq!(expand_braces("{0..6..3}").unwrap(), ["0", "3", "6"]);
        assert_eq!(
            expand_braces("{a,b}/{0..1}.tar").unwrap(),
            ["a/0.tar", "a/1.tar", "b/0.tar", "b/1.tar"]
        );
        assert_eq!(expand_braces("x{,y}").unwrap(), ["x", "xy"]);
        assert_eq!(expand_braces("plain.tar").unwrap(), ["plain.tar"]);
        for bad in ["{0..", "0..1}", "{{0..1}}", "{x..y}", "{abc}", "{0..99999999999}"] {
            assert!(expand_braces(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn parse_specs() {
        assert_eq!(DataSpec::parse("synthetic:1000").unwrap(), DataSpec::Synthetic(1000));
        for bad in ["synthetic:", "synthetic:x", "synthetic:0", ""] {
            assert!(DataSpec::parse(bad).is_err(), "{bad}");
        }
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for name in ["00001.tar", "00000.tar", "00002.tar", "notes.txt"] {
            std::fs::write(d.join(name), b"").unwrap();
        }
        let three = vec![d.join("00000.tar"), d.join("00001.tar"), d.join("00002.tar")];
        assert_eq!(shard_paths(d.to_str().unwrap()), std::slice::from_ref(&three));
        let pattern = format!("{}/{{00000..00002}}.tar", d.display());
        assert_eq!(shard_paths(&pattern), [three]);
        let single = d.join("00001.tar");
        assert_eq!(shard_paths(single.to_str().unwrap()), [vec![single.clone()]]);
        let joined = format!("{}::{}", single.display(), d.join("00000.tar").display());
        assert_eq!(shard_paths(&joined), [vec![single], vec![d.join("00000.tar")]]);

        // pipe: commands are brace-expanded, not checked; each `::` part is a source.
        let DataSpec::Shards(sources) =
            DataSpec::parse("pipe:aws s3 cp s3://b/{00..02}.tar - :: pipe:cat x.tar").unwrap()
        else {
            panic!("not shards")
        };
        assert_eq!(sources.len(), 2);
        let expected: Vec<_> =
            (0..3).map(|i| ShardLocation::Pipe(format!("aws s3 cp s3://b/{i:02}.tar -"))).collect();
        assert_eq!(sources[0].shards, expected);
        assert_eq!(sources[1].shards, [ShardLocation::Pipe("cat x.tar".into())]);
        assert!(DataSpec::parse("pipe:").is_err());

        // Missing shards are named.
        let missing = format!("{}/{{00000..00003}}.tar", d.display());
        let err = DataSpec::parse(&missing).unwrap_err().to_string();
        assert!(err.contains("00003.tar"), "{err}");
        let err = DataSpec::parse(d.join("nope.tar").to_str().unwrap()).unwrap_err().to_string();
        assert!(err.contains("nope.tar"), "{err}");
        let err = DataSpec::parse(d.join("notes.txt").to_str().unwrap()).unwrap_err().to_string();
        assert!(err.contains("notes.txt"), "{err}");
        let empty = d.join("empty");
        std::fs::create_dir(&empty).unwrap();
        assert!(DataSpec::parse(empty.to_str().unwrap()).is_err());
    }

    #[test]
    fn parse_file_sources() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for name in ["list.csv", "list.TSV", "data.jsonl", "other.txt"] {
            std::fs::write(d.join(name), b"").unwrap();
        }
        let csv = |file: &str, img: &str, caption: &str, separator| {
            DataSpec::Csv(CsvSpec {
                path: d.join(file),
                img_key: img.into(),
                caption_key: caption.into(),
                separator,
                label_key: None,
            })
        };
        let at = |s: &str| format!("{}/{s}", d.display());
        assert_eq!(
            DataSpec::parse(&at("list.csv")).unwrap(),
            csv("list.csv", "filepath", "title", None)
        );
        assert_eq!(
            DataSpec::parse(&at("list.TSV?caption_key=text&sep=tab")).unwrap(),
            csv("list.TSV", "filepath", "text", Some(b'\t'))
        );
        // Any name, with the prefix.
        assert_eq!(
            DataSpec::parse(&format!("csv:{}?img_key=path&sep=comma", at("other.txt"))).unwrap(),
            csv("other.txt", "path", "title", Some(b','))
        );
        assert_eq!(
            DataSpec::parse(&at("data.jsonl")).unwrap(),
            DataSpec::Jsonl(JsonlSpec {
                path: d.join("data.jsonl"),
                img_key: "image".into(),
                caption_key: "caption".into(),
                label_key: None,
            })
        );
        for (bad, expect) in [
            (at("missing.csv"), "missing.csv"),
            (format!("jsonl:{}", at("gone")), "gone"),
            (at("list.csv?img_key"), "NAME=VALUE"),
            (at("list.csv?img_key="), "no value"),
            (at("list.csv?sep=semicolon"), "sep=tab"),
            (at("list.csv?color=red"), "unknown csv option `color`"),
            (format!("{}::{}", at("list.csv"), at("list.csv")), "cannot be joined"),
            (format!("folder:{}", at("other.txt")), "not a directory"),
        ] {
            let err = DataSpec::parse(&bad).unwrap_err().to_string();
            assert!(err.contains(expect), "{bad}: {err}");
        }
        // A directory with images but also shards is a shard directory.
        std::fs::write(d.join("x.jpg"), b"").unwrap();
        assert_eq!(DataSpec::parse(&at("")).unwrap(), DataSpec::Folder(d.join("")));
        std::fs::write(d.join("00000.tar"), b"").unwrap();
        assert_eq!(shard_paths(&at("")), [vec![d.join("00000.tar")]]);
    }

    #[test]
    fn parse_table_sources() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hf_datasets");
        let at = |s: &str| format!("{}/{s}", fixtures.display());
        let table = |spec: &str| match DataSpec::parse(spec).unwrap() {
            DataSpec::Table(t) => t,
            other => panic!("{spec} parsed as {other:?}"),
        };
        // By prefix, by extension, and folders by what they hold.
        let t = table(&format!("parquet:{}", at("coco/coco.parquet?caption_key=captions")));
        assert_eq!((t.format, t.caption_key.as_deref()), (TableFormat::Parquet, Some("captions")));
        assert_eq!(table(&at("coco/coco.parquet")).format, TableFormat::Parquet);
        assert_eq!(table(&at("plain/plain.arrow")).format, TableFormat::Arrow);
        assert_eq!(table(&at("coco_arrow")).format, TableFormat::Arrow);
        let hub = table(&at("coco_hub?split=test"));
        assert_eq!((hub.format, hub.split.as_deref()), (TableFormat::Parquet, Some("test")));
        assert_eq!(hub.path, at("coco_hub"));
        assert_eq!(
            table(&at("coco_hub/data/train-*.parquet")).path,
            at("coco_hub/data/train-*.parquet")
        );
        assert_eq!(DataSpec::parse(&at("coco")).unwrap().to_string(), at("coco"));
        for (bad, expect) in [
            (format!("parquet:{}", at("gone.parquet")), "no such file or folder"),
            (format!("arrow:{}", at("coco_arrow?colour=red")), "unknown arrow option `colour`"),
            (
                format!("{}::{}", at("coco/coco.parquet"), at("coco/coco.parquet")),
                "cannot be joined",
            ),
        ] {
            let err = DataSpec::parse(&bad).unwrap_err().to_string();
            assert!(err.contains(expect), "{bad}: {err}");
        }
    }

    /// The local shard paths of each `::` source of `spec`.
    fn shard_paths(spec: &str) -> Vec<Vec<PathBuf>> {
        let DataSpec::Shards(sources) = DataSpec::parse(spec).unwrap() else {
            panic!("{spec} is not shards")
        };
        sources
            .into_iter()
            .map(|s| {
                s.shards
                    .into_iter()
                    .map(|l| match l {
                        ShardLocation::File(p) => p,
                        ShardLocation::Pipe(c) => PathBuf::from(c),
                        ShardLocation::Table(part) => part.path().to_owned(),
                    })
                    .collect()
            })
            .collect()
    }
}
