// Gradient-ready hooks for the overlapped gradient reduction (trainer/src/grad_sync.rs).
// tch exposes no autograd hooks; libtorch's C++ API has the one DDP's reducer relies on: a hook
// run right after a leaf's gradient has been accumulated. This file installs one that calls
// back into Rust with the parameter's index, and removes it again.

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
  void operator()(const torch::autograd::Variable&) override { fn_(ctx_, index_); }

 private:
  oxclip_grad_ready_fn fn_;
  void* ctx_;
  size_t index_;
};

}  // namespace

// `param` is a tch tensor (an `at::Tensor*`, torch-sys's C_tensor). Returns 0, or 1 when
// libtorch refused (the tensor is not a leaf that requires a gradient); a C++ exception must
// not cross into Rust.
extern "C" int oxclip_set_grad_ready_hook(void* param, oxclip_grad_ready_fn fn, void* ctx, size_t index) {
  try {
    const auto& tensor = *static_cast<at::Tensor*>(param);
    if (!tensor.is_leaf() || !tensor.requires_grad()) {
      return 1;
    }
    torch::autograd::impl::set_post_acc_grad_hooks(tensor, std::make_unique<GradReadyHook>(fn, ctx, index));
    return 0;
  } catch (const std::exception&) {
    return 1;
  }
}

// Removes the hook `oxclip_set_grad_ready_hook` installed (the tensor holds at most one).
extern "C" void oxclip_clear_grad_ready_hook(void* param) {
  try {
    const auto& tensor = *static_cast<at::Tensor*>(param);
    torch::autograd::impl::set_post_acc_grad_hooks(tensor, nullptr);
  } catch (const std::exception&) {
  }
}
