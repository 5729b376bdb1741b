//! The CUDA runtime (cudart), opened at run time, once, and never unloaded: the functions
//! oxclip calls (cuda_runtime_api.h's signatures) in one table, [`Cudart`]. It is the copy
//! libtorch already loaded when there is one ([`open_cudart`]): a second copy would have its
//! own device state. The device memory a benchmark reports needs only this; the NCCL backend
//! (crate::collectives::nccl) orders its streams and events through it too.

use std::ffi::{c_int, c_void, CStr};
use std::sync::OnceLock;

use cudarc::nccl::sys::cudaStream_t;

use crate::error::{Result, TrainError};

type CudaSetDevice = unsafe extern "C" fn(c_int) -> c_int;
/// `cudaEvent_t` is an opaque pointer.
pub(crate) type CudaEvent = *mut c_void;
type CudaEventCreateWithFlags = unsafe extern "C" fn(*mut CudaEvent, u32) -> c_int;
type CudaEventRecord = unsafe extern "C" fn(CudaEvent, cudaStream_t) -> c_int;
type CudaEventQuery = unsafe extern "C" fn(CudaEvent) -> c_int;
type CudaEventDestroy = unsafe extern "C" fn(CudaEvent) -> c_int;
type CudaStreamCreateWithFlags = unsafe extern "C" fn(*mut cudaStream_t, u32) -> c_int;
type CudaStreamWaitEvent = unsafe extern "C" fn(cudaStream_t, CudaEvent, u32) -> c_int;
type CudaStreamDestroy = unsafe extern "C" fn(cudaStream_t) -> c_int;
type CudaMemGetInfo = unsafe extern "C" fn(*mut usize, *mut usize) -> c_int;
type CudaDeviceGetAttribute = unsafe extern "C" fn(*mut c_int, c_int, c_int) -> c_int;

/// `cudaDevAttrComputeCapabilityMajor` and `...Minor` (driver_types.h).
const ATTR_COMPUTE_CAPABILITY_MAJOR: c_int = 75;
const ATTR_COMPUTE_CAPABILITY_MINOR: c_int = 76;

/// The CUDA runtime functions oxclip calls, from the one copy of cudart it uses ([`open_cudart`]).
pub(crate) struct Cudart {
    _lib: libloading::Library,
    pub(crate) set_device: CudaSetDevice,
    pub(crate) event_create: CudaEventCreateWithFlags,
    pub(crate) event_record: CudaEventRecord,
    pub(crate) event_query: CudaEventQuery,
    pub(crate) event_destroy: CudaEventDestroy,
    pub(crate) stream_create: CudaStreamCreateWithFlags,
    pub(crate) stream_wait_event: CudaStreamWaitEvent,
    pub(crate) stream_destroy: CudaStreamDestroy,
    mem_get_info: CudaMemGetInfo,
    device_get_attribute: CudaDeviceGetAttribute,
}

/// Opens the first of `names` that loads.
pub(crate) fn open_first(names: &[String]) -> std::result::Result<libloading::Library, String> {
    let mut errors = Vec::new();
    for name in names {
        // SAFETY: loading a shared library runs its initialisers; NCCL's and cudart's are
        // the same ones libtorch_cuda.so runs when it loads them.
        match unsafe { libloading::Library::new(name) } {
            Ok(lib) => return Ok(lib),
            Err(e) => errors.push(format!("{name}: {e}")),
        }
    }
    Err(errors.join("; "))
}

/// The CUDA runtime's names, newest first, for a process that has none loaded yet.
const CUDART_NAMES: [&str; 3] = ["libcudart.so.13", "libcudart.so.12", "libcudart.so"];

/// The paths of the shared objects in this process, in load order.
fn loaded_objects() -> Vec<String> {
    unsafe extern "C" fn add(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        data: *mut c_void,
    ) -> c_int {
        // SAFETY: `data` is the Vec passed below, `info` is valid for this call, and
        // `dlpi_name` is NUL-terminated or null.
        unsafe {
            let paths = &mut *(data as *mut Vec<String>);
            let name = (*info).dlpi_name;
            if !name.is_null() {
                paths.push(CStr::from_ptr(name).to_string_lossy().into_owned());
            }
        }
        0
    }
    let mut paths: Vec<String> = Vec::new();
    // SAFETY: the callback only reads `info` and appends to `paths`, which outlives the call.
    unsafe {
        libc::dl_iterate_phdr(Some(add), &mut paths as *mut Vec<String> as *mut c_void);
    }
    paths
}

/// The first CUDA runtime among `loaded` (shared object paths): `libcudart.so.13`, or a
/// wheel's or libtorch's renamed copy such as `libcudart-9335f6a2.so.12`, never another
/// library whose name merely starts so.
fn pick_cudart(loaded: &[String]) -> Option<&str> {
    loaded.iter().map(String::as_str).find(|path| {
        let name = path.rsplit('/').next().unwrap_or(path);
        name.strip_prefix("libcudart").is_some_and(|rest| {
            (rest.starts_with(".so") || rest.starts_with('-')) && rest.contains(".so")
        })
    })
}

/// The CUDA runtime libtorch already loaded, when there is one (opening that very file adds
/// no second copy, whose device state and streams would be separate from libtorch's); else
/// the first of `names` that loads.
fn open_cudart(
    loaded: &[String],
    names: &[String],
) -> std::result::Result<libloading::Library, String> {
    if let Some(path) = pick_cudart(loaded) {
        // SAFETY: the library is already initialised in this process; this only adds a
        // reference to it.
        return unsafe { libloading::Library::new(path) }
            .map_err(|e| format!("the CUDA runtime loaded at {path} cannot be reopened: {e}"));
    }
    tracing::debug!(
        "no CUDA runtime in the process yet; loading it by name ({})",
        names.join(", ")
    );
    open_first(names).map_err(|e| format!("the CUDA runtime is not loadable: {e}"))
}

/// `$name` from `$lib`, as the field's type (an `unsafe` lookup: the caller vouches for the
/// signature), or the error naming the symbol. The NCCL table is looked up with it too.
macro_rules! sym {
    ($lib:expr, $name:literal) => {
        *$lib.get(concat!($name, "\0").as_bytes()).map_err(|e| format!("{}: {e}", $name))?
    };
}
pub(crate) use sym;

impl Cudart {
    fn load() -> std::result::Result<Cudart, String> {
        let lib = open_cudart(&loaded_objects(), &CUDART_NAMES.map(String::from))?;
        // SAFETY: the symbol types are the CUDA runtime's C signatures (cuda_runtime_api.h);
        // the library is kept in the table, so the pointers stay valid as long as it.
        unsafe {
            Ok(Cudart {
                set_device: sym!(lib, "cudaSetDevice"),
                event_create: sym!(lib, "cudaEventCreateWithFlags"),
                event_record: sym!(lib, "cudaEventRecord"),
                event_query: sym!(lib, "cudaEventQuery"),
                event_destroy: sym!(lib, "cudaEventDestroy"),
                stream_create: sym!(lib, "cudaStreamCreateWithFlags"),
                stream_wait_event: sym!(lib, "cudaStreamWaitEvent"),
                stream_destroy: sym!(lib, "cudaStreamDestroy"),
                mem_get_info: sym!(lib, "cudaMemGetInfo"),
                device_get_attribute: sym!(lib, "cudaDeviceGetAttribute"),
                _lib: lib,
            })
        }
    }

    /// The table, loaded on first use and kept (never unloaded) for the process's life. Call
    /// it once libtorch's CUDA backend is loaded, so that its cudart is the one found.
    pub(crate) fn get() -> Result<&'static Cudart> {
        static CUDART: OnceLock<std::result::Result<Cudart, String>> = OnceLock::new();
        CUDART.get_or_init(Cudart::load).as_ref().map_err(|e| TrainError::Device(e.clone()))
    }

    /// Device `index`'s (free, total) bytes, from `cudaMemGetInfo`; `None` on a CUDA error.
    /// Selects that device on the calling thread first, as `cudaMemGetInfo` reports the
    /// current one.
    pub(crate) fn mem_info(&self, index: c_int) -> Option<(usize, usize)> {
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: cudaSetDevice takes any ordinal (an invalid one is an error code); both
        // pointers given to cudaMemGetInfo are valid for the call.
        let status = unsafe {
            match (self.set_device)(index) {
                0 => (self.mem_get_info)(&mut free, &mut total),
                err => err,
            }
        };
        (status == 0).then_some((free, total))
    }

    /// Device `index`'s compute capability (major, minor); `None` on a CUDA error.
    pub(crate) fn compute_capability(&self, index: c_int) -> Option<(i32, i32)> {
        let (mut major, mut minor): (c_int, c_int) = (0, 0);
        // SAFETY: valid out-pointers; an invalid ordinal or attribute is an error code.
        let status = unsafe {
            match (self.device_get_attribute)(&mut major, ATTR_COMPUTE_CAPABILITY_MAJOR, index) {
                0 => (self.device_get_attribute)(&mut minor, ATTR_COMPUTE_CAPABILITY_MINOR, index),
                err => err,
            }
        };
        (status == 0).then_some((major, minor))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cuda_runtime_already_loaded_is_the_one_opened() {
        let paths = |list: &[&str]| list.iter().map(|p| p.to_string()).collect::<Vec<_>>();
        // libtorch's renamed copy, loaded first, wins over a system one loaded later.
        let loaded = paths(&[
            "",
            "linux-vdso.so.1",
            "/lib/x86_64-linux-gnu/libc.so.6",
            "/opt/libtorch/lib/libcudart-9335f6a2.so.12",
            "/usr/local/cuda/lib64/libcudart.so.13",
        ]);
        assert_eq!(pick_cudart(&loaded), Some("/opt/libtorch/lib/libcudart-9335f6a2.so.12"));
        assert_eq!(
            pick_cudart(&paths(&["/x/libc.so.6", "/venv/nvidia/cuda_runtime/lib/libcudart.so.13"])),
            Some("/venv/nvidia/cuda_runtime/lib/libcudart.so.13")
        );
        assert_eq!(pick_cudart(&paths(&["libcudart.so"])), Some("libcudart.so"));
        // Names that only start like it, or no runtime at all: none.
        assert_eq!(
            pick_cudart(&paths(&[
                "/x/libcudart_static.a",
                "/x/libcudartx.so.1",
                "/x/libcudart",
                "/libcudart.so.13/libc.so.6"
            ])),
            None
        );
        assert_eq!(pick_cudart(&[]), None);

        // The walk over this process's objects agrees with the kernel's map of it.
        let walked = loaded_objects();
        assert!(walked.iter().any(|p| p.contains("libc.so")), "{walked:?}");
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let mapped: Vec<String> =
            maps.lines().filter_map(|l| l.split_whitespace().nth(5)).map(String::from).collect();
        assert_eq!(pick_cudart(&walked).is_some(), pick_cudart(&mapped).is_some(), "{walked:?}");

        // Nothing loaded and nothing loadable: the error says what was tried.
        let err = open_cudart(&[], &["/nonexistent/oxclip-test/libcudart.so.13".to_owned()])
            .err()
            .unwrap_or_default();
        assert!(
            err.contains("the CUDA runtime is not loadable")
                && err.contains("/nonexistent/oxclip-test/libcudart.so.13"),
            "{err}"
        );
        // A loaded path is opened as it is (here a stand-in: the C library, loaded in every
        // process).
        let libc_path = walked.iter().find(|p| p.contains("/libc.so")).cloned().unwrap();
        let renamed = [libc_path.replace("libc.so.6", "libcudart-0000.so.6")];
        let err = open_cudart(&renamed, &[]).err().unwrap_or_default();
        assert!(err.contains("libcudart-0000.so.6") && err.contains("cannot be reopened"), "{err}");
    }
}
