//! The zip format of `torch.save` (PyTorch 1.6 and later), which TorchScript archives share:
//! one folder (`archive/`, or the file's stem) holding `data.pkl` (the object, pickle
//! protocol 2), `data/<key>` (each storage's raw bytes, uncompressed), `byteorder` (`little`
//! or `big`; absent means little) and `version`. A persistent id in `data.pkl` names a
//! storage: `('storage', torch.FloatStorage, key, location, numel)`. TorchScript archives add
//! `code/` (the module's source, never read here) and `constants.pkl` (the traced graph's
//! constants, which are not weights: torch's own `state_dict()` has none of them either).

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};

use zip::result::ZipError;
use zip::{CompressionMethod, ZipArchive};

use super::unpickle::{self, StorageRef, StorageTable, Value};
use super::{Format, Opened, Storages};

/// The most `data.pkl` may hold: a state dict's pickle is a few hundred bytes per tensor, so
/// even the largest models' stay far below; more is damage or a zip bomb.
const MAX_PICKLE_BYTES: u64 = 256 << 20;
/// The most the compressed members of one file may inflate to, all together. torch writes
/// every member stored (uncompressed); a compressed one is someone else's re-zipping, read
/// within this budget so that a zip bomb is refused before it is inflated.
const MAX_INFLATED_BYTES: u64 = 256 << 20;
/// Deflate's best ratio is about 1032:1; a member claiming more is forged.
const MAX_DEFLATE_RATIO: u64 = 1032;

/// Whether `file` is a zip of `torch.jit.save`'s.
pub(super) fn is_torchscript(file: File) -> bool {
    let Ok(zip) = ZipArchive::new(BufReader::new(file)) else { return false };
    prefix(&zip).is_ok_and(|prefix| torchscript(&zip, &prefix))
}

fn torchscript(zip: &ZipArchive<BufReader<File>>, prefix: &str) -> bool {
    let (constants, code) = (format!("{prefix}/constants.pkl"), format!("{prefix}/code/"));
    zip.file_names().any(|n| n == constants || n.starts_with(&code))
}

pub(super) fn open(file: File) -> Result<Opened, String> {
    let file_len = file.metadata().map_err(|e| e.to_string())?.len();
    let mut zip = ZipArchive::new(BufReader::new(file)).map_err(zip_message)?;
    let prefix = prefix(&zip)?;
    let torchscript = torchscript(&zip, &prefix);
    let mut budget = MAX_INFLATED_BYTES;
    let byteorder = match zip.by_name(&format!("{prefix}/byteorder")) {
        Ok(member) => {
            let bytes = read_member(member, 16, file_len, &mut budget)?;
            String::from_utf8_lossy(&bytes).trim().to_owned()
        }
        Err(ZipError::FileNotFound) => "little".to_owned(),
        Err(e) => return Err(zip_message(e)),
    };
    let big_endian = match byteorder.as_str() {
        "little" => false,
        "big" => true,
        other => return Err(format!("byteorder {other:?}: neither little nor big")),
    };
    let pickle = {
        let member = zip.by_name(&format!("{prefix}/data.pkl")).map_err(zip_message)?;
        read_member(member, MAX_PICKLE_BYTES, file_len, &mut budget)?
    };
    // Each storage's member size, to check every persistent id against before anything is
    // read; one StorageRef per key, so that views of one storage share it.
    let sizes: HashMap<String, u64> = (0..zip.len())
        .filter_map(|i| zip.by_index_raw(i).ok().map(|m| (m.name().to_owned(), m.size())))
        .collect();
    let data = format!("{prefix}/data/");
    let mut storages = StorageTable::default();
    let mut persistent = |pid: Value| {
        storages.name(&pid, false, |kind, key, numel| {
            let member = format!("{data}{key}");
            let size = *sizes
                .get(&member)
                .ok_or_else(|| format!("storage {key} has no member {member} in the archive"))?;
            let wanted = numel.checked_mul(kind.element_size());
            if wanted != Some(size) {
                return Err(format!(
                    "storage {key} is declared as {numel} {} elements ({} bytes), and {member} holds {size} bytes: damaged",
                    kind.name,
                    wanted.map_or_else(|| "too many".to_owned(), |w| w.to_string())
                ));
            }
            Ok(())
        })
    };
    let root = unpickle::load(pickle.as_slice(), pickle.len() as u64, torchscript, &mut persistent)
        .map_err(|e| format!("{prefix}/data.pkl: {e}"))?;
    let format = if torchscript { Format::TorchScript } else { Format::Zip };
    Ok(Opened {
        format,
        root,
        storages: Box::new(ZipStorages { zip, data, file_len, budget }),
        big_endian,
    })
}

/// The one top-level folder holding `data.pkl`.
fn prefix(zip: &ZipArchive<BufReader<File>>) -> Result<String, String> {
    let mut found: Vec<&str> = zip
        .file_names()
        .filter_map(|n| n.strip_suffix("/data.pkl"))
        .filter(|p| !p.is_empty() && !p.contains('/'))
        .collect();
    found.sort_unstable();
    match found.as_slice() {
        [one] => Ok((*one).to_owned()),
        [] => Err(
            "a zip without a top-level <name>/data.pkl: not a file torch.save or torch.jit.save wrote"
                .into(),
        ),
        many => Err(format!("a zip with {} data.pkl folders ({})", many.len(), many.join(", "))),
    }
}

/// A member's bytes, at most `max` of them: stored members must lie inside the file,
/// compressed ones claim no more than deflate can give and stay within `budget` (what is
/// left of [`MAX_INFLATED_BYTES`]). Reading stops at the declared size, and the CRC is
/// checked.
fn read_member(
    mut member: zip::read::ZipFile<'_>,
    max: u64,
    file_len: u64,
    budget: &mut u64,
) -> Result<Vec<u8>, String> {
    let size = member.size();
    check_member(&member, file_len, budget)?;
    if size > max {
        return Err(format!("{} declares {size} bytes, over the {max} allowed", member.name()));
    }
    read_exactly(&mut member, size)
}

fn check_member(
    member: &zip::read::ZipFile<'_>,
    file_len: u64,
    budget: &mut u64,
) -> Result<(), String> {
    let (size, packed, name) = (member.size(), member.compressed_size(), member.name());
    match member.compression() {
        CompressionMethod::Stored => {
            let end = member.data_start().checked_add(size);
            if size != packed || end.is_none_or(|end| end > file_len) {
                return Err(format!(
                    "{name} declares {size} bytes past the end of the file ({file_len} bytes): truncated or damaged"
                ));
            }
        }
        CompressionMethod::Deflated => {
            if size > packed.saturating_mul(MAX_DEFLATE_RATIO).saturating_add(1024) {
                return Err(format!(
                    "{name} declares {size} bytes inflated from {packed}, more than deflate can give: a forged size (zip bomb)"
                ));
            }
            if size > *budget {
                return Err(format!(
                    "{name} is compressed and inflates to {size} bytes, over what oxclip inflates from one file ({MAX_INFLATED_BYTES} bytes in all): a zip bomb? (torch.save writes its members uncompressed)"
                ));
            }
            *budget -= size;
        }
        other => {
            return Err(format!("{name} is compressed with {other:?}, which torch never uses"))
        }
    }
    Ok(())
}

/// Exactly `size` bytes of `member`, then its end (where the zip crate checks the CRC).
fn read_exactly(member: &mut zip::read::ZipFile<'_>, size: u64) -> Result<Vec<u8>, String> {
    let name = member.name().to_owned();
    let len = usize::try_from(size).map_err(|_| format!("{name} is too large"))?;
    let mut buf = vec![0u8; len];
    member.read_exact(&mut buf).map_err(|e| format!("{name}: truncated or damaged ({e})"))?;
    let mut rest = [0u8; 1];
    match member.read(&mut rest) {
        Ok(0) => Ok(buf),
        Ok(_) => Err(format!("{name} holds more than its declared {size} bytes: damaged")),
        Err(e) => Err(format!("{name}: damaged ({e})")),
    }
}

struct ZipStorages {
    zip: ZipArchive<BufReader<File>>,
    /// `<prefix>/data/`.
    data: String,
    file_len: u64,
    budget: u64,
}

impl Storages for ZipStorages {
    fn read(&mut self, storage: &StorageRef) -> Result<Vec<u8>, String> {
        let name = format!("{}{}", self.data, storage.key);
        let mut member = self.zip.by_name(&name).map_err(zip_message)?;
        check_member(&member, self.file_len, &mut self.budget)?;
        // Checked when the persistent id was read; the sizes are the archive's own.
        let size = member.size();
        read_exactly(&mut member, size)
    }
}

fn zip_message(e: ZipError) -> String {
    match e {
        ZipError::Io(io) => format!("truncated or unreadable ({io})"),
        ZipError::InvalidArchive(why) => format!("a damaged or truncated zip ({why})"),
        ZipError::UnsupportedArchive(why) => format!("a zip oxclip cannot read ({why})"),
        ZipError::FileNotFound => "a zip without the member torch.save writes".into(),
    }
}
