//! Tables on disk: Apache Parquet files and Arrow IPC files, what Hugging Face `datasets`
//! writes (`to_parquet` and the hub's `data/*.parquet`; `save_to_disk`'s
//! `data-0000N-of-0000M.arrow`, Arrow IPC streams), read with the Apache Arrow crates
//! (`parquet`, `arrow-ipc`), never by hand. What the columns mean (an image, captions, a class
//! label) is `sources/table.rs`'s business; here a table is a schema and parts.
//!
//! A table is read one part at a time: a Parquet row group, or an Arrow record batch. Opening
//! a file reads its metadata only: the schema, with its key-value metadata (where `datasets`
//! keeps the features, under `huggingface`), and each part's row count, so a loader can plan
//! an epoch before it reads a row. Reading a part decodes only the columns asked for.
//!
//! Arrow IPC comes in two framings of the same messages: the stream format (`datasets`,
//! pyarrow's `new_stream`) and the file format (the `ARROW1` magic, a footer; pyarrow's
//! `new_file`). Opening walks the messages once, reading each header and skipping each body,
//! to find where every record batch lies and how many rows it holds; a part is later read on
//! its own, as the schema message followed by that batch's message, through `arrow_ipc`'s
//! `StreamDecoder`. Dictionary batches are refused (a dictionary-encoded column would need
//! every dictionary message before the batch; `datasets` never writes one). Lengths a file
//! declares are checked against its size before anything is allocated.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::RecordBatch;
use arrow_ipc::reader::StreamDecoder;
use arrow_ipc::{CompressionType, MessageHeader};
use arrow_schema::SchemaRef;
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReaderBuilder,
};
use parquet::arrow::ProjectionMask;

/// The schema metadata key under which `datasets` stores its features (as JSON,
/// `{"info": {"features": {...}}}`).
pub const HF_METADATA_KEY: &str = "huggingface";

/// The Arrow IPC file format's magic; the stream format has none.
const ARROW_MAGIC: &[u8; 6] = b"ARROW1";
/// Marks the length of the next IPC message (since Arrow 0.15; older streams start with
/// the length itself).
const CONTINUATION: [u8; 4] = [0xff; 4];

/// One table file, opened: its schema and its parts.
#[derive(Clone)]
pub struct TableFile {
    path: PathBuf,
    schema: SchemaRef,
    /// Rows in each part, in file order.
    part_rows: Vec<u64>,
    layout: Layout,
}

#[derive(Clone)]
enum Layout {
    Parquet(ArrowReaderMetadata),
    Ipc {
        /// The schema message, framed as in a stream (what a decoder reads first).
        schema_message: Arc<[u8]>,
        /// Where each record batch's message lies: (offset, length) in the file.
        batches: Vec<(u64, u64)>,
        /// A compression of the batches' bodies this build cannot undo, if any.
        unsupported: Option<String>,
    },
}

impl std::fmt::Debug for TableFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TableFile")
            .field("path", &self.path)
            .field("parts", &self.part_rows.len())
            .finish_non_exhaustive()
    }
}

/// Which container a table file is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TableFormat {
    Parquet,
    /// Arrow IPC, stream or file format.
    Arrow,
}

impl TableFile {
    /// Reads the metadata of the `format` file at `path`. The error says, in words, what
    /// is wrong with the file.
    pub fn open(path: &Path, format: TableFormat) -> Result<Self, String> {
        let file = File::open(path).map_err(|e| e.to_string())?;
        match format {
            TableFormat::Parquet => {
                let metadata = ArrowReaderMetadata::load(&file, ArrowReaderOptions::new())
                    .map_err(|e| format!("not a Parquet file this reader can read: {e}"))?;
                let part_rows = metadata
                    .metadata()
                    .row_groups()
                    .iter()
                    .map(|g| u64::try_from(g.num_rows()).unwrap_or(0))
                    .collect();
                Ok(Self {
                    path: path.to_owned(),
                    schema: Arc::clone(metadata.schema()),
                    part_rows,
                    layout: Layout::Parquet(metadata),
                })
            }
            TableFormat::Arrow => open_ipc(path, file),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The schema, with the file's key-value metadata.
    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    /// Rows in each part (row group or record batch), in file order.
    pub fn part_rows(&self) -> &[u64] {
        &self.part_rows
    }

    /// The compression of one of the top-level `columns` (of every column, for Arrow) that
    /// this build does not read, by name (`gzip`, `LZ4_FRAME`), if any: snappy and zstd for
    /// Parquet, zstd for Arrow (and none) are read.
    pub fn unsupported_compression(&self, columns: &[&str]) -> Option<String> {
        use parquet::basic::Compression;
        match &self.layout {
            Layout::Parquet(metadata) => {
                metadata.metadata().row_groups().iter().flat_map(|g| g.columns()).find_map(|c| {
                    let root = c.column_path().parts().first()?;
                    if !columns.contains(&root.as_str()) {
                        return None;
                    }
                    match c.compression() {
                        Compression::UNCOMPRESSED | Compression::SNAPPY | Compression::ZSTD(_) => {
                            None
                        }
                        Compression::GZIP(_) => Some("gzip".into()),
                        Compression::BROTLI(_) => Some("brotli".into()),
                        Compression::LZ4 | Compression::LZ4_RAW => Some("lz4".into()),
                        Compression::LZO => Some("lzo".into()),
                    }
                })
            }
            Layout::Ipc { unsupported, .. } => unsupported.clone(),
        }
    }

    /// The features `datasets` recorded, `{"image": {"_type": "Image"}, ...}`, when the
    /// schema metadata holds them.
    pub fn hf_features(&self) -> Option<serde_json::Value> {
        let text = self.schema.metadata().get(HF_METADATA_KEY)?;
        let value: serde_json::Value = serde_json::from_str(text).ok()?;
        value.get("info")?.get("features").cloned()
    }

    /// Part `part`, with the top-level columns named `columns` only (found by name in the
    /// result; their order there is the file's).
    pub fn read_part(&self, part: usize, columns: &[&str]) -> Result<Vec<RecordBatch>, String> {
        let rows = *self.part_rows.get(part).ok_or_else(|| format!("no part {part}"))?;
        let indices: Vec<usize> =
            columns.iter().filter_map(|c| self.schema.index_of(c).ok()).collect();
        match &self.layout {
            Layout::Parquet(metadata) => {
                let file = File::open(&self.path).map_err(|e| e.to_string())?;
                let mask = ProjectionMask::roots(metadata.parquet_schema(), indices);
                let reader =
                    ParquetRecordBatchReaderBuilder::new_with_metadata(file, metadata.clone())
                        .with_row_groups(vec![part])
                        .with_projection(mask)
                        .with_batch_size(usize::try_from(rows).unwrap_or(usize::MAX).max(1))
                        .build()
                        .map_err(|e| format!("row group {part}: {e}"))?;
                reader.map(|batch| batch.map_err(|e| format!("row group {part}: {e}"))).collect()
            }
            Layout::Ipc { schema_message, batches, .. } => {
                let (offset, len) = batches[part];
                let mut file = File::open(&self.path).map_err(|e| e.to_string())?;
                // The schema message, then the batch's, in one buffer: the decoder finishes
                // a message only once bytes after it arrive.
                let mut stream = Vec::with_capacity(schema_message.len() + len as usize);
                stream.extend_from_slice(schema_message);
                stream.resize(schema_message.len() + len as usize, 0);
                file.seek(SeekFrom::Start(offset))
                    .and_then(|_| file.read_exact(&mut stream[schema_message.len()..]))
                    .map_err(|e| format!("record batch {part}: {e}"))?;
                let mut decoder = StreamDecoder::new();
                let batch = decoder
                    .decode(&mut arrow_buffer::Buffer::from(stream))
                    .map_err(|e| format!("record batch {part}: {e}"))?
                    .ok_or_else(|| format!("record batch {part} does not decode to rows"))?;
                let batch = batch.project(&indices).map_err(|e| e.to_string())?;
                Ok(vec![batch])
            }
        }
    }
}

/// Walks the messages of an Arrow IPC file or stream (see the module docs).
fn open_ipc(path: &Path, mut file: File) -> Result<TableFile, String> {
    let size = file.metadata().map_err(|e| e.to_string())?.len();
    let mut head = [0u8; 8];
    let n = read_up_to(&mut file, &mut head)?;
    // The file format: magic, padding to 8, the messages, then the footer, its length and
    // the magic again. The messages end where the footer starts.
    let (mut pos, end) = if n >= 6 && &head[..6] == ARROW_MAGIC {
        let mut tail = [0u8; 10];
        if size < 18 {
            return Err("an Arrow IPC file cut short (no footer)".into());
        }
        file.seek(SeekFrom::Start(size - 10)).map_err(|e| e.to_string())?;
        file.read_exact(&mut tail).map_err(|e| e.to_string())?;
        if &tail[4..] != ARROW_MAGIC {
            return Err("an Arrow IPC file cut short (no closing magic)".into());
        }
        let footer = u64::from(u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]));
        (8, size.saturating_sub(10 + footer).max(8))
    } else {
        (0, size)
    };
    let mut schema_message: Option<Vec<u8>> = None;
    let mut batches = Vec::new();
    let mut part_rows = Vec::new();
    let mut unsupported = None;
    while pos < end {
        file.seek(SeekFrom::Start(pos)).map_err(|e| e.to_string())?;
        let mut word = [0u8; 4];
        if read_up_to(&mut file, &mut word)? < 4 {
            break; // a stream may end without its end-of-stream marker
        }
        let mut prefix = 4u64;
        if word == CONTINUATION {
            if read_up_to(&mut file, &mut word)? < 4 {
                return Err(format!("message at byte {pos} cut short"));
            }
            prefix = 8;
        }
        let meta_len = u64::from(u32::from_le_bytes(word));
        if meta_len == 0 {
            break; // end of stream
        }
        if pos + prefix + meta_len > end {
            return Err(format!(
                "message at byte {pos} declares {meta_len} bytes of metadata, past the end of \
                 the file ({size} bytes)"
            ));
        }
        let mut meta = vec![0u8; meta_len as usize];
        file.read_exact(&mut meta).map_err(|e| e.to_string())?;
        let message = arrow_ipc::root_as_message(&meta)
            .map_err(|e| format!("message at byte {pos} is not an Arrow IPC message: {e}"))?;
        let body = u64::try_from(message.bodyLength())
            .map_err(|_| format!("message at byte {pos} declares a negative body length"))?;
        let whole = prefix + meta_len + body;
        if pos + whole > end {
            return Err(format!(
                "message at byte {pos} declares a body of {body} bytes, past the end of the \
                 file ({size} bytes): the file is cut short"
            ));
        }
        match message.header_type() {
            MessageHeader::Schema if schema_message.is_none() && body == 0 => {
                let mut framed = Vec::with_capacity(8 + meta.len());
                framed.extend_from_slice(&CONTINUATION);
                framed.extend_from_slice(&(meta_len as u32).to_le_bytes());
                framed.extend_from_slice(&meta);
                schema_message = Some(framed);
            }
            MessageHeader::RecordBatch => {
                if schema_message.is_none() {
                    return Err("a record batch before the schema".into());
                }
                let header = message.header_as_record_batch();
                let codec = header.and_then(|b| b.compression()).map(|c| c.codec());
                if let Some(codec) = codec.filter(|&c| c != CompressionType::ZSTD) {
                    unsupported.get_or_insert_with(|| {
                        codec.variant_name().unwrap_or("an unknown codec").to_owned()
                    });
                }
                let rows = header.map_or(0, |b| b.length());
                let rows = u64::try_from(rows)
                    .map_err(|_| format!("record batch at byte {pos} has {rows} rows"))?;
                batches.push((pos, whole));
                part_rows.push(rows);
            }
            MessageHeader::DictionaryBatch => {
                return Err("it holds dictionary-encoded columns, which are not read \
                            (`datasets` never writes them; cast them to plain types)"
                    .into())
            }
            other => {
                return Err(format!("unexpected Arrow IPC message {other:?} at byte {pos}"));
            }
        }
        pos += whole;
    }
    let schema_message = schema_message.ok_or("not an Arrow IPC file or stream (no schema)")?;
    let mut decoder = StreamDecoder::new();
    // The end-of-stream marker after the schema lets the decoder finish it.
    let mut framed = schema_message.clone();
    framed.extend_from_slice(&CONTINUATION);
    framed.extend_from_slice(&[0; 4]);
    let mut buffer = arrow_buffer::Buffer::from(framed);
    decoder.decode(&mut buffer).map_err(|e| format!("its schema does not decode: {e}"))?;
    let schema = decoder.schema().ok_or("its schema does not decode")?;
    Ok(TableFile {
        path: path.to_owned(),
        schema,
        part_rows,
        layout: Layout::Ipc { schema_message: schema_message.into(), batches, unsupported },
    })
}

/// Fills `buf` as far as the file goes; the bytes read.
fn read_up_to(file: &mut File, buf: &mut [u8]) -> Result<usize, String> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::cast::AsArray;

    fn fixture(rel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hf_datasets").join(rel)
    }

    #[test]
    fn parquet_parts_are_its_row_groups_with_the_hf_features() {
        let t = TableFile::open(&fixture("coco/coco.parquet"), TableFormat::Parquet).unwrap();
        assert_eq!(t.part_rows(), [5, 5, 5, 5, 4]);
        let features = t.hf_features().unwrap();
        assert_eq!(features["image"]["_type"], "Image");
        let batches = t.read_part(1, &["image_id"]).unwrap();
        let ids: Vec<i64> = batches
            .iter()
            .flat_map(|b| {
                assert_eq!(b.num_columns(), 1);
                b.column(0).as_primitive::<arrow_array::types::Int64Type>().values().to_vec()
            })
            .collect();
        assert_eq!(ids, [5, 6, 7, 8, 9]);
    }

    #[test]
    fn arrow_streams_and_files_are_read_a_batch_at_a_time() {
        let stream = fixture("coco_arrow/data-00001-of-00003.arrow");
        let t = TableFile::open(&stream, TableFormat::Arrow).unwrap();
        assert_eq!(t.part_rows(), [8]);
        assert!(t.hf_features().is_some());
        let batch = &t.read_part(0, &["image_id"]).unwrap()[0];
        let ids = batch.column(0).as_primitive::<arrow_array::types::Int64Type>();
        assert_eq!(ids.values().to_vec(), (8..16).collect::<Vec<i64>>());

        let file = TableFile::open(&fixture("plain/plain.arrow"), TableFormat::Arrow).unwrap();
        assert_eq!(file.part_rows(), [3, 3, 2]);
        let batch = &file.read_part(2, &["txt", "jpg"]).unwrap()[0];
        let txt = batch.column_by_name("txt").unwrap().as_string::<i32>();
        assert_eq!(txt.iter().flatten().collect::<Vec<_>>(), ["plain 6", "plain 7"]);
    }

    #[test]
    fn damaged_files_are_errors_in_words() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = std::fs::read(fixture("coco_arrow/data-00000-of-00003.arrow")).unwrap();
        let cut = dir.path().join("cut.arrow");
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        let err = TableFile::open(&cut, TableFormat::Arrow).unwrap_err();
        assert!(err.contains("cut short"), "{err}");
        // A declared metadata length of 2^31 in a file of 16 bytes: refused before allocating.
        let huge = dir.path().join("huge.arrow");
        std::fs::write(&huge, [0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0x80, 1, 2, 3, 4, 5, 6, 7, 8])
            .unwrap();
        let err = TableFile::open(&huge, TableFormat::Arrow).unwrap_err();
        assert!(err.contains("past the end of the file"), "{err}");
        let garbage = dir.path().join("garbage.parquet");
        std::fs::write(&garbage, b"this is not parquet at all").unwrap();
        let err = TableFile::open(&garbage, TableFormat::Parquet).unwrap_err();
        assert!(err.contains("not a Parquet file"), "{err}");
        let parquet = std::fs::read(fixture("coco/coco.parquet")).unwrap();
        std::fs::write(&garbage, &parquet[..parquet.len() - 100]).unwrap();
        assert!(TableFile::open(&garbage, TableFormat::Parquet).is_err());
    }
}
