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

/// The safetensors dtype a tensor of `kind` is stored as; `None` for kinds safetensors has
/// no dtype for (complex numbers, quantized kinds).
fn dtype_of(kind: Kind) -> Option<safetensors::Dtype> {
    use safetensors::Dtype;
    Some(match kind {
        Kind::Bool => Dtype::BOOL,
        Kind::Uint8 => Dtype::U8,
        Kind::Int8 => Dtype::I8,
        Kind::Int16 => Dtype::I16,
        Kind::Int => Dtype::I32,
        Kind::Int64 => Dtype::I64,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Half => Dtype::F16,
        Kind::Float => Dtype::F32,
        Kind::Double => Dtype::F64,
        _ => return None,
    })
}

/// Writes `tensors` as a safetensors file to `out`, each in its own kind (fp32, bf16, int64),
/// with no metadata and the tensors ordered as the safetensors crate orders them (widest
/// dtype first, then by name): byte for byte what tch's `Tensor::write_safetensors` writes.
/// Unlike that, the caller owns the file, so a failed write keeps the OS's error (`No space
/// left on device`, `File too large`) instead of arriving as text, and the caller can fsync
/// it. One tensor's bytes are in memory at a time, beside the tensors themselves.
pub fn write_tensors_to(
    tensors: &[(String, Tensor)],
    out: &mut impl std::io::Write,
) -> std::io::Result<()> {
    use std::io::Error;
    let mut order = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let kind = t.f_kind().map_err(Error::other)?;
        let dtype = dtype_of(kind).ok_or_else(|| {
            Error::other(format!("{name} is a {kind:?} tensor, which safetensors cannot hold"))
        })?;
        order.push((dtype, name, t));
    }
    order.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    // The header: a JSON object in that order (serde_json's maps would sort the keys).
    let mut header = String::from("{");
    let mut offset = 0usize;
    for (i, (dtype, name, t)) in order.iter().enumerate() {
        let bytes = t.numel() * dtype.size();
        let info = safetensors::tensor::TensorInfo {
            dtype: *dtype,
            shape: t.size().iter().map(|&d| d as usize).collect(),
            data_offsets: (offset, offset + bytes),
        };
        offset += bytes;
        if i > 0 {
            header.push(',');
        }
        header.push_str(&serde_json::to_string(name.as_str()).map_err(Error::other)?);
        header.push(':');
        header.push_str(&serde_json::to_string(&info).map_err(Error::other)?);
    }
    header.push('}');
    // Padded with spaces to a multiple of 8 bytes, so that the data starts aligned.
    let padded = header.len().div_ceil(8) * 8;
    let mut header = header.into_bytes();
    header.resize(padded, b' ');
    out.write_all(&(header.len() as u64).to_le_bytes())?;
    out.write_all(&header)?;
    let mut buf = Vec::new();
    for (dtype, _, t) in &order {
        let numel = t.numel();
        buf.resize(numel * dtype.size(), 0);
        t.f_copy_data_u8(&mut buf, numel).map_err(Error::other)?;
        out.write_all(&buf)?;
    }
    Ok(())
}

/// Whether the file at `path` starts as a safetensors file does: an 8-byte header length,
/// then the JSON header.
pub(super) fn looks_safetensors(path: &Path) -> bool {
    let mut head = [0u8; 9];
    let read =
        std::fs::File::open(path).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head));
    read.is_ok() && head[8] == b'{'
}
