//! The NCCL library and the CUDA runtime beside it, opened at run time: the C signatures
//! oxclip calls (nccl.h, cuda_runtime_api.h, with cudarc's argument types), `ncclConfig_t`'s
//! layout, and two tables of functions, each looked up once per process and never unloaded:
//! [`Nccl`] and [`Cudart`]. They are apart so that what needs only the CUDA runtime (the
//! device memory a benchmark reports) works where NCCL is missing.
//!
//! NCCL is looked up here rather than through cudarc's loader, which tries `libnccl.so` and
//! `libnccl.so.<CUDA major>` but not `libnccl.so.2`, the name NCCL installs and PyTorch's
//! wheels load (once libtorch_cuda.so is in the process, so is NCCL, and opening it again
//! returns that copy). `OXCLIP_NCCL=/path/to/libnccl.so.2` points elsewhere. cudart is the
//! copy libtorch already loaded when there is one ([`open_cudart`]): a second copy would have
//! its own device state.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::OnceLock;

use cudarc::nccl::sys::{
    cudaStream_t, ncclComm_t, ncclDataType_t, ncclRedOp_t, ncclResult_t, ncclUniqueId,
};

use super::dist_err;
use crate::error::{Result, TrainError};

type GetUniqueId = unsafe extern "C" fn(*mut ncclUniqueId) -> ncclResult_t;
type CommInitRank =
    unsafe extern "C" fn(*mut ncclComm_t, c_int, ncclUniqueId, c_int) -> ncclResult_t;
type CommInitRankConfig = unsafe extern "C" fn(
    *mut ncclComm_t,
    c_int,
    ncclUniqueId,
    c_int,
    *mut CommConfig,
) -> ncclResult_t;
type AllGather = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    ncclDataType_t,
    ncclComm_t,
    cudaStream_t,
) -> ncclResult_t;
type AllReduce = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    ncclDataType_t,
    ncclRedOp_t,
    ncclComm_t,
    cudaStream_t,
) -> ncclResult_t;
type ReduceScatter = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    ncclDataType_t,
    ncclRedOp_t,
    ncclComm_t,
    cudaStream_t,
) -> ncclResult_t;
type Broadcast = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    ncclDataType_t,
    c_int,
    ncclComm_t,
    cudaStream_t,
) -> ncclResult_t;
type CommDestroy = unsafe extern "C" fn(ncclComm_t) -> ncclResult_t;
type GetErrorString = unsafe extern "C" fn(ncclResult_t) -> *const c_char;
type CommAbort = unsafe extern "C" fn(ncclComm_t) -> ncclResult_t;
type CommGetAsyncError = unsafe extern "C" fn(ncclComm_t, *mut ncclResult_t) -> ncclResult_t;
type CudaSetDevice = unsafe extern "C" fn(c_int) -> c_int;
/// `cudaEvent_t` is an opaque pointer.
pub(super) type CudaEvent = *mut c_void;
type CudaEventCreateWithFlags = unsafe extern "C" fn(*mut CudaEvent, u32) -> c_int;
type CudaEventRecord = unsafe extern "C" fn(CudaEvent, cudaStream_t) -> c_int;
type CudaEventQuery = unsafe extern "C" fn(CudaEvent) -> c_int;
type CudaEventDestroy = unsafe extern "C" fn(CudaEvent) -> c_int;
type CudaStreamCreateWithFlags = unsafe extern "C" fn(*mut cudaStream_t, u32) -> c_int;
type CudaStreamWaitEvent = unsafe extern "C" fn(cudaStream_t, CudaEvent, u32) -> c_int;
type CudaStreamDestroy = unsafe extern "C" fn(cudaStream_t) -> c_int;
type CudaMemGetInfo = unsafe extern "C" fn(*mut usize, *mut usize) -> c_int;

/// `ncclConfig_t` as NCCL 2.18 lays it out (nccl.h). NCCL copies only the first `size` bytes
/// over its own `NCCL_CONFIG_INITIALIZER` defaults and ignores what its `version` predates,
/// so this prefix works with any NCCL from 2.14 (the first with `blocking`) on: a newer one
/// keeps its defaults for the fields added since.
#[repr(C)]
pub(super) struct CommConfig {
    size: usize,
    magic: u32,
    version: u32,
    blocking: c_int,
    cga_cluster_size: c_int,
    min_ctas: c_int,
    max_ctas: c_int,
    net_name: *const c_char,
    split_share: c_int,
}

/// `NCCL_CONFIG_UNDEF_INT`: "NCCL's default" for an int field.
const CONFIG_UNDEF_INT: c_int = c_int::MIN;

impl CommConfig {
    /// `NCCL_CONFIG_INITIALIZER` with `blocking = 0`: init returns at once and is polled, so
    /// the wait for the other ranks has a deadline.
    pub(super) fn non_blocking() -> Self {
        Self {
            size: std::mem::size_of::<Self>(),
            magic: 0xcafe_beef,
            // NCCL_VERSION(2, 18, 0).
            version: 21800,
            blocking: 0,
            cga_cluster_size: CONFIG_UNDEF_INT,
            min_ctas: CONFIG_UNDEF_INT,
            max_ctas: CONFIG_UNDEF_INT,
            net_name: std::ptr::null(),
            split_share: CONFIG_UNDEF_INT,
        }
    }
}

/// The NCCL functions oxclip calls, from one opened library.
pub(super) struct Nccl {
    _lib: libloading::Library,
    pub(super) get_unique_id: GetUniqueId,
    pub(super) comm_init_rank: CommInitRank,
    /// NCCL 2.14 and later; without it, the blocking init runs on a helper thread.
    pub(super) comm_init_rank_config: Option<CommInitRankConfig>,
    pub(super) all_gather: AllGather,
    pub(super) all_reduce: AllReduce,
    pub(super) reduce_scatter: ReduceScatter,
    pub(super) broadcast: Broadcast,
    pub(super) comm_destroy: CommDestroy,
    pub(super) comm_abort: CommAbort,
    pub(super) comm_get_async_error: CommGetAsyncError,
    pub(super) get_error_string: GetErrorString,
}

/// The CUDA runtime functions oxclip calls, from the one copy of cudart it uses ([`open_cudart`]).
pub(crate) struct Cudart {
    _lib: libloading::Library,
    pub(super) set_device: CudaSetDevice,
    pub(super) event_create: CudaEventCreateWithFlags,
    pub(super) event_record: CudaEventRecord,
    pub(super) event_query: CudaEventQuery,
    pub(super) event_destroy: CudaEventDestroy,
    pub(super) stream_create: CudaStreamCreateWithFlags,
    pub(super) stream_wait_event: CudaStreamWaitEvent,
    pub(super) stream_destroy: CudaStreamDestroy,
    mem_get_info: CudaMemGetInfo,
}

/// Opens the first of `names` that loads.
fn open_first(names: &[String]) -> std::result::Result<libloading::Library, String> {
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
/// signature), or the error naming the symbol.
macro_rules! sym {
    ($lib:expr, $name:literal) => {
        *$lib.get(concat!($name, "\0").as_bytes()).map_err(|e| format!("{}: {e}", $name))?
    };
}

impl Nccl {
    fn load() -> std::result::Result<Nccl, String> {
        let mut names: Vec<String> =
            std::env::var("OXCLIP_NCCL").ok().filter(|p| !p.is_empty()).into_iter().collect();
        names.extend(["libnccl.so.2".to_owned(), "libnccl.so".to_owned()]);
        Self::load_from(&names)
    }

    /// NCCL from the first of `names` that opens.
    fn load_from(names: &[String]) -> std::result::Result<Nccl, String> {
        let lib = open_first(names).map_err(|e| {
            format!(
                "NCCL not found ({e}); install it (e.g. `pip install nvidia-nccl-cu13`, or it \
                 comes with PyTorch's CUDA wheels), set OXCLIP_NCCL=/path/to/libnccl.so.2, or use \
                 dist.backend: cpu"
            )
        })?;
        // SAFETY: the symbol types are NCCL's C signatures (nccl.h), with cudarc's definitions
        // of the argument types; the library is kept in the table, so the pointers stay valid
        // as long as it.
        unsafe {
            Ok(Nccl {
                get_unique_id: sym!(lib, "ncclGetUniqueId"),
                comm_init_rank: sym!(lib, "ncclCommInitRank"),
                comm_init_rank_config: lib.get(b"ncclCommInitRankConfig\0").ok().map(|f| *f),
                all_gather: sym!(lib, "ncclAllGather"),
                all_reduce: sym!(lib, "ncclAllReduce"),
                reduce_scatter: sym!(lib, "ncclReduceScatter"),
                broadcast: sym!(lib, "ncclBroadcast"),
                comm_destroy: sym!(lib, "ncclCommDestroy"),
                comm_abort: sym!(lib, "ncclCommAbort"),
                comm_get_async_error: sym!(lib, "ncclCommGetAsyncError"),
                get_error_string: sym!(lib, "ncclGetErrorString"),
                _lib: lib,
            })
        }
    }

    /// The table, loaded on first use and kept (never unloaded) for the process's life.
    pub(super) fn get() -> Result<&'static Nccl> {
        static NCCL: OnceLock<std::result::Result<Nccl, String>> = OnceLock::new();
        NCCL.get_or_init(Nccl::load).as_ref().map_err(|e| dist_err(e.clone()))
    }

    pub(super) fn check(&self, what: &str, result: ncclResult_t) -> Result<()> {
        if result == ncclResult_t::ncclSuccess {
            return Ok(());
        }
        Err(self.error(what, result))
    }

    pub(super) fn error(&self, what: &str, result: ncclResult_t) -> TrainError {
        dist_err(self.describe(what, result))
    }

    /// `result` of the NCCL call `what`, in words: "NCCL what: NCCL's text (code)".
    pub(super) fn describe(&self, what: &str, result: ncclResult_t) -> String {
        // SAFETY: ncclGetErrorString takes any result code and returns a static
        // NUL-terminated string.
        let text = unsafe { CStr::from_ptr((self.get_error_string)(result)) }.to_string_lossy();
        format!("NCCL {what}: {text} ({result:?})")
    }
}

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
                _lib: lib,
            })
        }
    }

    /// The table, loaded on first use and kept (never unloaded) for the process's life. Call
    /// it once libtorch's CUDA backend is loaded, so that its cudart is the one found.
    pub(crate) fn get() -> Result<&'static Cudart> {
        static CUDART: OnceLock<std::result::Result<Cudart, String>> = OnceLock::new();
        CUDART.get_or_init(Cudart::load).as_ref().map_err(|e| dist_err(e.clone()))
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_nccl_says_what_to_do() {
        // A library that cannot be opened (whether or not this machine has NCCL elsewhere)
        // gets a message that says what to do.
        let missing = Nccl::load_from(&["/nonexistent/oxclip-test/libnccl.so.2".to_owned()])
            .err()
            .unwrap_or_default();
        assert!(missing.contains("NCCL not found"), "{missing}");
        assert!(
            missing.contains("OXCLIP_NCCL") && missing.contains("dist.backend: cpu"),
            "{missing}"
        );
        // The message names every file tried, in order, with the loader's reason.
        let tried =
            ["/nonexistent/oxclip-test/a/libnccl.so.2", "/nonexistent/oxclip-test/b/libnccl.so"]
                .map(String::from);
        let both = Nccl::load_from(&tried).err().unwrap_or_default();
        let (a, b) = (both.find(tried[0].as_str()), both.find(tried[1].as_str()));
        assert!(a.is_some() && b.is_some() && a < b, "{both}");
        // A library that opens but is not NCCL (the C library) is refused, and not as missing:
        // load_from does not take the first file that opens on trust.
        let not_nccl = Nccl::load_from(&["libc.so.6".to_owned()]).err().unwrap_or_default();
        assert!(!not_nccl.is_empty() && !not_nccl.contains("NCCL not found"), "{not_nccl}");
        assert!(not_nccl.contains("ncclGetUniqueId"), "{not_nccl}");
    }

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

    #[test]
    fn comm_config_has_nccl_h_layout() {
        // ncclConfig_t's fields up to splitShare, at nccl.h's offsets on a 64-bit target.
        use std::mem::{offset_of, size_of};
        assert_eq!(
            [
                offset_of!(CommConfig, magic),
                offset_of!(CommConfig, version),
                offset_of!(CommConfig, blocking),
                offset_of!(CommConfig, max_ctas)
            ],
            [8, 12, 16, 28]
        );
        assert_eq!(
            [
                offset_of!(CommConfig, net_name),
                offset_of!(CommConfig, split_share),
                size_of::<CommConfig>()
            ],
            [32, 40, 48]
        );
        let c = CommConfig::non_blocking();
        assert_eq!(
            (c.size, c.magic, c.version, c.blocking, c.min_ctas),
            (48, 0xcafebeef, 21800, 0, i32::MIN)
        );
    }
}
