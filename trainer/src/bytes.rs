//! Tensors as little-endian fp32 bytes: what safetensors files and the CPU collectives carry.

use tch::{Device, Kind, Tensor};

use crate::error::Result;

/// `t`'s values, flattened, as fp32 little-endian bytes (whatever its kind and device).
pub(crate) fn f32_le_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let flat = t.f_to_device(Device::Cpu)?.f_to_kind(Kind::Float)?.f_contiguous()?.f_view([-1])?;
    let values = Vec::<f32>::try_from(&flat)?;
    let mut out = Vec::with_capacity(values.len() * 4);
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    Ok(out)
}

/// `t`'s values, flattened, as int64 little-endian bytes (BatchNorm's `num_batches_tracked`).
pub(crate) fn i64_le_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let flat = t.f_to_device(Device::Cpu)?.f_to_kind(Kind::Int64)?.f_contiguous()?.f_view([-1])?;
    let values = Vec::<i64>::try_from(&flat)?;
    Ok(values.iter().flat_map(|v| v.to_le_bytes()).collect())
}
