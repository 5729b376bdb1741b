//! The NCCL library, opened at run time: the C signatures oxclip calls (nccl.h, with cudarc's
//! argument types), `ncclConfig_t`'s layout, and the function table [`Nccl`], looked up once
//! per process and never unloaded. The CUDA runtime beside it is [`crate::device::cudart`].
//!
//! NCCL is looked up here rather than through cudarc's loader, which tries `libnccl.so` and
//! `libnccl.so.<CUDA major>` but not `libnccl.so.2`, the name NCCL installs and PyTorch's
//! wheels load (once libtorch_cuda.so is in the process, so is NCCL, and opening it again
//! returns that copy). `OXCLIP_NCCL=/path/to/libnccl.so.2` points elsewhere.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::OnceLock;

use cudarc::nccl::sys::{
    cudaStream_t, ncclComm_t, ncclDataType_t, ncclRedOp_t, ncclResult_t, ncclUniqueId,
};

use super::dist_err;
use crate::device::cudart::{open_first, sym};
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
