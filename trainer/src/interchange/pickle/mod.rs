//! PyTorch's pickled files, read without running them: what `torch.save` writes (the zip
//! format since PyTorch 1.6, `torch_zip.rs`; the legacy format before it, `legacy.rs`) and
//! TorchScript archives (`torchscript.rs`: OpenAI's `clip.load` files). A pickle is a
//! program for Python's unpickler, and unpickling one with Python runs whatever it names; the
//! machine in `unpickle.rs` runs the same opcodes over an allow-list instead (tensors, their
//! storages, `OrderedDict`, plain values; TorchScript's module objects as plain attributes),
//! as `torch.load(weights_only=True)` does, and refuses any other global by name.
//!
//! Every size a file declares is checked before it is allocated: pickle lengths against the
//! bytes left, each storage's size against its archive member (or, in the legacy format, its
//! header and the file's length), each tensor against its storage, compressed members against
//! what deflate can produce and a budget. A storage is read only when a tensor of it is asked
//! for, once, and every tensor of it is a view of it (tied and sliced tensors come out as
//! they were saved).
//!
//! [`TorchFile::open`] tells the formats apart; [`TorchFile::state_dict`] gives the weights
//! by name, from wherever the file keeps them (the object itself, its `state_dict` entry as
//! open_clip's training checkpoints have, or a TorchScript module's attributes).

mod legacy;
mod torch_zip;
mod torchscript;
mod unpickle;

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use tch::Tensor;

pub use unpickle::{Dict, TensorRef, Value};

use crate::error::{Result, TrainError};

/// Which of PyTorch's formats a file is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `torch.save` since PyTorch 1.6: a zip of `<name>/data.pkl` and `<name>/data/<key>`.
    Zip,
    /// `torch.save` before 1.6 (`_use_new_zipfile_serialization=False`): pickles, then the
    /// storages' bytes.
    Legacy,
    /// `torch.jit.save`: a zip whose `data.pkl` pickles the module tree.
    TorchScript,
}

impl Format {
    pub fn describe(self) -> &'static str {
        match self {
            Format::Zip => "a torch.save file",
            Format::Legacy => "a torch.save file in the legacy (pre-1.6) format",
            Format::TorchScript => "a TorchScript archive",
        }
    }
}

/// Whether the file at `path` starts as a PyTorch pickle does: a zip, or a pickle of
/// protocol 2 or later (the legacy format).
pub fn looks_pickled(path: &Path) -> bool {
    let mut head = [0u8; 4];
    let read =
        std::fs::File::open(path).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head));
    read.is_ok() && (head == *b"PK\x03\x04" || (head[0] == 0x80 && (2..=5).contains(&head[1])))
}

/// Whether the file at `path` is a TorchScript archive (a zip with `code/` or
/// `constants.pkl` beside its `data.pkl`), from its zip directory alone.
pub fn is_torchscript(path: &Path) -> bool {
    std::fs::File::open(path).is_ok_and(torch_zip::is_torchscript)
}

/// Where a format keeps its storages' bytes.
trait Storages {
    /// The bytes of `storage` (exactly `numel * element size` of them).
    fn read(&mut self, storage: &unpickle::StorageRef) -> Result<Vec<u8>, String>;
}

/// A PyTorch file, read: its object, and its storages, read on demand.
pub struct TorchFile {
    pub path: PathBuf,
    pub format: Format,
    root: Value,
    storages: RefCell<Box<dyn Storages>>,
    big_endian: bool,
    /// Each storage read so far, as a flat tensor its views share.
    read: RefCell<HashMap<String, Tensor>>,
}

impl TorchFile {
    /// Reads the file's object (nothing of its storages yet); refuses, naming it, any global
    /// outside the allow-list.
    pub fn open(path: &Path) -> Result<Self> {
        let bad = |message: String| TrainError::Weights { path: path.into(), message };
        let mut file = std::fs::File::open(path).map_err(crate::error::io_err(path))?;
        let mut head = [0u8; 4];
        let _ = std::io::Read::read_exact(&mut file, &mut head);
        std::io::Seek::rewind(&mut file).map_err(crate::error::io_err(path))?;
        let opened = if head == *b"PK\x03\x04" {
            torch_zip::open(file).map_err(bad)?
        } else if head[0] == 0x80 {
            legacy::open(file).map_err(bad)?
        } else {
            return Err(bad(
                "neither a zip (torch.save since PyTorch 1.6, TorchScript) nor a pickle (torch.save before 1.6)"
                    .into(),
            ));
        };
        Ok(TorchFile {
            path: path.into(),
            format: opened.format,
            root: opened.root,
            storages: RefCell::new(opened.storages),
            big_endian: opened.big_endian,
            read: RefCell::default(),
        })
    }

    /// The object the file holds.
    pub fn root(&self) -> &Value {
        &self.root
    }

    /// The weights by name, described but not read: a TorchScript module's tensor attributes
    /// (dotted paths), else the dict of tensors the file holds, itself or under `state_dict`.
    pub fn tensor_refs(&self) -> Result<Vec<(String, Rc<TensorRef>)>> {
        let found = match self.format {
            Format::TorchScript => torchscript::attributes(&self.root),
            Format::Zip | Format::Legacy => state_dict_of(&self.root, true),
        };
        found.map_err(|message| TrainError::Weights { path: self.path.clone(), message })
    }

    /// The weights by name ([`TorchFile::tensor_refs`]), read.
    pub fn state_dict(&self) -> Result<BTreeMap<String, Tensor>> {
        self.tensor_refs()?.into_iter().map(|(name, t)| Ok((name, self.tensor(&t)?))).collect()
    }

    /// The tensor `t` describes: a view of its storage, read on first use.
    pub fn tensor(&self, t: &TensorRef) -> Result<Tensor> {
        let storage = &t.storage;
        let flat = {
            let mut read = self.read.borrow_mut();
            match read.get(&storage.key) {
                Some(flat) => flat.shallow_clone(),
                None => {
                    let mut bytes =
                        self.storages.borrow_mut().read(storage).map_err(|message| {
                            TrainError::Weights { path: self.path.clone(), message }
                        })?;
                    if self.big_endian {
                        let size = storage.kind.element_size() as usize;
                        bytes.chunks_exact_mut(size.max(1)).for_each(<[u8]>::reverse);
                    }
                    let numel = i64::try_from(storage.numel).map_err(|_| TrainError::Weights {
                        path: self.path.clone(),
                        message: format!("storage {} is too large", storage.key),
                    })?;
                    let flat = Tensor::f_from_data_size(&bytes, &[numel], storage.kind.kind)?;
                    read.insert(storage.key.clone(), flat.shallow_clone());
                    flat
                }
            }
        };
        Ok(flat.f_as_strided(t.size.as_slice(), t.stride.as_slice(), t.offset)?)
    }
}

/// What a format's `open` found.
struct Opened {
    format: Format,
    root: Value,
    storages: Box<dyn Storages>,
    big_endian: bool,
}

/// The tensors of a state dict: `v` itself when it is a dict of tensors, else (one level
/// down, when `nested`) its `state_dict` entry, as open_clip's training checkpoints keep it.
fn state_dict_of(v: &Value, nested: bool) -> Result<Vec<(String, Rc<TensorRef>)>, String> {
    let Value::Dict(dict) = v else {
        return Err(format!("holds {}, not a state dict (a dict of tensors)", unpickle::kind(v)));
    };
    let dict = dict.borrow();
    if nested {
        if let Some(inner) = dict.get("state_dict") {
            return state_dict_of(inner, false).map_err(|e| format!("its state_dict {e}"));
        }
    }
    let mut out = Vec::with_capacity(dict.items.len());
    for (k, v) in &dict.items {
        let Value::Str(name) = k else {
            return Err(format!("holds a dict keyed by {}, not a state dict", unpickle::kind(k)));
        };
        match v {
            Value::Tensor(t) => out.push((name.to_string(), t.clone())),
            other if out.is_empty() && nested => {
                let keys: Vec<String> = dict
                    .items
                    .iter()
                    .take(8)
                    .map(|(k, _)| match k {
                        Value::Str(s) => s.to_string(),
                        other => unpickle::kind(other),
                    })
                    .collect();
                return Err(format!(
                    "holds a dict of {} entries ({}{}), neither a state dict nor one with a state_dict entry ({name} is {})",
                    dict.items.len(),
                    keys.join(", "),
                    if dict.items.len() > keys.len() { ", ..." } else { "" },
                    unpickle::kind(other)
                ));
            }
            other => return Err(format!("holds {name} = {}, not a tensor", unpickle::kind(other))),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/pickle")
    }

    fn twin(name: &str) -> BTreeMap<String, Tensor> {
        Tensor::read_safetensors(fixtures().join(name)).unwrap().into_iter().collect()
    }

    /// Every tensor of `got` equals its twin's exactly, in the twin's dtype and shape.
    fn assert_same(got: &BTreeMap<String, Tensor>, want: &BTreeMap<String, Tensor>, what: &str) {
        assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "{what}");
        for (name, w) in want {
            let g = &got[name];
            assert_eq!((g.kind(), g.size()), (w.kind(), w.size()), "{what}: {name}");
            assert!(g.equal(w), "{what}: {name} differs");
        }
    }

    /// Tensors sharing a storage (a slice, a transpose, the same tensor twice) come out as
    /// views of one storage, and every dtype torch writes reads back bit for bit, in both of
    /// torch.save's formats.
    #[test]
    fn views_and_dtypes_of_both_formats() {
        let want = twin("views.safetensors");
        for (file, format) in [("views_zip.pt", Format::Zip), ("views_legacy.pt", Format::Legacy)] {
            let f = TorchFile::open(&fixtures().join(file)).unwrap();
            assert_eq!(f.format, format);
            let got = f.state_dict().unwrap();
            assert_same(&got, &want, file);
            let (m, s) = (&got["matrix"], &got["slice"]);
            assert_eq!(got["tied"].data_ptr(), m.data_ptr(), "{file}: tied");
            assert_eq!(got["transposed"].data_ptr(), m.data_ptr(), "{file}: transposed");
            // m[1:, ::2] starts one row (4 floats) in.
            assert_eq!(s.data_ptr() as usize, m.data_ptr() as usize + 16, "{file}: slice");
            assert_eq!(s.stride(), [4, 2]);
            assert_eq!(got["bf16"].kind(), Kind::BFloat16);
            assert_eq!(got["scalar"].size(), Vec::<i64>::new());
        }
    }

    /// open_clip's state_dict as torch.save writes it, zip and legacy, and inside
    /// open_clip_train's checkpoint (with DDP's `module.` prefixes, beside the optimizer).
    #[test]
    fn open_clip_state_dicts_in_every_container() {
        let want = twin("open_clip.safetensors");
        for file in ["open_clip_zip.pt", "open_clip_legacy.pt"] {
            let got = TorchFile::open(&fixtures().join(file)).unwrap().state_dict().unwrap();
            assert_same(&got, &want, file);
        }
        let epoch = TorchFile::open(&fixtures().join("epoch_3.pt")).unwrap();
        let Value::Dict(root) = epoch.root() else { panic!("not a dict") };
        assert!(matches!(root.borrow().get("epoch"), Some(Value::Int(3))));
        let got: BTreeMap<String, Tensor> = epoch
            .state_dict()
            .unwrap()
            .into_iter()
            .map(|(k, v)| (k.strip_prefix("module.").unwrap().to_owned(), v))
            .collect();
        assert_same(&got, &twin("epoch_3.safetensors"), "epoch_3.pt");
    }

    /// A TorchScript archive as OpenAI's clip.load files are: the module tree's tensor
    /// attributes by dotted name, fp16 where the file has fp16, nothing of its code run.
    #[test]
    fn torchscript_module_tree_as_a_state_dict() {
        let f = TorchFile::open(&fixtures().join("openai_vit.pt")).unwrap();
        assert_eq!(f.format, Format::TorchScript);
        let mut got = f.state_dict().unwrap();
        for key in ["input_resolution", "context_length", "vocab_size"] {
            assert_eq!(got.remove(key).unwrap().kind(), Kind::Int64, "{key}");
        }
        let want = twin("openai_vit.safetensors");
        assert_same(&got, &want, "openai_vit.pt");
        assert_eq!(got["visual.conv1.weight"].kind(), Kind::Half);
        assert_eq!(got["ln_final.weight"].kind(), Kind::Float);
    }

    #[test]
    fn hugging_face_pytorch_model_bin() {
        let got = TorchFile::open(&fixtures().join("hf/pytorch_model.bin"))
            .unwrap()
            .state_dict()
            .unwrap();
        assert_same(&got, &twin("hf.safetensors"), "hf/pytorch_model.bin");
    }

    /// A dict without a state dict, and files that are no pickle at all, read as sentences.
    #[test]
    fn what_is_not_a_state_dict_is_described() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.pt");
        // A zip whose data.pkl is pickle.dumps({"epoch": 3, "name": "x"}, 2).
        {
            let file = std::fs::File::create(&path).unwrap();
            let mut zip = zip::ZipWriter::new(file);
            let stored = zip::write::FileOptions::default()
                .compression_method(zip::CompressionMethod::Stored);
            zip.start_file("archive/data.pkl", stored).unwrap();
            std::io::Write::write_all(
                &mut zip,
                b"\x80\x02}q\x00(X\x05\x00\x00\x00epochq\x01K\x03X\x04\x00\x00\x00nameq\x02X\x01\x00\x00\x00xq\x03u.",
            )
            .unwrap();
            zip.finish().unwrap();
        }
        let f = TorchFile::open(&path).unwrap();
        let err = f.state_dict().unwrap_err().to_string();
        assert!(err.contains("(epoch, name)") && err.contains("neither a state dict"), "{err}");
        std::fs::write(&path, b"hello").unwrap();
        let err = TorchFile::open(&path).err().unwrap().to_string();
        assert!(err.contains("neither a zip"), "{err}");
    }
}
