//! safetensors, the container oxclip writes (checkpoints, their optimizer state, exports, the
//! embeddings `oxclip embed` writes) and reads in every layout. PyTorch's pickled files are
//! read beside it, by `pickle/`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use tch::{Kind, Tensor};

use crate::error::{Result, TrainError};

/// Every tensor of a safetensors file, by name. Read here rather than through tch so that a
/// failure reads as one sentence ("Is a directory (os error 21)", "not a safetensors file")
/// instead of the safetensors crate's debug text.
pub fn read_safetensors(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let bytes = std::fs::read(path).map_err(crate::error::io_err(path))?;
    let bad = |message: String| TrainError::Weights { path: path.into(), message };
    let file =
        safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(safetensors_message(&e)))?;
    let mut out = BTreeMap::new();
    for (name, view) in file.tensors() {
        let size: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let kind = kind_of(view.dtype()).ok_or_else(|| {
            bad(format!("{name} has dtype {:?}, which oxclip does not load", view.dtype()))
        })?;
        out.insert(name, Tensor::f_from_data_size(view.data(), &size, kind)?);
    }
    Ok(out)
}

fn kind_of(dtype: safetensors::Dtype) -> Option<Kind> {
    use safetensors::Dtype;
    Some(match dtype {
        Dtype::BOOL => Kind::Bool,
        Dtype::U8 => Kind::Uint8,
        Dtype::I8 => Kind::Int8,
        Dtype::I16 => Kind::Int16,
        Dtype::I32 => Kind::Int,
        Dtype::I64 => Kind::Int64,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F16 => Kind::Half,
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        _ => return None,
    })
}

fn safetensors_message(e: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::IoError(io) => io.to_string(),
        E::JsonError(json) => {
            format!("not a safetensors file: its header is not valid JSON ({json})")
        }
        E::HeaderTooSmall
        | E::InvalidHeaderLength
        | E::InvalidHeaderStart
        | E::InvalidHeader
        | E::InvalidHeaderDeserialization => {
            "not a safetensors file: it does not start with a safetensors header".to_owned()
        }
        E::HeaderTooLarge => "not a safetensors file: its header length is over 100 MB".to_owned(),
        E::InvalidOffset(name) => {
            format!("damaged or truncated: the data of {name} lies outside the file")
        }
        E::MetadataIncompleteBuffer
        | E::TensorInvalidInfo
        | E::InvalidTensorView(..)
        | E::ValidationOverflow => {
            "damaged or truncated: the tensors it lists do not fit its size".to_owned()
        }
        E::TensorNotFound(name) => format!("no tensor {name}"),
    }
}

/// fp32 safetensors with `{"format": "pt"}` metadata (transformers refuses files without it)
/// and any `extra` metadata. Integer tensors (BatchNorm's `num_batches_tracked`) are written
/// as int64, the dtype PyTorch's `load_state_dict` expects.
pub fn write_safetensors(
    tensors: &BTreeMap<String, Tensor>,
    extra: Option<HashMap<String, String>>,
    path: &Path,
) -> Result<()> {
    let mut data = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let (dtype, bytes) = if t.is_floating_point() {
            (safetensors::Dtype::F32, crate::bytes::f32_le_bytes(t)?)
        } else {
            (safetensors::Dtype::I64, crate::bytes::i64_le_bytes(t)?)
        };
        let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        data.push((name.clone(), dtype, shape, bytes));
    }
    let views = data
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes)
                .map(|view| (name.clone(), view))
                .map_err(|e| TrainError::Weights {
                    path: path.into(),
                    message: format!("{name}: {e}"),
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let mut metadata = extra.unwrap_or_default();
    metadata.insert("format".to_owned(), "pt".to_owned());
    safetensors::tensor::serialize_to_file(views, &Some(metadata), path)
        .map_err(|e| TrainError::Weights { path: path.into(), message: e.to_string() })
}

/// Whether the file at `path` starts as a safetensors file does: an 8-byte header length,
/// then the JSON header.
pub(super) fn looks_safetensors(path: &Path) -> bool {
    let mut head = [0u8; 9];
    let read =
        std::fs::File::open(path).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head));
    read.is_ok() && head[8] == b'{'
}
