// The optimizer's multi-tensor kernels (trainer/src/optim.rs). tch's generated bindings lack
// libtorch's TensorList operators, which torch.optim and torch.nn.utils use to update every
// parameter in one call instead of one small kernel (or several) per tensor: the fused AdamW
// step, and the per-tensor norms and in-place scaling of gradient clipping. This file calls
// them on tch tensors (each an `at::Tensor*`, torch-sys's C_tensor).
//
// Every function here is `noexcept` and catches everything: no C++ exception may unwind into
// Rust frames, whose "C" ABI does not allow it. A refusal returns 1 with libtorch's message in
// `err` (NUL-terminated, cut to `err_len` bytes).

#include <ATen/core/Tensor.h>
#include <ATen/ops/_foreach_mul.h>
#include <ATen/ops/_foreach_norm.h>
#include <ATen/ops/_fused_adamw.h>
#include <ATen/ops/linalg_vector_norm.h>
#include <ATen/ops/stack.h>
#include <c10/util/Exception.h>

#include <cstring>
#include <exception>
#include <optional>
#include <string>
#include <vector>

namespace {

std::vector<at::Tensor> tensors(void* const* handles, size_t n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    out.push_back(*static_cast<at::Tensor*>(handles[i]));
  }
  return out;
}

void write_error(char* err, size_t err_len, const std::string& message) {
  if (err == nullptr || err_len == 0) {
    return;
  }
  size_t n = message.size() < err_len - 1 ? message.size() : err_len - 1;
  std::memcpy(err, message.data(), n);
  err[n] = '\0';
}

// Runs `body`; returns 0, or 1 with the exception's message in `err`.
template <typename F>
int guarded(char* err, size_t err_len, F body) noexcept {
  try {
    body();
    return 0;
  } catch (const c10::Error& e) {
    write_error(err, err_len, e.what_without_backtrace());
  } catch (const std::exception& e) {
    write_error(err, err_len, e.what());
  } catch (...) {
    write_error(err, err_len, "an unknown C++ exception");
  }
  return 1;
}

// The kernel reads every list as raw memory in the parameter's layout (the CPU kernel does not
// even look at strides), so a tensor that differs would be updated wrongly without a word:
// checked here. Names the first offender by its index in the lists.
void check_like_params(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& other, const char* what) {
  for (size_t i = 0; i < params.size(); ++i) {
    const auto& p = params[i];
    const auto& t = other[i];
    TORCH_CHECK(p.is_contiguous(), "parameter ", i, " is not contiguous");
    TORCH_CHECK(t.defined() && t.is_contiguous() && t.sizes() == p.sizes() && t.scalar_type() == p.scalar_type() && t.device() == p.device(),
                "parameter ", i, "'s ", what, " is not a contiguous ", p.scalar_type(), " tensor of shape ", p.sizes(), " on ", p.device());
  }
}

}  // namespace

extern "C" {

// torch.optim.AdamW(fused=True)'s update of one parameter group (torch/optim/adam.py,
// `_fused_adam`): `at::_fused_adamw_` over the group's `n` parameters, gradients and moments,
// without AMSGrad. `step` is the group's update counter (a 1-element fp32 tensor on the
// parameters' device, already incremented for this update), shared by every parameter of the
// group. `found_inf` (null: none) is a 1-element fp32 tensor on that device; 1 skips the whole
// update inside the kernel, which then writes nothing.
int oxclip_fused_adamw_(void* const* params, void* const* grads, void* const* exp_avgs, void* const* exp_avg_sqs, size_t n, void* step,
                        double lr, double beta1, double beta2, double weight_decay, double eps, void* found_inf, char* err,
                        size_t err_len) noexcept {
  return guarded(err, err_len, [&] {
    auto p = tensors(params, n);
    auto g = tensors(grads, n);
    auto m = tensors(exp_avgs, n);
    auto v = tensors(exp_avg_sqs, n);
    check_like_params(p, g, "gradient");
    check_like_params(p, m, "exp_avg");
    check_like_params(p, v, "exp_avg_sq");
    const auto& counter = *static_cast<at::Tensor*>(step);
    std::vector<at::Tensor> steps(n, counter);
    std::optional<at::Tensor> skip;
    if (found_inf != nullptr) {
      skip = *static_cast<at::Tensor*>(found_inf);
    }
    at::_fused_adamw_(p, g, m, v, {}, steps, lr, beta1, beta2, weight_decay, eps, /*amsgrad=*/false, /*maximize=*/false,
                      /*grad_scale=*/std::nullopt, skip);
  });
}

// The L2 norm of `n` tensors taken together, as torch.nn.utils.clip_grad_norm_(foreach=True)
// computes it (`_get_total_norm`: the norm of the stacked `_foreach_norm`s), each norm in fp32
// whatever the tensors' type, written into `out` (a 0-dim fp32 tensor on their device).
int oxclip_total_norm(void* const* handles, size_t n, void* out, char* err, size_t err_len) noexcept {
  return guarded(err, err_len, [&] {
    auto norms = at::_foreach_norm(tensors(handles, n), 2, at::kFloat);
    auto& total = *static_cast<at::Tensor*>(out);
    at::linalg_vector_norm_out(total, at::stack(norms), 2);
  });
}

// Multiplies each of `n` tensors in place by `factor` (a 0-dim tensor on their device):
// `_foreach_mul_`, as clip_grad_norm_ scales the gradients.
int oxclip_foreach_mul_(void* const* handles, size_t n, void* factor, char* err, size_t err_len) noexcept {
  return guarded(err, err_len, [&] { at::_foreach_mul_(tensors(handles, n), *static_cast<at::Tensor*>(factor)); });
}

}  // extern "C"
