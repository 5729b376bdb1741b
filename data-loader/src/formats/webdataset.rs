//! WebDataset tar shards: read them as a stream of samples, write them for `synth` (and later
//! `pack`).
//!
//! A sample is a run of consecutive members sharing a key, as img2dataset writes them and as
//! webdataset groups them (`webdataset/tariterators.py`, `base_plus_ext` and
//! `group_by_keys`): the key is the member path up to the first dot of its file name
//! (`dir/000123.jpg` -> `dir/000123`), the extension is the rest, lower-cased (`jpg`,
//! `seg.png`). Members without a dot and non-file entries are ignored.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use super::image::{decode_image, IMAGE_EXTENSIONS};
use crate::error::DataError;
use crate::skip::{SampleError, SkipReason};

/// One sample as stored: encoded image bytes and its text, not yet decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawSample {
    pub key: String,
    /// The encoded image (JPEG, PNG or WebP bytes).
    pub image: Vec<u8>,
    /// Which member the image came from: `jpg`, `jpeg`, `png` or `webp`.
    pub image_ext: String,
    /// `KEY.txt`, when present (valid UTF-8 by construction).
    pub caption: Option<String>,
    /// `KEY.cls`, when present: the class index as decimal text.
    pub label: Option<i64>,
    /// Where the sample came from, for people: `source` in `KEY.json` (what `data pack`
    /// writes, the original file's path) or img2dataset's `url` there.
    pub source: Option<String>,
}

impl RawSample {
    /// The decoded image and the caption, as training uses them, or why they cannot be:
    /// a missing or blank caption, or an image that does not decode within `max_pixels`.
    /// A sample with a class index but no caption (clip_benchmark's classification shards)
    /// has the index's text for caption, as a CSV with a label column but no captions does.
    pub fn decode(
        &self,
        max_pixels: u64,
    ) -> Result<(image::RgbImage, std::borrow::Cow<'_, str>), SkipReason> {
        let caption = match (self.caption.as_deref(), self.label) {
            (Some(caption), _) => std::borrow::Cow::Borrowed(caption),
            (None, Some(label)) => std::borrow::Cow::Owned(label.to_string()),
            (None, None) => return Err(SkipReason::MissingCaption),
        };
        if caption.trim().is_empty() {
            return Err(SkipReason::EmptyCaption);
        }
        Ok((decode_image(&self.image, max_pixels)?, caption))
    }
}

/// The caption of a raw sample, trimmed of surrounding whitespace, or why there is none.
pub(crate) fn usable_caption(raw: &RawSample) -> Result<&str, SkipReason> {
    let caption = raw.caption.as_deref().ok_or(SkipReason::MissingCaption)?;
    let caption = caption.trim();
    if caption.is_empty() {
        return Err(SkipReason::EmptyCaption);
    }
    Ok(caption)
}

/// Reads the samples of one shard in order. A sample the reader cannot use (no image,
/// non-UTF-8 caption, unparsable label, duplicate member) is an `Err` item and reading goes
/// on; a truncated or corrupt tar gives one `Err` item for the sample being read (reason
/// `TruncatedShard`) and ends the iteration. Never panics on bad input.
///
/// The shard is read when this is called and its samples held until iterated (the tar
/// crate's entry iterator borrows its archive, so it cannot be returned); use
/// [`for_each_sample`] to stream.
pub fn read_shard(path: &Path) -> impl Iterator<Item = Result<RawSample, SampleError>> {
    let mut items = Vec::new();
    for_each_sample(path, |item| {
        items.push(item);
        ControlFlow::Continue(())
    });
    items.into_iter()
}

/// Streams the samples of one shard file to `f`, with the same items as [`read_shard`],
/// until the shard ends or `f` returns `ControlFlow::Break`.
pub fn for_each_sample(
    path: &Path,
    mut f: impl FnMut(Result<RawSample, SampleError>) -> ControlFlow<()>,
) {
    match File::open(path) {
        Ok(file) => for_each_sample_in(BufReader::new(file), path, f),
        Err(e) => {
            let _ = f(Err(SampleError {
                reason: SkipReason::UnreadableShard,
                shard: path.to_owned(),
                key: None,
                message: e.to_string(),
            }));
        }
    }
}

/// [`for_each_sample`] over any byte stream holding a tar archive (a file, a `pipe:`
/// command's output); `name` is what errors call the shard. A read error is a truncation.
pub fn for_each_sample_in(
    reader: impl Read,
    name: &Path,
    mut f: impl FnMut(Result<RawSample, SampleError>) -> ControlFlow<()>,
) {
    let path = name;
    let error = |reason, key, message| SampleError { reason, shard: path.to_owned(), key, message };
    let mut archive = tar::Archive::new(reader);
    let entries = match archive.entries() {
        Ok(entries) => entries,
        Err(e) => {
            let _ = f(Err(error(SkipReason::UnreadableShard, None, e.to_string())));
            return;
        }
    };
    // The sample being assembled: its key and members.
    let mut pending: Option<(String, Members)> = None;
    // Whether any member header read cleanly: failing before one means the bytes are not a
    // tar archive at all (an unreadable shard), not a tar cut short.
    let mut read_any = false;
    for entry in entries {
        let (key, ext, data) = match read_member(entry) {
            Ok(Some(member)) => member,
            Ok(None) => {
                read_any = true;
                continue;
            }
            Err((None, _)) if !read_any => {
                // The tar crate's own text quotes the header's bytes: binary noise in a log.
                let message =
                    "not a tar archive: its first member header cannot be read".to_owned();
                let _ = f(Err(error(SkipReason::UnreadableShard, None, message)));
                return;
            }
            Err((failed_key, message)) => {
                // The members read so far are whole; only the one being read is cut. If it
                // belongs to the pending sample, that sample is lost; otherwise the pending
                // sample goes out first (an incomplete one is then skipped for what it lacks).
                let mut lost_key = failed_key.clone();
                if let Some((k, members)) = pending.take() {
                    if failed_key.as_ref() == Some(&k) {
                        lost_key = Some(k);
                    } else if f(assemble(path, k, members)).is_break() {
                        return;
                    }
                }
                let _ = f(Err(error(SkipReason::TruncatedShard, lost_key, message)));
                return;
            }
        };
        read_any = true;
        match pending.as_mut() {
            Some((k, members)) if *k == key => members.push((ext, data)),
            _ => {
                if let Some((k, members)) = pending.replace((key, vec![(ext, data)])) {
                    if f(assemble(path, k, members)).is_break() {
                        return;
                    }
                }
            }
        }
    }
    if let Some((k, members)) = pending {
        let _ = f(assemble(path, k, members));
    }
}

/// One tar entry as (key, extension, bytes); `None` for entries that are not sample members
/// (directories, names without an extension). An error carries the member's key when the
/// header was readable.
type Member = (String, String, Vec<u8>);
/// The members of one sample: (extension, bytes), in archive order.
type Members = Vec<(String, Vec<u8>)>;
fn read_member<R: Read>(
    entry: std::io::Result<tar::Entry<'_, R>>,
) -> Result<Option<Member>, (Option<String>, String)> {
    let mut entry = entry.map_err(|e| (None, e.to_string()))?;
    if !entry.header().entry_type().is_file() {
        return Ok(None);
    }
    let name = match entry.path() {
        Ok(p) => p.to_string_lossy().into_owned(),
        Err(e) => return Err((None, format!("bad member name: {e}"))),
    };
    let Some((key, ext)) = split_key(&name) else {
        return Ok(None);
    };
    let size = entry.size();
    let mut data = Vec::with_capacity(usize::try_from(size).unwrap_or(0).min(64 << 20));
    if let Err(e) = entry.read_to_end(&mut data) {
        return Err((Some(key), format!("member {name}: {e}")));
    }
    // A short read is how a truncated tar shows itself: the tar crate's entry reader stops
    // at the end of the file without an error.
    if data.len() as u64 != size {
        return Err((
            Some(key),
            format!("member {name} ends after {} of {size} bytes", data.len()),
        ));
    }
    Ok(Some((key, ext, data)))
}

/// Turns one key's members into a sample, or says why it cannot be one.
fn assemble(shard: &Path, key: String, members: Members) -> Result<RawSample, SampleError> {
    let error = |reason, key: String, message| SampleError {
        reason,
        shard: shard.to_owned(),
        key: Some(key),
        message,
    };
    for (i, (ext, _)) in members.iter().enumerate() {
        if members[..i].iter().any(|(e, _)| e == ext) {
            return Err(error(SkipReason::DuplicateMember, key, format!("two `{ext}` members")));
        }
    }
    let mut image: Option<(usize, String, Vec<u8>)> = None;
    let mut caption = None;
    let mut label = None;
    let mut source = None;
    for (ext, data) in members {
        if let Some(rank) = IMAGE_EXTENSIONS.iter().position(|e| *e == ext) {
            if image.as_ref().is_none_or(|(r, _, _)| rank < *r) {
                image = Some((rank, ext, data));
            }
        } else if ext == "txt" {
            match String::from_utf8(data) {
                Ok(text) => caption = Some(text),
                Err(e) => return Err(error(SkipReason::NonUtf8Caption, key, e.to_string())),
            }
        } else if ext == "cls" {
            let parsed = std::str::from_utf8(&data).ok().and_then(|s| s.trim().parse::<i64>().ok());
            match parsed {
                Some(v) => label = Some(v),
                None => {
                    let shown = String::from_utf8_lossy(&data[..data.len().min(32)]).into_owned();
                    return Err(error(SkipReason::BadLabel, key, format!("cls {shown:?}")));
                }
            }
        } else if ext == "json" {
            // Only read for the name it gives; a malformed one costs the sample nothing.
            if let Ok(serde_json::Value::Object(meta)) = serde_json::from_slice(&data) {
                source = ["source", "url"]
                    .iter()
                    .find_map(|k| meta.get(*k).and_then(|v| v.as_str()))
                    .map(str::to_owned);
            }
        }
        // Anything else: ignored.
    }
    let Some((_, image_ext, image)) = image else {
        return Err(error(SkipReason::MissingImage, key, String::new()));
    };
    Ok(RawSample { key, image, image_ext, caption, label, source })
}

/// webdataset's `base_plus_ext`: `dir/abc.seg.png` -> (`dir/abc`, `seg.png`). `None` for
/// names without a dot in the file name, or with nothing before it.
pub fn split_key(name: &str) -> Option<(String, String)> {
    let file_start = name.rfind('/').map_or(0, |i| i + 1);
    let dot = name[file_start..].find('.')? + file_start;
    if dot == file_start {
        return None;
    }
    Some((name[..dot].to_owned(), name[dot + 1..].to_lowercase()))
}

/// Writes one WebDataset shard. Members go to `NAME.tmp` first; [`finish`](Self::finish)
/// renames it into place, so a reader never sees a half-written shard. Dropping an unfinished
/// writer removes the temporary file.
pub struct ShardWriter {
    path: PathBuf,
    tmp_path: PathBuf,
    builder: Option<tar::Builder<BufWriter<File>>>,
    samples: u64,
}

impl ShardWriter {
    /// Starts the shard `path` (e.g. `out/train/00000.tar`).
    pub fn create(path: &Path) -> Result<Self, DataError> {
        let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
        tmp_name.push(".tmp");
        let tmp_path = path.with_file_name(tmp_name);
        let file = File::create(&tmp_path)
            .map_err(|source| DataError::Write { path: tmp_path.clone(), source })?;
        let mut builder = tar::Builder::new(BufWriter::new(file));
        builder.mode(tar::HeaderMode::Deterministic);
        Ok(Self { path: path.to_owned(), tmp_path, builder: Some(builder), samples: 0 })
    }

    /// Appends one sample: a `KEY.EXT` member per `(ext, bytes)`.
    pub fn write_sample(&mut self, key: &str, members: &[(&str, &[u8])]) -> Result<(), DataError> {
        let Some(builder) = self.builder.as_mut() else {
            return Err(DataError::Shard {
                path: self.path.clone(),
                message: "write after finish".into(),
            });
        };
        for (ext, data) in members {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_mtime(0);
            header.set_entry_type(tar::EntryType::Regular);
            builder
                .append_data(&mut header, format!("{key}.{ext}"), *data)
                .map_err(|source| DataError::Write { path: self.tmp_path.clone(), source })?;
        }
        self.samples += 1;
        Ok(())
    }

    /// Samples written so far.
    pub fn samples(&self) -> u64 {
        self.samples
    }

    /// Ends the archive, flushes it to disk and moves it into place. Returns the sample count.
    pub fn finish(mut self) -> Result<u64, DataError> {
        let write_err = |path: &Path| {
            let path = path.to_owned();
            move |source| DataError::Write { path, source }
        };
        if let Some(builder) = self.builder.take() {
            let mut writer = builder.into_inner().map_err(write_err(&self.tmp_path))?;
            writer.flush().map_err(write_err(&self.tmp_path))?;
            let file = writer.into_inner().map_err(|e| DataError::Write {
                path: self.tmp_path.clone(),
                source: e.into_error(),
            })?;
            file.sync_all().map_err(write_err(&self.tmp_path))?;
        }
        std::fs::rename(&self.tmp_path, &self.path).map_err(write_err(&self.path))?;
        Ok(self.samples)
    }
}

impl Drop for ShardWriter {
    fn drop(&mut self) {
        if self.builder.is_some() {
            // Not finished: leave no partial shard behind.
            drop(self.builder.take());
            let _ = std::fs::remove_file(&self.tmp_path);
        }
    }
}

/// Removes the shards of `listed` (names from the index an earlier run wrote in `dir`) that
/// are not in `keep`, so a directory spec sees only this run's shards. Nothing else in `dir`
/// is touched: a file no index of ours lists was not written by us. Names that are not plain
/// `.tar` file names are ignored.
pub(crate) fn remove_stale_shards(
    dir: &Path,
    listed: &[String],
    keep: &[String],
) -> Result<(), DataError> {
    for name in listed {
        if keep.contains(name) || !is_plain_shard_name(name) {
            continue;
        }
        let path = dir.join(name);
        if !path.is_file() {
            continue;
        }
        tracing::info!(path = %path.display(), "removing a shard of the earlier run's index");
        std::fs::remove_file(&path).map_err(|source| DataError::Write { path, source })?;
    }
    Ok(())
}

/// A file name of `dir` itself (no separator, no `..`) ending in `.tar`.
pub(crate) fn is_plain_shard_name(name: &str) -> bool {
    name.ends_with(".tar")
        && !name.starts_with('.')
        && !name.contains(['/', '\\'])
        && Path::new(name).file_name().is_some_and(|f| f == name)
}

/// Writes `path` through a synced temporary file and a rename.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), DataError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()
    };
    write().map_err(|source| DataError::Write { path: tmp.clone(), source })?;
    std::fs::rename(&tmp, path).map_err(|source| DataError::Write { path: path.to_owned(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_members(path: &Path, members: &[(&str, &[u8])]) {
        let mut builder = tar::Builder::new(File::create(path).unwrap());
        for (name, data) in members {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_entry_type(tar::EntryType::Regular);
            builder.append_data(&mut header, name, *data).unwrap();
        }
        builder.finish().unwrap();
    }

    #[test]
    fn keys_split_at_the_first_dot_of_the_file_name() {
        assert_eq!(split_key("000123.jpg"), Some(("000123".into(), "jpg".into())));
        assert_eq!(split_key("a.b/000123.Seg.PNG"), Some(("a.b/000123".into(), "seg.png".into())));
        assert_eq!(split_key("noext"), None);
        assert_eq!(split_key("dir/.hidden"), None);
    }

    #[test]
    fn groups_members_by_key_and_reports_bad_samples() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.tar");
        write_members(
            &path,
            &[
                ("a.jpg", b"IMG-A"),
                ("a.txt", b"caption a"),
                ("a.json", b"{}"),
                ("b.png", b"IMG-B"),
                ("b.cls", b" 7\n"),
                ("c.txt", b"no image"),
                ("d.jpg", b"IMG-D"),
                ("d.txt", b"\xff\xfe"),
                ("e.JPEG", b"IMG-E"),
                ("e.cls", b"seven"),
                ("f.jpg", b"IMG-F"),
                ("f.txt", b"ok"),
            ],
        );
        let items: Vec<_> = read_shard(&path).collect();
        assert_eq!(items.len(), 6);
        let a = items[0].as_ref().unwrap();
        assert_eq!(
            (a.key.as_str(), a.image.as_slice(), a.image_ext.as_str()),
            ("a", &b"IMG-A"[..], "jpg")
        );
        assert_eq!(a.caption.as_deref(), Some("caption a"));
        let b = items[1].as_ref().unwrap();
        assert_eq!((b.caption.as_deref(), b.label), (None, Some(7)));
        assert_eq!(items[2].as_ref().unwrap_err().reason, SkipReason::MissingImage);
        assert_eq!(items[3].as_ref().unwrap_err().reason, SkipReason::NonUtf8Caption);
        let e = items[4].as_ref().unwrap_err();
        assert_eq!((e.reason, e.key.as_deref()), (SkipReason::BadLabel, Some("e")));
        assert_eq!(items[5].as_ref().unwrap().key, "f");
    }

    #[test]
    fn truncated_tar_is_an_error_item_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.tar");
        let big = vec![7u8; 5000];
        write_members(&path, &[("a.jpg", &big), ("a.txt", b"x"), ("b.jpg", &big), ("b.txt", b"y")]);
        let bytes = std::fs::read(&path).unwrap();
        // a.jpg takes blocks 0..11, a.txt 11..13, b.jpg's header is block 13.
        let cases: [(usize, Option<&str>); 4] = [
            (512 * 14 + 100, Some("b")), // in b.jpg's data: b is lost, a is whole
            (512 * 13 + 17, None),       // in b.jpg's header: its key is unknown
            (512 * 5, Some("a")),        // in a.jpg's data: a is lost
            (512 * 13, None),            // on a block boundary: reads as a clean end
        ];
        for (cut, lost) in cases {
            std::fs::write(&path, &bytes[..cut]).unwrap();
            let items: Vec<_> = read_shard(&path).collect();
            let whole: Vec<_> =
                items.iter().filter_map(|i| i.as_ref().ok()).map(|s| s.key.as_str()).collect();
            let errors: Vec<_> = items.iter().filter_map(|i| i.as_ref().err()).collect();
            if cut == 512 * 13 {
                assert_eq!((whole, errors.len()), (vec!["a"], 0), "cut {cut}");
                continue;
            }
            assert_eq!(errors.len(), 1, "cut {cut}: {errors:?}");
            assert_eq!(errors[0].reason, SkipReason::TruncatedShard);
            assert_eq!(errors[0].key.as_deref(), lost, "cut {cut}");
            assert!(errors[0].to_string().contains("t.tar"), "{}", errors[0]);
            assert_eq!(whole, if lost == Some("a") { vec![] } else { vec!["a"] }, "cut {cut}");
        }
        // Garbage and a missing file.
        std::fs::write(&path, b"this is not a tar file at all, but it is long enough? no").unwrap();
        let items: Vec<_> = read_shard(&path).collect();
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].as_ref().unwrap_err().reason, SkipReason::UnreadableShard);
        let missing: Vec<_> = read_shard(&dir.path().join("missing.tar")).collect();
        assert_eq!(missing.len(), 1);
        assert_eq!(missing[0].as_ref().unwrap_err().reason, SkipReason::UnreadableShard);
    }

    #[test]
    fn writer_is_atomic_and_readable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("00000.tar");
        let mut w = ShardWriter::create(&path).unwrap();
        w.write_sample("000000000", &[("jpg", b"J0"), ("txt", b"zero")]).unwrap();
        w.write_sample("000000001", &[("jpg", b"J1"), ("txt", b"one"), ("cls", b"3")]).unwrap();
        assert!(!path.exists());
        assert_eq!(w.finish().unwrap(), 2);
        let samples: Vec<_> = read_shard(&path).map(|s| s.unwrap()).collect();
        assert_eq!(samples.len(), 2);
        assert_eq!(samples[1].label, Some(3));
        assert!(!dir.path().join("00000.tar.tmp").exists());
        // An abandoned writer leaves nothing behind.
        let other = dir.path().join("00001.tar");
        let mut w = ShardWriter::create(&other).unwrap();
        w.write_sample("x", &[("jpg", b"J")]).unwrap();
        drop(w);
        assert!(!other.exists() && !dir.path().join("00001.tar.tmp").exists());
    }
}
