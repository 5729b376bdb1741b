// Gradient hooks for the overlapped gradient reduction (trainer/src/grad_sync/hooks.rs).
// tch exposes no autograd hooks; libtorch's C++ API has the one DDP's reducer relies on: a hook
// run right after a leaf's gradient has been accumulated. This file installs one that calls
// back into Rust with the parameter's index, removes it again, and sets a gradient where a
// parameter has none (tch cannot).
//
// Every function here is `noexcept` and catches everything: no C++ exception may unwind into
// Rust frames, whose "C" ABI does not allow it.

#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <exception>
#include <memory>

extern "C" {
typedef void (*oxclip_grad_ready_fn)(void* ctx, size_t index);
}

namespace {

struct GradReadyHook : torch::autograd::PostAccumulateGradHook {
  GradReadyHook(oxclip_grad_ready_fn fn, void* ctx, size_t index) : fn_(fn), ctx_(ctx), index_(index) {}
  // The callback catches every Rust panic itself (grad_sync/hooks.rs), so nothing unwinds here.
  void operator()(const torch::autograd::Variable&) override { fn_(ctx_, index_); }

 private:
  oxclip_grad_ready_fn fn_;
  void* ctx_;
  size_t index_;
};

}  // namespace

// `param` is a tch tensor (an `at::Tensor*`, torch-sys's C_tensor). Returns 0, or 1 when
// libtorch refused (the tensor is not a leaf that requires a gradient, or anything threw).
extern "C" int oxclip_set_grad_ready_hook(void* param, oxclip_grad_ready_fn fn, void* ctx, size_t index) noexcept {
  try {
    const auto& tensor = *static_cast<at::Tensor*>(param);
    if (!tensor.is_leaf() || !tensor.requires_grad()) {
      return 1;
    }
    torch::autograd::impl::set_post_acc_grad_hooks(tensor, std::make_unique<GradReadyHook>(fn, ctx, index));
    return 0;
  } catch (...) {
    return 1;
  }
}

// Removes the hook `oxclip_set_grad_ready_hook` installed (the tensor holds at most one). A
// hook that cannot be removed would call into a context the Rust side is about to free: the
// process ends instead.
extern "C" void oxclip_clear_grad_ready_hook(void* param) noexcept {
  try {
    const auto& tensor = *static_cast<at::Tensor*>(param);
    torch::autograd::impl::set_post_acc_grad_hooks(tensor, nullptr);
  } catch (...) {
    std::terminate();
  }
}

// Sets `param`'s gradient to `grad` (both tch tensors; `grad` null: no gradient). Returns 0, or 1
// when libtorch refused (a gradient of another shape, type or device).
extern "C" int oxclip_set_grad(void* param, void* grad) noexcept {
  try {
    auto& tensor = *static_cast<at::Tensor*>(param);
    tensor.mutable_grad() = grad == nullptr ? at::Tensor() : *static_cast<at::Tensor*>(grad);
    return 0;
  } catch (...) {
    return 1;
  }
}
