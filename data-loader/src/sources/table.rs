//! Hugging Face datasets, and other tables of images, as a data source: `parquet:PATH` (a
//! file, a folder, a glob, or a hub dataset repo's folder, `data/train-00000-of-00004.parquet`)
//! and `arrow:PATH` (`save_to_disk`'s folder: `data-0000N-of-0000M.arrow` Arrow IPC streams,
//! `dataset_info.json`, `state.json`; or one `.arrow` file). The files themselves are read by
//! `formats::table`; this module decides what the columns mean and turns rows into the
//! [`RawSample`]s every other source yields.
//!
//! A table is streamed the way WebDataset shards are: each part of each file (a Parquet row
//! group, an Arrow record batch) is one [`TablePart`], a unit the stream plan deals to ranks
//! and workers, shuffles and resumes (`plan/stream.rs`), read whole by a loader thread. Part
//! counts come from the files' metadata, so nothing is read to count them.
//!
//! Columns (`?image_key=&caption_key=&label_key=`, each with a default):
//!
//! - The image (`image`, or the one column `datasets` marks as an `Image` feature): the
//!   `Image` feature's struct `{bytes, path}` (the bytes when there are any, else the file at
//!   `path`, relative to the table file's folder), raw binary (the encoded image), or a
//!   string (a path, relative likewise).
//! - The caption (the first of `text`, `caption`, `captions`): a string, or a list of strings
//!   (COCO's five captions per image), from which one is drawn per sample per epoch from the
//!   run's seed ([`CaptionDraw`]). Without a caption column, a labelled row's class name (or
//!   its label's text) stands in, as for class folders.
//! - The label (`label`, when it is an integer column): a class index. Its names come from
//!   the `ClassLabel` feature `datasets` records in the schema metadata (`huggingface`, or
//!   `dataset_info.json` beside Arrow files), which makes the set evaluable zero-shot with no
//!   class names file ([`TableSet::class_names`]).
//!
//! A row that cannot be used is a skip with its reason, as in shards: a null or missing
//! image (`missing_image`), bytes that are no image (`undecodable_image`, found on decode), a
//! null caption or an empty list (`missing_caption`), a label that is null, negative or
//! outside the class list (`bad_label`; `datasets` writes -1 for "no label"). A file that
//! cannot be opened is skipped whole (`unreadable_shard`); a file whose columns differ from
//! the first one's is an error, since it would be read differently.

use std::collections::BTreeSet;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::{
    Int16Type, Int32Type, Int64Type, Int8Type, UInt16Type, UInt32Type, UInt64Type, UInt8Type,
};
use arrow_array::Array;
use arrow_schema::DataType;

use crate::error::DataError;
use crate::formats::image::IMAGE_EXTENSIONS;
use crate::formats::table::TableFile;
pub use crate::formats::table::TableFormat;
use crate::formats::webdataset::RawSample;
use crate::seed::mix;
use crate::skip::{SampleError, SkipCounts, SkipReason};

/// The image column read when the spec names none (the `Image` feature's usual name).
pub const DEFAULT_IMAGE_KEY: &str = "image";
/// Caption columns looked for, in order, when the spec names none.
pub const DEFAULT_CAPTION_KEYS: [&str; 3] = ["text", "caption", "captions"];
/// The label column read, when it exists and holds integers, unless the spec names one.
pub const DEFAULT_LABEL_KEY: &str = "label";

/// Tags the random stream of caption draws, apart from every other draw from the seed.
const CAPTION_DRAW: u64 = 0x0063_6170_7469_6f6e; // "caption"

/// `parquet:PATH` or `arrow:PATH`, with its options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableSpec {
    pub format: TableFormat,
    /// A file, a folder, or (Parquet) a glob (`*` in any part of the path), as written.
    pub path: String,
    /// Which split of a folder holding several (`train` for `data/train-*.parquet`, or a
    /// `save_to_disk`'d `DatasetDict`'s `train/`).
    pub split: Option<String>,
    pub image_key: Option<String>,
    pub caption_key: Option<String>,
    pub label_key: Option<String>,
}

impl TableSpec {
    /// `PATH?option=value&...` after the `parquet:` or `arrow:` prefix. The error is the
    /// message alone, for the spec's own error.
    pub fn parse(format: TableFormat, rest: &str) -> Result<Self, String> {
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        if path.trim().is_empty() {
            return Err(format!("{}: needs a path", prefix(format)));
        }
        let mut spec = TableSpec {
            format,
            path: path.to_owned(),
            split: None,
            image_key: None,
            caption_key: None,
            label_key: None,
        };
        for option in query.split('&').filter(|o| !o.is_empty()) {
            let (name, value) = option
                .split_once('=')
                .ok_or_else(|| format!("option `{option}` is not NAME=VALUE"))?;
            if value.is_empty() {
                return Err(format!("option `{name}` has no value"));
            }
            let slot = match name {
                "split" => &mut spec.split,
                // `img_key` as CSV and JSONL sources spell it.
                "image_key" | "img_key" => &mut spec.image_key,
                "caption_key" => &mut spec.caption_key,
                "label_key" => &mut spec.label_key,
                _ => {
                    return Err(format!(
                        "unknown {} option `{name}` (known: split, image_key, caption_key, \
                         label_key)",
                        prefix(format)
                    ))
                }
            };
            *slot = Some(value.to_owned());
        }
        Ok(spec)
    }
}

fn prefix(format: TableFormat) -> &'static str {
    match format {
        TableFormat::Parquet => "parquet",
        TableFormat::Arrow => "arrow",
    }
}

/// The spec as written, options in a fixed order: it parses back to itself.
impl std::fmt::Display for TableSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", prefix(self.format), self.path)?;
        let options = [
            ("split", &self.split),
            ("image_key", &self.image_key),
            ("caption_key", &self.caption_key),
            ("label_key", &self.label_key),
        ];
        let mut sep = '?';
        for (name, value) in options {
            if let Some(value) = value {
                write!(f, "{sep}{name}={value}")?;
                sep = '&';
            }
        }
        Ok(())
    }
}

/// Which caption of a row with several is read: one per sample per epoch, drawn from the
/// run's seed, the epoch and the row's place in the set (never from who reads it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CaptionDraw {
    pub seed: u64,
    pub epoch: u64,
}

impl CaptionDraw {
    /// Which of `n` captions row `row` (its index in the whole set) reads.
    fn pick(self, row: u64, n: usize) -> usize {
        (mix(&[self.seed, self.epoch, row, CAPTION_DRAW]) % n as u64) as usize
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum ImageKind {
    /// `{bytes, path}`, the `Image` feature.
    Struct,
    /// The encoded image.
    Bytes,
    /// A path to the image file.
    Path,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum CaptionKind {
    Text,
    List,
}

/// What each column of a table means; the same for every file of a set.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Columns {
    image: String,
    image_kind: ImageKind,
    caption: Option<(String, CaptionKind)>,
    label: Option<String>,
    /// The `ClassLabel` names: the caption of a row with no caption column.
    class_names: Option<Vec<String>>,
    /// Labels must lie below this, when the class list is known.
    classes: Option<u64>,
}

impl Columns {
    fn names(&self) -> Vec<&str> {
        let mut names = vec![self.image.as_str()];
        names.extend(self.caption.as_ref().map(|(c, _)| c.as_str()));
        names.extend(self.label.as_deref());
        names
    }
}

/// One file of a set, opened.
struct OpenTable {
    file: TableFile,
    format: TableFormat,
    columns: Arc<Columns>,
    /// Relative image paths are joined to this: the file's folder.
    base: PathBuf,
    /// The file as keys name it: its path below the set's folder, without the extension.
    name: String,
    /// The row of the file each part starts at.
    part_starts: Vec<u64>,
}

/// One part of one table file (a Parquet row group, an Arrow record batch): the unit the
/// stream plan deals out, as a shard is.
#[derive(Clone)]
pub struct TablePart {
    table: Arc<OpenTable>,
    part: usize,
    /// The set-wide index of the part's first row (rows numbered across all files in order).
    first_row: u64,
}

impl TablePart {
    /// Rows in the part.
    pub fn rows(&self) -> u64 {
        self.table.file.part_rows()[self.part]
    }

    /// The table file.
    pub fn path(&self) -> &Path {
        self.table.file.path()
    }

    /// `FILE, row group N` (Parquet) or `FILE, record batch N` (Arrow), for messages.
    pub fn describe(&self) -> String {
        let unit = match self.table.format {
            TableFormat::Parquet => "row group",
            TableFormat::Arrow => "record batch",
        };
        format!("{}, {unit} {}", self.path().display(), self.part)
    }

    /// Streams the part's rows to `f`, as [`RawSample`]s or why a row cannot be used, until
    /// the part ends or `f` breaks. The error (nothing was passed to `f`) says why the part
    /// cannot be read at all.
    pub fn for_each_row(
        &self,
        draw: CaptionDraw,
        mut f: impl FnMut(Result<RawSample, SampleError>) -> ControlFlow<()>,
    ) -> Result<(), String> {
        let table = &self.table;
        let columns = &table.columns;
        let batches = table.file.read_part(self.part, &columns.names())?;
        let mut done = 0u64;
        for batch in &batches {
            let column = |name: &str| {
                batch.column_by_name(name).ok_or_else(|| format!("no column `{name}`"))
            };
            let image = column(&columns.image)?;
            let caption = match &columns.caption {
                Some((name, kind)) => Some((column(name)?, *kind)),
                None => None,
            };
            let label = columns.label.as_deref().map(column).transpose()?;
            for r in 0..batch.num_rows() {
                let row = Row {
                    part: self,
                    in_file: table.part_starts[self.part] + done,
                    in_set: self.first_row + done,
                    index: r,
                };
                done += 1;
                let item = row.sample(image.as_ref(), caption, label.map(AsRef::as_ref), draw);
                if f(item).is_break() {
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}

// Parts compare by their file, number, place in the set and how its columns are read (the
// open file and its metadata hold no order of their own).
impl PartialEq for TablePart {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}
impl Eq for TablePart {}
impl std::hash::Hash for TablePart {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.key().hash(state);
    }
}
impl PartialOrd for TablePart {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for TablePart {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key().cmp(&other.key())
    }
}
impl TablePart {
    fn key(&self) -> (&Path, usize, u64, &Columns) {
        (self.path(), self.part, self.first_row, &self.table.columns)
    }
}
impl std::fmt::Debug for TablePart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

/// One row being turned into a sample.
struct Row<'a> {
    part: &'a TablePart,
    /// Its row number in its file, and in the whole set.
    in_file: u64,
    in_set: u64,
    /// Its index in the record batch.
    index: usize,
}

impl Row<'_> {
    fn sample(
        &self,
        image: &dyn Array,
        caption: Option<(&std::sync::Arc<dyn Array>, CaptionKind)>,
        label: Option<&dyn Array>,
        draw: CaptionDraw,
    ) -> Result<RawSample, SampleError> {
        let table = &self.part.table;
        let columns = &table.columns;
        let r = self.index;
        let key = format!("{}/{}", table.name, self.in_file);
        let fail = |reason, message: String| SampleError {
            reason,
            shard: PathBuf::from(self.part.describe()),
            key: Some(key.clone()),
            message,
        };
        let (bytes, path) = match columns.image_kind {
            ImageKind::Struct if image.is_null(r) => (None, None),
            ImageKind::Struct => {
                let image = image.as_struct();
                let bytes = image.column_by_name("bytes").and_then(|b| bytes_at(b.as_ref(), r));
                let path = image.column_by_name("path").and_then(|p| str_at(p.as_ref(), r));
                (bytes.filter(|b| !b.is_empty()), path.filter(|p| !p.trim().is_empty()))
            }
            ImageKind::Bytes => (bytes_at(image, r).filter(|b| !b.is_empty()), None),
            ImageKind::Path => (None, str_at(image, r).filter(|p| !p.trim().is_empty())),
        };
        let image = match (bytes, path) {
            (Some(bytes), _) => bytes.to_vec(),
            (None, Some(path)) => {
                let file = table.base.join(path.trim());
                std::fs::read(&file).map_err(|e| {
                    fail(SkipReason::MissingImage, format!("image file {}: {e}", file.display()))
                })?
            }
            (None, None) => {
                return Err(fail(SkipReason::MissingImage, format!("no `{}`", columns.image)))
            }
        };
        let label = match label {
            None => None,
            Some(column) => match label_at(column, r) {
                Some(l) if l >= 0 && columns.classes.is_none_or(|n| (l as u64) < n) => Some(l),
                found => {
                    let found = found.map_or_else(|| "none".to_owned(), |l| l.to_string());
                    let classes = columns
                        .classes
                        .map(|n| format!(" (the class list has {n}: 0 to {})", n - 1))
                        .unwrap_or_default();
                    return Err(fail(
                        SkipReason::BadLabel,
                        format!("label {found} is not a class index{classes}"),
                    ));
                }
            },
        };
        let caption = match caption {
            Some((column, CaptionKind::Text)) => match str_at(column.as_ref(), r) {
                Some(text) => Some(text.to_owned()),
                None => return Err(fail(SkipReason::MissingCaption, String::new())),
            },
            Some((column, CaptionKind::List)) => {
                let all = strings_at(column.as_ref(), r);
                if all.is_empty() {
                    return Err(fail(SkipReason::MissingCaption, "no caption in the list".into()));
                }
                let usable: Vec<&str> = all.into_iter().filter(|c| !c.trim().is_empty()).collect();
                if usable.is_empty() {
                    return Err(fail(SkipReason::EmptyCaption, String::new()));
                }
                Some(usable[draw.pick(self.in_set, usable.len())].to_owned())
            }
            // A label-only row: its class name, as a class folder's name is its caption.
            None => {
                let names = columns.class_names.as_ref();
                label.and_then(|l| names.and_then(|n| n.get(l as usize)).cloned())
            }
        };
        let image_ext = path
            .and_then(|p| Path::new(p).extension())
            .map(|e| e.to_string_lossy().to_lowercase())
            .filter(|e| IMAGE_EXTENSIONS.contains(&e.as_str()))
            .unwrap_or_else(|| "jpg".to_owned());
        let file_name = table.file.path().file_name().unwrap_or_default().to_string_lossy();
        Ok(RawSample {
            key,
            image,
            image_ext,
            caption,
            label,
            source: Some(match path {
                Some(path) => path.to_owned(),
                None => format!("{file_name}, row {}", self.in_file),
            }),
        })
    }
}

/// The bytes at `i` of a binary column, `None` when null (or not binary).
fn bytes_at(a: &dyn Array, i: usize) -> Option<&[u8]> {
    if a.is_null(i) {
        return None;
    }
    match a.data_type() {
        DataType::Binary => Some(a.as_binary::<i32>().value(i)),
        DataType::LargeBinary => Some(a.as_binary::<i64>().value(i)),
        DataType::BinaryView => Some(a.as_binary_view().value(i)),
        DataType::FixedSizeBinary(_) => Some(a.as_fixed_size_binary().value(i)),
        _ => None,
    }
}

/// The string at `i` of a string column, `None` when null (or not a string).
fn str_at(a: &dyn Array, i: usize) -> Option<&str> {
    if a.is_null(i) {
        return None;
    }
    match a.data_type() {
        DataType::Utf8 => Some(a.as_string::<i32>().value(i)),
        DataType::LargeUtf8 => Some(a.as_string::<i64>().value(i)),
        DataType::Utf8View => Some(a.as_string_view().value(i)),
        _ => None,
    }
}

/// The non-null strings of the list at `i`; empty when the list is null.
fn strings_at(a: &dyn Array, i: usize) -> Vec<&str> {
    if a.is_null(i) {
        return Vec::new();
    }
    let (values, range) = match a.data_type() {
        DataType::List(_) => {
            let list = a.as_list::<i32>();
            let offsets = list.value_offsets();
            (list.values(), offsets[i] as usize..offsets[i + 1] as usize)
        }
        DataType::LargeList(_) => {
            let list = a.as_list::<i64>();
            let offsets = list.value_offsets();
            (list.values(), offsets[i] as usize..offsets[i + 1] as usize)
        }
        DataType::FixedSizeList(_, _) => {
            let list = a.as_fixed_size_list();
            let start = list.value_offset(i) as usize;
            (list.values(), start..start + list.value_length() as usize)
        }
        _ => return Vec::new(),
    };
    range.filter_map(|j| str_at(values.as_ref(), j)).collect()
}

/// The integer at `i` of an integer column; `None` when null, or beyond `i64`.
fn label_at(a: &dyn Array, i: usize) -> Option<i64> {
    if a.is_null(i) {
        return None;
    }
    Some(match a.data_type() {
        DataType::Int8 => i64::from(a.as_primitive::<Int8Type>().value(i)),
        DataType::Int16 => i64::from(a.as_primitive::<Int16Type>().value(i)),
        DataType::Int32 => i64::from(a.as_primitive::<Int32Type>().value(i)),
        DataType::Int64 => a.as_primitive::<Int64Type>().value(i),
        DataType::UInt8 => i64::from(a.as_primitive::<UInt8Type>().value(i)),
        DataType::UInt16 => i64::from(a.as_primitive::<UInt16Type>().value(i)),
        DataType::UInt32 => i64::from(a.as_primitive::<UInt32Type>().value(i)),
        DataType::UInt64 => i64::try_from(a.as_primitive::<UInt64Type>().value(i)).ok()?,
        _ => return None,
    })
}

fn is_binary(t: &DataType) -> bool {
    matches!(
        t,
        DataType::Binary
            | DataType::LargeBinary
            | DataType::BinaryView
            | DataType::FixedSizeBinary(_)
    )
}

fn is_text(t: &DataType) -> bool {
    matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View)
}

fn image_kind(t: &DataType) -> Option<ImageKind> {
    if is_binary(t) {
        return Some(ImageKind::Bytes);
    }
    if is_text(t) {
        return Some(ImageKind::Path);
    }
    let DataType::Struct(fields) = t else { return None };
    let bytes = fields.find("bytes").map(|(_, f)| is_binary(f.data_type()));
    let path = fields.find("path").map(|(_, f)| is_text(f.data_type()));
    match (bytes, path) {
        (Some(false), _) | (_, Some(false)) | (None, None) => None,
        _ => Some(ImageKind::Struct),
    }
}

fn caption_kind(t: &DataType) -> Option<CaptionKind> {
    match t {
        t if is_text(t) => Some(CaptionKind::Text),
        DataType::List(f) | DataType::LargeList(f) | DataType::FixedSizeList(f, _)
            if is_text(f.data_type()) =>
        {
            Some(CaptionKind::List)
        }
        _ => None,
    }
}

/// A table spec, opened: its parts in order, with what they hold.
pub struct TableSet {
    pub parts: Vec<TablePart>,
    pub labels: Labels,
    /// Files that could not be opened (`unreadable_shard`), skipped whole.
    pub skipped: SkipCounts,
}

/// What a table says of its class labels.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Labels {
    /// The label column read, if any.
    pub column: Option<String>,
    /// Its class names, when it is a `ClassLabel` (label i is the i-th name).
    pub class_names: Option<Vec<String>>,
}

impl TableSet {
    /// Rows in all parts.
    pub fn rows(&self) -> u64 {
        self.parts.iter().map(TablePart::rows).sum()
    }
}

/// Opens every file `spec` names and decides what its columns mean (see the module docs).
/// Files that cannot be opened are skipped and counted; a set left with none is
/// [`DataError::NoUsableSample`].
/// `classes` is the length of a class names file given beside the spec (zero-shot
/// evaluation): labels must lie below it, and a `ClassLabel` naming another number of
/// classes is an error.
pub fn open(spec: &TableSpec, classes: Option<usize>) -> Result<TableSet, DataError> {
    let files = list_files(spec)?;
    let root = common_dir(&files);
    let mut skipped = SkipCounts::new();
    let mut first: Option<(PathBuf, Arc<Columns>)> = None;
    let mut parts = Vec::new();
    let mut next_row = 0u64;
    for path in files {
        let file = match TableFile::open(&path, spec.format) {
            Ok(file) => file,
            Err(message) => {
                tracing::warn!("skipping {}: {message}", path.display());
                skipped.add(SkipReason::UnreadableShard);
                continue;
            }
        };
        let features = file.hf_features().or_else(|| dataset_info_features(&path));
        let columns = choose_columns(spec, &file, features.as_ref(), classes)
            .map_err(|message| DataError::Table { path: path.clone(), message })?;
        if let Some(codec) = file.unsupported_compression(&columns.names()) {
            return Err(DataError::Table {
                path,
                message: format!(
                    "it is compressed with {codec}, which oxclip does not read (snappy, zstd \
                     or none are read); write it again with one of those, e.g. pyarrow's \
                     pq.write_table(table, path, compression=\"zstd\")"
                ),
            });
        }
        let columns = match &first {
            None => {
                let columns = Arc::new(columns);
                first = Some((path.clone(), Arc::clone(&columns)));
                columns
            }
            Some((first_path, first_columns)) if **first_columns != columns => {
                return Err(DataError::Table {
                    path: path.clone(),
                    message: format!(
                        "its columns are read as {} but those of {} as {}: every file of one \
                         source must hold the same columns (name a file or glob of one kind)",
                        describe_columns(&columns),
                        first_path.display(),
                        describe_columns(first_columns)
                    ),
                });
            }
            Some((_, first_columns)) => Arc::clone(first_columns),
        };
        let mut part_starts = Vec::with_capacity(file.part_rows().len());
        let mut row = 0u64;
        for rows in file.part_rows() {
            part_starts.push(row);
            row += rows;
        }
        let name = path.strip_prefix(&root).unwrap_or(&path).with_extension("");
        let table = Arc::new(OpenTable {
            base: path.parent().map_or_else(PathBuf::new, Path::to_path_buf),
            name: name.to_string_lossy().into_owned(),
            part_starts,
            columns,
            file,
            format: spec.format,
        });
        for part in 0..table.file.part_rows().len() {
            let part = TablePart { table: Arc::clone(&table), part, first_row: next_row };
            next_row += part.rows();
            parts.push(part);
        }
    }
    if first.is_none() {
        return Err(DataError::NoUsableSample { what: spec.to_string(), skipped });
    }
    let labels = first
        .map(|(_, c)| Labels { column: c.label.clone(), class_names: c.class_names.clone() })
        .unwrap_or_default();
    Ok(TableSet { parts, labels, skipped })
}

/// `image `image` (Image struct), caption `captions` (lists of strings), label `label`
/// (3 classes)`.
fn describe_columns(c: &Columns) -> String {
    let mut text = format!(
        "image `{}` ({})",
        c.image,
        match c.image_kind {
            ImageKind::Struct => "Image struct",
            ImageKind::Bytes => "binary",
            ImageKind::Path => "path string",
        }
    );
    match &c.caption {
        Some((name, CaptionKind::Text)) => text.push_str(&format!(", caption `{name}` (string)")),
        Some((name, CaptionKind::List)) => {
            text.push_str(&format!(", caption `{name}` (lists of strings)"))
        }
        None => text.push_str(", no caption"),
    }
    if let Some(label) = &c.label {
        text.push_str(&format!(", label `{label}`"));
        match &c.class_names {
            Some(names) => text.push_str(&format!(" ({} classes named)", names.len())),
            None => text.push_str(" (no class names)"),
        }
    }
    text
}

/// The columns of `file` the spec reads, checked (see the module docs).
fn choose_columns(
    spec: &TableSpec,
    file: &TableFile,
    features: Option<&serde_json::Value>,
    classes: Option<usize>,
) -> Result<Columns, String> {
    let schema = file.schema();
    let fields: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    let listing = || {
        let shown: Vec<String> = schema
            .fields()
            .iter()
            .take(12)
            .map(|f| format!("`{}` ({})", f.name(), f.data_type()))
            .collect();
        let more = fields.len().saturating_sub(12);
        format!(
            "{}{}",
            shown.join(", "),
            if more > 0 { format!(" and {more} more") } else { String::new() }
        )
    };
    let feature_type = |name: &str| {
        features.and_then(|f| f.get(name)).and_then(|f| f.get("_type")).and_then(|t| t.as_str())
    };
    let field_type = |name: &str| schema.field_with_name(name).ok().map(|f| f.data_type());
    let option = |key: &str| format!("{}:{}?{key}=COLUMN", prefix(spec.format), spec.path);

    // The image.
    let image = match &spec.image_key {
        Some(key) => key.clone(),
        None if fields.contains(&DEFAULT_IMAGE_KEY) => DEFAULT_IMAGE_KEY.to_owned(),
        None => {
            let marked: Vec<&str> =
                fields.iter().copied().filter(|f| feature_type(f) == Some("Image")).collect();
            match marked.as_slice() {
                [one] => (*one).to_owned(),
                _ => {
                    return Err(format!(
                        "no image column `{DEFAULT_IMAGE_KEY}`; its columns are {}. Name yours \
                         with {}",
                        listing(),
                        option("image_key")
                    ))
                }
            }
        }
    };
    let image_type = field_type(&image)
        .ok_or_else(|| format!("no image column `{image}`; its columns are {}", listing()))?;
    let image_kind = image_kind(image_type).ok_or_else(|| {
        format!(
            "column `{image}` is {image_type}, not an image: the Image feature's struct {{bytes, \
             path}}, binary (the encoded image) or a string (a path to it) is read"
        )
    })?;

    // The label, and its class names.
    let label = match &spec.label_key {
        Some(key) => {
            let t = field_type(key)
                .ok_or_else(|| format!("no label column `{key}`; its columns are {}", listing()))?;
            if !t.is_integer() {
                return Err(format!(
                    "label column `{key}` is {t}: labels are class indices (integers)"
                ));
            }
            Some(key.clone())
        }
        None => field_type(DEFAULT_LABEL_KEY)
            .filter(|t| t.is_integer())
            .map(|_| DEFAULT_LABEL_KEY.to_owned()),
    };
    let class_names = match &label {
        Some(label) if feature_type(label) == Some("ClassLabel") => {
            let names = features
                .and_then(|f| f.get(label))
                .and_then(|f| f.get("names"))
                .and_then(|n| n.as_array())
                .map(|n| {
                    n.iter().map(|v| v.as_str().map(str::to_owned)).collect::<Option<Vec<_>>>()
                });
            match names {
                Some(Some(names)) if !names.is_empty() => Some(names),
                _ => {
                    return Err(format!(
                        "the ClassLabel feature of `{label}` in the `huggingface` metadata has \
                         no list of names"
                    ))
                }
            }
        }
        _ => None,
    };
    if let (Some(names), Some(n)) = (&class_names, classes) {
        if names.len() != n {
            return Err(format!(
                "the ClassLabel of `{}` names {} classes but the class names given name {n}; \
                 leave the class names file out to use the ClassLabel's names",
                label.as_deref().unwrap_or_default(),
                names.len()
            ));
        }
    }

    // The caption.
    let caption = match &spec.caption_key {
        Some(key) => {
            let t = field_type(key).ok_or_else(|| {
                format!("no caption column `{key}`; its columns are {}", listing())
            })?;
            let kind = caption_kind(t).ok_or_else(|| {
                format!("caption column `{key}` is {t}: a string or a list of strings is read")
            })?;
            Some((key.clone(), kind))
        }
        None => DEFAULT_CAPTION_KEYS
            .iter()
            .find_map(|key| field_type(key).and_then(caption_kind).map(|k| ((*key).to_owned(), k))),
    };
    if caption.is_none() && label.is_none() {
        return Err(format!(
            "no caption column (looked for {}) and no label column `{DEFAULT_LABEL_KEY}`; its \
             columns are {}. Name yours with {}",
            DEFAULT_CAPTION_KEYS.map(|k| format!("`{k}`")).join(", "),
            listing(),
            option("caption_key")
        ));
    }
    let classes = class_names.as_ref().map(Vec::len).or(classes).map(|n| n as u64);
    Ok(Columns { image, image_kind, caption, label, class_names, classes })
}

/// The features of `dataset_info.json` beside an Arrow file, for files written without the
/// `huggingface` schema metadata.
fn dataset_info_features(file: &Path) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(file.parent()?.join("dataset_info.json")).ok()?;
    let info: serde_json::Value = serde_json::from_str(&text).ok()?;
    info.get("features").cloned()
}

/// The deepest folder holding every file (keys name files below it).
fn common_dir(files: &[PathBuf]) -> PathBuf {
    let mut common = files.first().and_then(|f| f.parent()).map(Path::to_path_buf);
    for file in files.iter().skip(1) {
        while let Some(dir) = &common {
            if file.starts_with(dir) {
                break;
            }
            common = dir.parent().map(Path::to_path_buf);
        }
    }
    common.unwrap_or_default()
}

/// The files a spec names, in order (see [`TableSpec::path`] and [`TableSpec::split`]).
fn list_files(spec: &TableSpec) -> Result<Vec<PathBuf>, DataError> {
    let err = |message: String| DataError::Spec { spec: spec.to_string(), message };
    let path = Path::new(&spec.path);
    match spec.format {
        TableFormat::Parquet => {
            let globbed = has_wildcard(&spec.path);
            let files = if globbed {
                glob(&spec.path).map_err(|e| err(e.to_string()))?
            } else if path.is_dir() {
                let mut files = Vec::new();
                walk(path, &mut |p| {
                    if p.extension().is_some_and(|e| e == "parquet") {
                        files.push(p.to_owned());
                    }
                })
                .map_err(|source| DataError::Read { path: path.to_owned(), source })?;
                files.sort();
                files
            } else if path.is_file() {
                return Ok(vec![path.to_owned()]);
            } else {
                return Err(err(format!("no such file or folder: {}", path.display())));
            };
            if files.is_empty() {
                return Err(err(if globbed {
                    "matches no file".to_owned()
                } else {
                    format!("{} holds no .parquet file", path.display())
                }));
            }
            let root = if globbed { common_dir(&files) } else { path.to_owned() };
            choose_split(spec, &root, files).map_err(err)
        }
        TableFormat::Arrow => {
            if path.is_file() {
                return Ok(vec![path.to_owned()]);
            }
            if !path.is_dir() {
                return Err(err(format!("no such file or folder: {}", path.display())));
            }
            let dir = arrow_split_dir(spec, path).map_err(err)?;
            let state = dir.join("state.json");
            if let Ok(text) = std::fs::read_to_string(&state) {
                // `save_to_disk`'s own list of its files, in order.
                let value: serde_json::Value = serde_json::from_str(&text)
                    .map_err(|source| DataError::Json { path: state.clone(), source })?;
                let names = value
                    .get("_data_files")
                    .and_then(|f| f.as_array())
                    .map(|files| {
                        files
                            .iter()
                            .map(|f| f.get("filename").and_then(|n| n.as_str()))
                            .collect::<Option<Vec<&str>>>()
                    })
                    .and_then(|names| names)
                    .ok_or_else(|| {
                        err(format!("{} has no `_data_files` list of file names", state.display()))
                    })?;
                let files: Vec<PathBuf> = names.into_iter().map(|n| dir.join(n)).collect();
                if let Some(missing) = files.iter().find(|f| !f.is_file()) {
                    return Err(err(format!(
                        "{} lists {}, which does not exist",
                        state.display(),
                        missing.display()
                    )));
                }
                if files.is_empty() {
                    return Err(err(format!("{} lists no file", state.display())));
                }
                return Ok(files);
            }
            let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
                .map_err(|source| DataError::Read { path: dir.clone(), source })?
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "arrow"))
                .collect();
            files.sort();
            if files.is_empty() {
                return Err(err(format!("{} holds no .arrow file", dir.display())));
            }
            Ok(files)
        }
    }
}

/// The folder of the split to read in a `save_to_disk` folder: itself, or for a
/// `DatasetDict` (`dataset_dict.json`) the split named, or its only one.
fn arrow_split_dir(spec: &TableSpec, dir: &Path) -> Result<PathBuf, String> {
    let dict = dir.join("dataset_dict.json");
    let Ok(text) = std::fs::read_to_string(&dict) else {
        return match &spec.split {
            Some(split) if dir.join(split).is_dir() => Ok(dir.join(split)),
            Some(split) => Err(format!("{} has no split `{split}`", dir.display())),
            None => Ok(dir.to_owned()),
        };
    };
    let splits: Vec<String> = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v.get("splits")?.as_array().cloned())
        .map(|s| s.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
        .unwrap_or_default();
    match (&spec.split, splits.as_slice()) {
        (Some(split), _) if splits.contains(split) => Ok(dir.join(split)),
        (Some(split), _) => Err(format!(
            "{} has no split `{split}`; its splits are {}",
            dir.display(),
            splits.join(", ")
        )),
        (None, [one]) => Ok(dir.join(one)),
        (None, _) => Err(format!(
            "{} is a DatasetDict of the splits {}: name one with arrow:{}?split=NAME",
            dir.display(),
            splits.join(", "),
            spec.path
        )),
    }
}

/// The split a Parquet file belongs to: `NAME` of the hub's `NAME-00000-of-00004.parquet`,
/// else the folder it sits in below `root` (the Parquet conversion's `default/NAME/0000.parquet`),
/// else none (read with any split).
fn split_of(root: &Path, file: &Path) -> Option<String> {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let stem = file.file_stem()?.to_str()?;
    if let Some((left, total)) = stem.rsplit_once("-of-") {
        if let Some((name, index)) = left.rsplit_once('-') {
            if digits(total) && digits(index) && !name.is_empty() {
                return Some(name.to_owned());
            }
        }
    }
    let below = file.strip_prefix(root).ok()?.parent()?;
    below.file_name().map(|n| n.to_string_lossy().into_owned())
}

/// `files` of the spec's split (every split named in a folder with several is an error
/// unless the spec names one).
fn choose_split(
    spec: &TableSpec,
    root: &Path,
    files: Vec<PathBuf>,
) -> Result<Vec<PathBuf>, String> {
    let splits: Vec<Option<String>> = files.iter().map(|f| split_of(root, f)).collect();
    let named: BTreeSet<&str> = splits.iter().flatten().map(String::as_str).collect();
    let listing = named.iter().copied().collect::<Vec<_>>().join(", ");
    match &spec.split {
        Some(split) => {
            let kept: Vec<PathBuf> = files
                .into_iter()
                .zip(&splits)
                .filter(|(_, s)| s.as_deref() == Some(split.as_str()))
                .map(|(f, _)| f)
                .collect();
            if kept.is_empty() {
                return Err(format!(
                    "no file of split `{split}` (the splits found: {})",
                    if listing.is_empty() { "none" } else { &listing }
                ));
            }
            Ok(kept)
        }
        None if named.len() > 1 => Err(format!(
            "{} holds the splits {listing}: name one with {}:{}?split=NAME (or a file or glob)",
            root.display(),
            prefix(spec.format),
            spec.path
        )),
        None => Ok(files),
    }
}

/// Every file below `dir`, folders in name order, hidden entries skipped.
fn walk(dir: &Path, f: &mut dyn FnMut(&Path)) -> std::io::Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)?
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| e.path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            walk(&path, f)?;
        } else {
            f(&path);
        }
    }
    Ok(())
}

/// Whether a Parquet path is a glob. Only `*`: `?` starts the spec's options.
fn has_wildcard(pattern: &str) -> bool {
    pattern.contains('*')
}

/// The files matching `pattern`, sorted: `*` matches any run of characters within one part
/// of the path.
fn glob(pattern: &str) -> std::io::Result<Vec<PathBuf>> {
    let absolute = pattern.starts_with('/');
    let mut found = vec![if absolute { PathBuf::from("/") } else { PathBuf::new() }];
    for component in pattern.split('/').filter(|c| !c.is_empty()) {
        let mut next = Vec::new();
        for base in &found {
            if !has_wildcard(component) {
                next.push(base.join(component));
                continue;
            }
            let dir = if base.as_os_str().is_empty() { Path::new(".") } else { base.as_path() };
            let Ok(entries) = std::fs::read_dir(dir) else { continue };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if wildcard_match(component.as_bytes(), name.as_bytes()) {
                    next.push(base.join(&name));
                }
            }
        }
        found = next;
    }
    let mut files: Vec<PathBuf> = found.into_iter().filter(|p| p.is_file()).collect();
    files.sort();
    Ok(files)
}

/// Whether `name` matches `pattern` (`*` any run of bytes).
fn wildcard_match(pattern: &[u8], name: &[u8]) -> bool {
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, n));
                p += 1;
            }
            Some(&c) if c == name[n] => {
                p += 1;
                n += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    p = sp + 1;
                    n = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::image::{decode_image, DEFAULT_MAX_PIXELS};

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hf_datasets")
    }

    fn expected() -> serde_json::Value {
        let text = std::fs::read_to_string(fixtures().join("expected.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    fn spec(format: TableFormat, rest: &str) -> TableSpec {
        let rest = if rest.starts_with('/') {
            rest.to_owned()
        } else {
            format!("{}/{rest}", fixtures().display())
        };
        TableSpec::parse(format, &rest).unwrap()
    }

    /// Every row of `set`, in order, as read with `draw`.
    fn rows(set: &TableSet, draw: CaptionDraw) -> Vec<Result<RawSample, SampleError>> {
        let mut rows = Vec::new();
        for part in &set.parts {
            part.for_each_row(draw, |row| {
                rows.push(row);
                ControlFlow::Continue(())
            })
            .unwrap();
        }
        assert_eq!(rows.len() as u64, set.rows());
        rows
    }

    fn decoded(path: &Path) -> image::RgbImage {
        decode_image(&std::fs::read(path).unwrap(), DEFAULT_MAX_PIXELS).unwrap()
    }

    #[test]
    fn rows_read_equal_the_rows_written_every_way() {
        let expected = expected();
        let parquet = TableFormat::Parquet;
        let arrow = TableFormat::Arrow;
        for (spec, set_name, first) in [
            (spec(parquet, "coco/coco.parquet"), "coco", 0),
            (spec(parquet, "coco_hub?split=train"), "coco", 0),
            (spec(parquet, "coco_hub/data/test-*.parquet"), "coco", 20),
            (spec(parquet, "coco_hub/data/train-00001-of-00002.parquet"), "coco", 10),
            (spec(arrow, "coco_arrow"), "coco", 0),
            (spec(arrow, "coco_arrow/data-00002-of-00003.arrow"), "coco", 16),
            (spec(parquet, "plain/plain.parquet?image_key=jpg&caption_key=txt"), "plain", 0),
            (spec(parquet, "plain/plain.parquet?image_key=file&caption_key=txt"), "plain", 0),
            (spec(parquet, "plain/plain.parquet?caption_key=txt"), "plain", 0),
            (spec(arrow, "plain/plain.arrow?img_key=file&caption_key=txt"), "plain", 0),
        ] {
            let set = open(&spec, None).unwrap();
            let rows = rows(&set, CaptionDraw::default());
            let want = &expected[set_name].as_array().unwrap()[first..first + rows.len()];
            for (row, want) in rows.iter().zip(want) {
                let row = row.as_ref().unwrap();
                let file = fixtures().join(want["image"].as_str().unwrap());
                // Pixels, not bytes: the path kinds read the file, the others its copy.
                let image = decode_image(&row.image, DEFAULT_MAX_PIXELS).unwrap();
                assert_eq!(image, decoded(&file), "{spec}: {}", row.key);
                let captions: Vec<&str> = want["captions"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|c| c.as_str().unwrap())
                    .collect();
                assert!(captions.contains(&row.caption.as_deref().unwrap()), "{spec}: {row:?}");
                assert_eq!(row.label, None);
            }
            assert_eq!(set.labels, Labels::default());
            assert_eq!(set.skipped.total(), 0);
        }
    }

    #[test]
    fn keys_name_the_file_and_row_and_sources_the_image() {
        let set = open(&spec(TableFormat::Parquet, "coco_hub?split=train"), None).unwrap();
        let rows = rows(&set, CaptionDraw::default());
        let keys: Vec<&str> = rows.iter().map(|r| r.as_ref().unwrap().key.as_str()).collect();
        assert_eq!(keys[0], "train-00000-of-00002/0");
        assert_eq!(keys[19], "train-00001-of-00002/9");
        assert_eq!(keys.iter().collect::<BTreeSet<_>>().len(), 20, "unique");
        // The Image feature's path: the file name `datasets` kept beside the bytes.
        assert_eq!(rows[3].as_ref().unwrap().source.as_deref(), Some("0003.jpg"));
        let plain = open(
            &spec(TableFormat::Parquet, "plain/plain.parquet?image_key=jpg&caption_key=txt"),
            None,
        )
        .unwrap();
        let row = rows_of(&plain).remove(4).unwrap();
        assert_eq!(row.source.as_deref(), Some("plain.parquet, row 4"));
        assert_eq!(plain.parts.iter().map(TablePart::rows).collect::<Vec<_>>(), [3, 3, 2]);
        assert!(plain.parts[1].describe().ends_with("plain.parquet, row group 1"));
    }

    fn rows_of(set: &TableSet) -> Vec<Result<RawSample, SampleError>> {
        rows(set, CaptionDraw::default())
    }

    #[test]
    fn one_of_several_captions_is_drawn_per_sample_per_epoch_from_the_seed() {
        let set = open(&spec(TableFormat::Parquet, "coco/coco.parquet"), None).unwrap();
        let captions = |seed, epoch| -> Vec<String> {
            rows(&set, CaptionDraw { seed, epoch })
                .into_iter()
                .map(|r| r.unwrap().caption.unwrap())
                .collect()
        };
        let picks = |seed, epoch| -> Vec<usize> {
            captions(seed, epoch)
                .iter()
                .map(|c| c.split("caption ").nth(1).unwrap()[..1].parse().unwrap())
                .collect()
        };
        assert_eq!(captions(7, 3), captions(7, 3), "the same draw twice");
        assert_ne!(picks(7, 0), picks(7, 1), "a new draw each epoch");
        assert_ne!(picks(7, 0), picks(8, 0), "another seed, other captions");
        // Every caption of a row is drawn some epoch: the row's five captions all serve.
        let mut seen = BTreeSet::new();
        for epoch in 0..40 {
            seen.insert(picks(7, epoch)[0]);
        }
        assert_eq!(seen, (0..5).collect());
        // The same rows through the hub's layout draw the same captions: the draw follows
        // the row's place in the set, not the file or part it sits in.
        let arrow = open(&spec(TableFormat::Arrow, "coco_arrow"), None).unwrap();
        let from_arrow: Vec<String> = rows(&arrow, CaptionDraw { seed: 7, epoch: 2 })
            .into_iter()
            .map(|r| r.unwrap().caption.unwrap())
            .collect();
        assert_eq!(from_arrow, captions(7, 2));
    }

    #[test]
    fn class_labels_carry_their_names_from_the_metadata() {
        let expected = expected();
        let want = &expected["classlabel"];
        let names: Vec<String> = serde_json::from_value(want["classnames"].clone()).unwrap();
        for spec in [
            spec(TableFormat::Parquet, "classlabel/classlabel.parquet"),
            spec(TableFormat::Arrow, "classlabel/arrow"),
        ] {
            let set = open(&spec, None).unwrap();
            assert_eq!(set.labels.class_names.as_ref(), Some(&names), "{spec}");
            assert_eq!(set.labels.column.as_deref(), Some("label"));
            let rows = rows_of(&set);
            assert_eq!(rows.len(), 12);
            for (row, want) in rows.iter().zip(want["rows"].as_array().unwrap()) {
                let row = row.as_ref().unwrap();
                let label = want["label"].as_i64().unwrap();
                assert_eq!(row.label, Some(label));
                // No caption column: the class name stands in.
                assert_eq!(row.caption.as_deref(), Some(names[label as usize].as_str()));
                let file = fixtures().join(want["image"].as_str().unwrap());
                assert_eq!(decode_image(&row.image, DEFAULT_MAX_PIXELS).unwrap(), decoded(&file));
            }
        }
        // A class names file naming another number of classes is refused.
        let err = open(&spec(TableFormat::Parquet, "classlabel/classlabel.parquet"), Some(5))
            .err()
            .unwrap();
        assert!(
            err.to_string().contains("names 3 classes but the class names given name 5"),
            "{err}"
        );
    }

    #[test]
    fn bad_rows_are_skipped_and_counted_by_reason() {
        let set = open(&spec(TableFormat::Parquet, "bad/bad.parquet"), None).unwrap();
        let mut skipped = SkipCounts::new();
        let mut good = 0;
        for row in rows_of(&set) {
            match row
                .map_err(|e| e.reason)
                .and_then(|raw| raw.decode(DEFAULT_MAX_PIXELS).map(|_| ()))
            {
                Ok(()) => good += 1,
                Err(reason) => skipped.add(reason),
            }
        }
        let expected = expected();
        assert_eq!(good, expected["bad"]["samples"].as_u64().unwrap());
        let want: SkipCounts = serde_json::from_value(expected["bad"]["skipped"].clone()).unwrap();
        assert_eq!(skipped, want);
        // The error names the row and what is wrong with it.
        let bad_label = rows_of(&set)
            .into_iter()
            .find_map(|r| r.err().filter(|e| e.reason == SkipReason::BadLabel))
            .unwrap();
        let text = bad_label.to_string();
        assert!(
            text.contains("bad/9")
                && text.contains("label 5 is not a class index (the class list has 3: 0 to 2)"),
            "{text}"
        );
    }

    #[test]
    fn folders_globs_and_splits() {
        let parquet = TableFormat::Parquet;
        let count = |s: &TableSpec| open(s, None).map(|set| set.rows());
        let err = count(&spec(parquet, "coco_hub")).err().unwrap().to_string();
        assert!(
            err.contains("holds the splits test, train") && err.contains("?split=NAME"),
            "{err}"
        );
        assert_eq!(count(&spec(parquet, "coco_hub?split=train")).unwrap(), 20);
        assert_eq!(count(&spec(parquet, "coco_hub/data?split=test")).unwrap(), 4);
        let err = count(&spec(parquet, "coco_hub?split=validation")).err().unwrap().to_string();
        assert!(
            err.contains("no file of split `validation` (the splits found: test, train)"),
            "{err}"
        );
        assert_eq!(count(&spec(parquet, "coco_hub/data/train-*-of-00002.parquet")).unwrap(), 20);
        assert_eq!(count(&spec(parquet, "coco_hub/*/te*-*.parquet")).unwrap(), 4);
        let err = count(&spec(parquet, "coco_hub/data/valid-*.parquet")).err().unwrap().to_string();
        assert!(err.contains("matches no file"), "{err}");
        // A folder of one split needs none named; the Parquet conversion's layout too.
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("default/train")).unwrap();
        std::fs::copy(fixtures().join("coco/coco.parquet"), d.join("default/train/0000.parquet"))
            .unwrap();
        let local = |rest: &str| spec(parquet, &format!("{}/{rest}", d.display()));
        assert_eq!(count(&local("")).unwrap(), 24);
        assert_eq!(count(&local("?split=train")).unwrap(), 24);
        // A DatasetDict saved to disk: a split named, or refused with the list.
        let dict = d.join("dict");
        for split in ["train", "test"] {
            std::fs::create_dir_all(dict.join(split)).unwrap();
            for entry in std::fs::read_dir(fixtures().join("coco_arrow")).unwrap() {
                let entry = entry.unwrap();
                std::fs::copy(entry.path(), dict.join(split).join(entry.file_name())).unwrap();
            }
        }
        std::fs::write(dict.join("dataset_dict.json"), r#"{"splits": ["train", "test"]}"#).unwrap();
        let arrow = |rest: &str| spec(TableFormat::Arrow, &format!("{}{rest}", dict.display()));
        let err = count(&arrow("")).err().unwrap().to_string();
        assert!(
            err.contains("DatasetDict of the splits train, test") && err.contains("?split=NAME"),
            "{err}"
        );
        assert_eq!(count(&arrow("?split=test")).unwrap(), 24);
        assert!(count(&arrow("?split=nope")).is_err());
        assert!(wildcard_match(b"train-*-of-*", b"train-00001-of-00004"));
        assert!(!wildcard_match(b"train-*", b"test-0"));
        assert!(wildcard_match(b"a*b*c", b"abbbc") && !wildcard_match(b"a*c", b"abbd"));
    }

    #[test]
    fn columns_are_chosen_by_default_or_by_name_and_refused_in_words() {
        let plain = |options: &str| {
            open(&spec(TableFormat::Parquet, &format!("plain/plain.parquet{options}")), None)
                .map(|_| ())
                .err()
                .map(|e| e.to_string())
        };
        let err = plain("").unwrap();
        assert!(
            err.contains("no caption column (looked for `text`, `caption`, `captions`)")
                && err.contains("`jpg` (Binary), `file` (Utf8)")
                && err.contains("?caption_key=COLUMN"),
            "{err}"
        );
        assert_eq!(plain("?caption_key=txt"), None);
        for (options, expect) in [
            ("?caption_key=txt&image_key=nope", "no image column `nope`"),
            ("?caption_key=jpg", "caption column `jpg` is Binary: a string or a list"),
            (
                "?caption_key=txt&label_key=txt",
                "label column `txt` is Utf8: labels are class indices",
            ),
            ("?caption_key=txt&label_key=gone", "no label column `gone`"),
        ] {
            let err = plain(options).unwrap();
            assert!(err.contains(expect) && err.contains("plain.parquet"), "{options}: {err}");
        }
        let err = open(&spec(TableFormat::Parquet, "coco/coco.parquet?image_key=image_id"), None)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("column `image_id` is Int64, not an image"), "{err}");
    }

    #[test]
    fn files_of_one_source_must_agree_and_unreadable_ones_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::copy(fixtures().join("coco/coco.parquet"), d.join("a.parquet")).unwrap();
        std::fs::write(d.join("b.parquet"), b"not parquet").unwrap();
        let set = open(&spec(TableFormat::Parquet, d.to_str().unwrap()), None).unwrap();
        assert_eq!((set.rows(), set.skipped.get("unreadable_shard")), (24, Some(&1)));
        std::fs::copy(fixtures().join("classlabel/classlabel.parquet"), d.join("b.parquet"))
            .unwrap();
        let err = open(&spec(TableFormat::Parquet, d.to_str().unwrap()), None).err().unwrap();
        let err = err.to_string();
        assert!(
            err.contains(
                "b.parquet: its columns are read as image `image` (Image struct), no caption"
            ) && err.contains(
                "a.parquet as image `image` (Image struct), caption `captions` (lists of strings)"
            ),
            "{err}"
        );
    }

    #[test]
    fn codecs_not_built_in_are_refused_naming_them() {
        for (spec, codec) in [
            (spec(TableFormat::Parquet, "plain/gzip.parquet?caption_key=txt"), "gzip"),
            (spec(TableFormat::Arrow, "plain/lz4.arrow?caption_key=txt"), "LZ4_FRAME"),
        ] {
            let err = open(&spec, None).err().unwrap().to_string();
            assert!(
                err.contains(&format!("it is compressed with {codec}, which oxclip does not read"))
                    && err.contains(&spec.path),
                "{err}"
            );
        }
        // The zstd file beside them is read.
        let zstd = open(&spec(TableFormat::Parquet, "plain/plain.parquet?caption_key=txt"), None);
        assert_eq!(zstd.unwrap().rows(), 8);
    }

    #[test]
    fn specs_print_as_they_parse() {
        let s =
            TableSpec::parse(TableFormat::Parquet, "d/x.parquet?caption_key=t&split=a&img_key=i")
                .unwrap();
        assert_eq!(s.to_string(), "parquet:d/x.parquet?split=a&image_key=i&caption_key=t");
        assert_eq!(
            TableSpec::parse(TableFormat::Parquet, &s.to_string()["parquet:".len()..]).unwrap(),
            s
        );
        for (bad, expect) in [
            ("x?color=red", "unknown parquet option `color`"),
            ("x?split", "NAME=VALUE"),
            ("x?split=", "no value"),
            ("", "needs a path"),
        ] {
            let err = TableSpec::parse(TableFormat::Parquet, bad).unwrap_err();
            assert!(err.contains(expect), "{bad}: {err}");
        }
    }
}
