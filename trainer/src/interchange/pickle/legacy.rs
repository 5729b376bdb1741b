//! The legacy format of `torch.save` (before PyTorch 1.6, or `_use_new_zipfile_serialization=
//! False`), torch/serialization.py's `_legacy_save`: five pickles one after another (the
//! magic number 0x1950a86a20f9469cfc6c, the protocol version 1001, a dict of system facts
//! with `little_endian`, the object, the list of storage keys in the order their bytes
//! follow), then each storage as its element count (int64, little-endian) and its raw bytes.
//! A persistent id names a storage as `('storage', torch.FloatStorage, key, location, numel,
//! view_metadata)`; views of storages (from before 0.4) are refused.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};

use super::unpickle::{self, StorageRef, StorageTable, Value};
use super::{Format, Opened, Storages};

/// 0x1950a86a20f9469cfc6c as `LONG1` writes it (little-endian).
const MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];
const PROTOCOL_VERSION: i64 = 1001;

pub(super) fn open(file: File) -> Result<Opened, String> {
    let file_len = file.metadata().map_err(|e| e.to_string())?.len();
    let mut reader = Counted { inner: BufReader::new(file), position: 0 };
    let mut none = |_: Value| Err::<Value, String>("a persistent id outside the object".into());
    let next = |reader: &mut Counted,
                persistent: &mut dyn FnMut(Value) -> Result<Value, String>| {
        let left = file_len - reader.position;
        unpickle::load(&mut *reader, left, false, persistent)
    };
    match next(&mut reader, &mut none)? {
        Value::BigInt(b) if *b == MAGIC => {}
        _ => {
            return Err(
                "a pickle that does not start as torch.save's legacy format (its magic number): \
                 not a PyTorch file"
                    .into(),
            )
        }
    }
    match next(&mut reader, &mut none)? {
        Value::Int(PROTOCOL_VERSION) => {}
        other => return Err(format!("legacy protocol version {other:?}, not {PROTOCOL_VERSION}")),
    }
    let big_endian = match next(&mut reader, &mut none)? {
        Value::Dict(info) => matches!(info.borrow().get("little_endian"), Some(Value::Bool(false))),
        _ => return Err("the legacy format's system facts are not a dict".into()),
    };
    let mut storages = StorageTable::default();
    let mut persistent = |pid: Value| storages.name(&pid, true, |_, _, _| Ok(()));
    let root = next(&mut reader, &mut persistent)?;
    let keys = match next(&mut reader, &mut none)? {
        Value::List(keys) => keys.borrow().clone(),
        other => {
            return Err(format!("the legacy format's storage keys are {}", unpickle::kind(&other)))
        }
    };
    // Where each storage's bytes are, every header checked against what the object declared
    // and the file's length, before anything is read.
    let mut at: HashMap<String, u64> = HashMap::new();
    let mut position = reader.position;
    let mut file = reader.inner.into_inner();
    for key in keys {
        let Value::Str(key) = key else { return Err("a storage key that is not a string".into()) };
        let storage = storages
            .0
            .get(&*key)
            .ok_or_else(|| format!("storage {key} is listed but no tensor names it"))?;
        file.seek(SeekFrom::Start(position)).map_err(|e| e.to_string())?;
        let mut header = [0u8; 8];
        file.read_exact(&mut header).map_err(|_| format!("truncated before storage {key}"))?;
        let numel =
            if big_endian { u64::from_be_bytes(header) } else { u64::from_le_bytes(header) };
        if numel != storage.numel {
            return Err(format!(
                "storage {key} is declared as {} elements, and its header says {numel}: damaged",
                storage.numel
            ));
        }
        let bytes = numel.checked_mul(storage.kind.element_size());
        let end = bytes.and_then(|b| b.checked_add(position + 8));
        match end {
            Some(end) if end <= file_len => {
                at.insert(key.to_string(), position + 8);
                position = end;
            }
            _ => {
                return Err(format!(
                    "storage {key} declares {numel} {} elements, past the end of the file ({file_len} bytes): truncated or damaged",
                    storage.kind.name
                ))
            }
        }
    }
    if let Some(key) = storages.0.keys().find(|k| !at.contains_key(*k)) {
        return Err(format!("storage {key} is named but its bytes are not in the file"));
    }
    Ok(Opened {
        format: Format::Legacy,
        root,
        storages: Box::new(LegacyStorages { file, at }),
        big_endian,
    })
}

/// A reader that counts what it has given, so the storages' offset is known after the
/// pickles (whose ends only the pickle machine finds).
struct Counted {
    inner: BufReader<File>,
    position: u64,
}

impl Read for Counted {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.position += n as u64;
        Ok(n)
    }
}

struct LegacyStorages {
    file: File,
    at: HashMap<String, u64>,
}

impl Storages for LegacyStorages {
    fn read(&mut self, storage: &StorageRef) -> Result<Vec<u8>, String> {
        let at = *self.at.get(&storage.key).ok_or("unreachable: an unlisted storage")?;
        // Its size was checked against the file when it was listed.
        let len = storage.numel * storage.kind.element_size();
        let mut buf = vec![0u8; usize::try_from(len).map_err(|_| "too large")?];
        self.file.seek(SeekFrom::Start(at)).map_err(|e| e.to_string())?;
        self.file
            .read_exact(&mut buf)
            .map_err(|e| format!("storage {}: truncated ({e})", storage.key))?;
        Ok(buf)
    }
}
