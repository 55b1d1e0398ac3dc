// libtorch operations the training step needs that tch does not bind (tch leaves out
// functions over tensor lists that work in place): the fused SGD update and the
// all-gradients finite check with unscaling, both with device-side LR and found-inf, so a
// step needs no host synchronisation. Plain C ABI; errors are returned as 1 with the
// message kept for `cx_last_error` (guarded.h).
#include <ATen/ATen.h>

#include "guarded.h"

#include <optional>
#include <string>
#include <vector>

using cx::guarded;

namespace {

std::vector<at::Tensor> to_list(at::Tensor* const* ts, size_t n) {
  std::vector<at::Tensor> v;
  v.reserve(n);
  for (size_t i = 0; i < n; ++i) v.push_back(*ts[i]);
  return v;
}
}  // namespace

extern "C" {

const char* cx_last_error() { return cx::last_error().c_str(); }

// grads *= inv_scale; found_inf = 1 if any element of any gradient is inf or NaN.
int cx_non_finite_check_and_unscale(at::Tensor* const* grads, size_t n, at::Tensor* found_inf,
                                    const at::Tensor* inv_scale) {
  return guarded([&] {
    auto g = to_list(grads, n);
    at::_amp_foreach_non_finite_check_and_unscale_(g, *found_inf, *inv_scale);
  });
}

// PyTorch's fused SGD (torch.optim.SGD(fused=True)); the update is skipped on the device
// when found_inf holds 1. `bufs` is empty when momentum is 0.
int cx_fused_sgd(at::Tensor* const* params, at::Tensor* const* grads, at::Tensor* const* bufs,
                 size_t n, size_t n_bufs, double weight_decay, double momentum,
                 const at::Tensor* lr, int nesterov, const at::Tensor* found_inf) {
  return guarded([&] {
    auto p = to_list(params, n);
    auto g = to_list(grads, n);
    auto b = to_list(bufs, n_bufs);
    std::optional<at::Tensor> inf;
    if (found_inf != nullptr) inf = *found_inf;
    at::_fused_sgd_(p, g, b, weight_decay, momentum, *lr, /*dampening=*/0.0, nesterov != 0,
                    /*maximize=*/false, /*is_first_step=*/false, std::nullopt, inf);
  });
}
}
