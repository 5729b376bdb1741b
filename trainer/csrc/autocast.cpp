// Mixed precision entry points that tch lacks (trainer/src/precision/): autocast on any device
// type (tch's `autocast` drives CUDA alone, and not panic-safely), and the gradient scaler's
// unscale-and-check kernel, whose argument is a list of tensors (tch binds no TensorList
// functions of this kind; `_amp_update_scale_` it does bind).
//
// Every function here is `noexcept` and catches everything: no C++ exception may unwind into
// Rust frames, whose "C" ABI does not allow it. A failure is returned as 1, with libtorch's
// message copied into `err` (NUL-terminated, cut to `err_len`).

#include <ATen/autocast_mode.h>
#include <ATen/ops/_amp_foreach_non_finite_check_and_unscale.h>

#include <cstring>
#include <exception>
#include <vector>

namespace {

void copy_message(const char* what, char* err, size_t err_len) {
  if (err == nullptr || err_len == 0) {
    return;
  }
  std::strncpy(err, what, err_len - 1);
  err[err_len - 1] = '\0';
}

// Only the two device types and the two lower precisions the Rust side names; anything else
// is refused here rather than handed to libtorch as an arbitrary enum value.
bool device_of(int device_type, at::DeviceType* device) {
  if (device_type == static_cast<int>(at::kCPU)) {
    *device = at::kCPU;
  } else if (device_type == static_cast<int>(at::kCUDA)) {
    *device = at::kCUDA;
  } else {
    return false;
  }
  return true;
}

bool dtype_of(int dtype, at::ScalarType* scalar) {
  if (dtype == static_cast<int>(at::kBFloat16)) {
    *scalar = at::kBFloat16;
  } else if (dtype == static_cast<int>(at::kHalf)) {
    *scalar = at::kHalf;
  } else {
    return false;
  }
  return true;
}

}  // namespace

// Enters autocast for `device_type` (c10::DeviceType: 0 CPU, 1 CUDA) in `dtype`
// (c10::ScalarType: 5 Half, 15 BFloat16) on the calling thread, as `torch.autocast.__enter__`
// does: the previous state (whether it was on, and its dtype) goes to `prev_enabled` and
// `prev_dtype` for the exit, then autocast is switched on in `dtype` and the nesting count
// raised. Returns 0, or 1 (nothing changed) when the arguments are not those or libtorch threw.
extern "C" int oxclip_autocast_enter(int device_type, int dtype, int* prev_enabled, int* prev_dtype,
                                     char* err, size_t err_len) noexcept {
  try {
    at::DeviceType device;
    at::ScalarType scalar;
    if (!device_of(device_type, &device) || !dtype_of(dtype, &scalar)) {
      copy_message("autocast: unsupported device type or dtype", err, err_len);
      return 1;
    }
    *prev_enabled = at::autocast::is_autocast_enabled(device) ? 1 : 0;
    *prev_dtype = static_cast<int>(at::autocast::get_autocast_dtype(device));
    at::autocast::set_autocast_enabled(device, true);
    at::autocast::set_autocast_dtype(device, scalar);
    at::autocast::increment_nesting();
    return 0;
  } catch (const std::exception& e) {
    copy_message(e.what(), err, err_len);
    return 1;
  } catch (...) {
    copy_message("autocast: unknown C++ exception", err, err_len);
    return 1;
  }
}

// Leaves what `oxclip_autocast_enter` entered, as `torch.autocast.__exit__` does: the
// outermost exit clears the cache of casted weights, then the previous state is restored.
// Restoring thread-local flags cannot fail for values `enter` read; were it to throw anyway,
// the thread's autocast state would be unknown, so the process ends instead.
extern "C" void oxclip_autocast_exit(int device_type, int prev_enabled, int prev_dtype) noexcept {
  try {
    const auto device = static_cast<at::DeviceType>(device_type);
    if (at::autocast::decrement_nesting() == 0) {
      at::autocast::clear_cache();
    }
    at::autocast::set_autocast_enabled(device, prev_enabled != 0);
    at::autocast::set_autocast_dtype(device, static_cast<at::ScalarType>(prev_dtype));
  } catch (...) {
    std::terminate();
  }
}

// Whether autocast is on for `device_type` on the calling thread (1 or 0), and its dtype into
// `dtype`. Returns -1 when the device type is not CPU or CUDA, or libtorch threw.
extern "C" int oxclip_autocast_state(int device_type, int* dtype) noexcept {
  try {
    at::DeviceType device;
    if (!device_of(device_type, &device)) {
      return -1;
    }
    *dtype = static_cast<int>(at::autocast::get_autocast_dtype(device));
    return at::autocast::is_autocast_enabled(device) ? 1 : 0;
  } catch (...) {
    return -1;
  }
}

// `torch.amp.GradScaler.unscale_`'s kernel on `grads[0..n]` (tch tensors, `at::Tensor*`):
// multiplies each by `inv_scale` in place and sets `found_inf` (a 1-element fp32 tensor on
// their device) to 1 when any element of any gradient is inf or NaN, without a host sync.
// Returns 0, or 1 with libtorch's message (tensors on another device, of a non-float dtype).
extern "C" int oxclip_amp_unscale(void* const* grads, size_t n, void* found_inf, void* inv_scale,
                                  char* err, size_t err_len) noexcept {
  try {
    std::vector<at::Tensor> list;
    list.reserve(n);
    for (size_t i = 0; i < n; ++i) {
      list.push_back(*static_cast<at::Tensor*>(grads[i]));
    }
    auto& found = *static_cast<at::Tensor*>(found_inf);
    const auto& inv = *static_cast<at::Tensor*>(inv_scale);
    at::_amp_foreach_non_finite_check_and_unscale_(list, found, inv);
    return 0;
  } catch (const std::exception& e) {
    copy_message(e.what(), err, err_len);
    return 1;
  } catch (...) {
    copy_message("unscale: unknown C++ exception", err, err_len);
    return 1;
  }
}
