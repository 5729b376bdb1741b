// Counts the reads of tensor values into host memory that libtorch operators make on the
// calling thread (trainer/src/device/host_reads.rs): every `item()` (`aten::_local_scalar_dense`,
// behind tch's `double_value` and `int64_value`) and every copy from a device to the CPU
// (`aten::copy_` with a CPU destination and a non-CPU source, behind `to_device(Cpu)` and
// tch's `Vec::try_from` and `f64::try_from` of a device tensor). On CUDA each of these waits for the device.
// It is a thread-local RecordFunction callback, libtorch's own observer hook (the profiler's):
// nothing is recorded while no count is running.
//
// The CPU kernel of `_fused_adamw_` reads each step counter with `item()` (a CPU value; the
// CUDA kernel reads it on the device), so reads made inside that operator are counted apart.
//
// Every function here is `noexcept` and catches everything: no C++ exception may unwind into
// Rust frames, whose "C" ABI does not allow it.

#include <ATen/core/Tensor.h>
#include <ATen/core/ivalue.h>
#include <ATen/record_function.h>

#include <cstdint>
#include <cstring>
#include <memory>

namespace {

struct Counts {
  uint64_t scalar_reads = 0;
  uint64_t device_to_host_copies = 0;
  uint64_t in_fused_optimizer = 0;
  // How deep inside `_fused_adamw_` the thread is now.
  int fused_depth = 0;
};

thread_local Counts counts;
// The running count's callback on this thread, 0 for none.
thread_local uint64_t active = 0;

constexpr const char* kFused = "aten::_fused_adamw_";

bool is_device_to_host_copy(const at::RecordFunction& fn) {
  auto inputs = fn.inputs();
  if (inputs.size() < 2 || !inputs[0].isTensor() || !inputs[1].isTensor()) {
    return false;
  }
  const auto& dst = inputs[0].toTensor();
  const auto& src = inputs[1].toTensor();
  return dst.defined() && src.defined() && dst.is_cpu() && !src.is_cpu();
}

std::unique_ptr<at::ObserverContext> on_start(const at::RecordFunction& fn) {
  const char* name = fn.name();
  if (std::strcmp(name, kFused) == 0) {
    ++counts.fused_depth;
  } else if (std::strcmp(name, "aten::_local_scalar_dense") == 0) {
    if (counts.fused_depth > 0) {
      ++counts.in_fused_optimizer;
    } else {
      ++counts.scalar_reads;
    }
  } else if (std::strcmp(name, "aten::copy_") == 0 && is_device_to_host_copy(fn)) {
    ++counts.device_to_host_copies;
  }
  return nullptr;
}

void on_end(const at::RecordFunction& fn, at::ObserverContext*) {
  if (std::strcmp(fn.name(), kFused) == 0 && counts.fused_depth > 0) {
    --counts.fused_depth;
  }
}

}  // namespace

extern "C" {

// Starts counting on this thread from zero; returns the handle for `oxclip_host_reads_stop`, or
// 0 when a count already runs on this thread (they do not nest) or libtorch refused.
uint64_t oxclip_host_reads_start() noexcept {
  if (active != 0) {
    return 0;
  }
  try {
    counts = Counts{};
    active = at::addThreadLocalCallback(at::RecordFunctionCallback(on_start, on_end).needsInputs(true));
    return active;
  } catch (...) {
    return 0;
  }
}

// Stops the count `handle` started (on this same thread) and writes what it saw.
void oxclip_host_reads_stop(uint64_t handle, uint64_t* scalar_reads, uint64_t* device_to_host_copies, uint64_t* in_fused_optimizer) noexcept {
  if (handle == active) {
    try {
      at::removeCallback(handle);
    } catch (...) {
    }
    active = 0;
  }
  *scalar_reads = counts.scalar_reads;
  *device_to_host_copies = counts.device_to_host_copies;
  *in_fused_optimizer = counts.in_fused_optimizer;
}

}  // extern "C"
