// The silu_scale op: its schema, and the CPU twin of csrc/silu_scale.cu: the same per-element math
// (silu_scale.h) over flat memory.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include "silu_scale.h"

namespace nfnet_fast {
namespace {

constexpr int64_t kGrain = 32768;

at::Tensor silu_scale_cpu(const at::Tensor& x, double beta) {
  const auto a = silu_scale_args(x);
  if (a.n == 0) return a.out;
  const auto &xc = a.x, &out = a.out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "silu_scale_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const acc_t b = static_cast<acc_t>(beta);
    at::parallel_for(0, x.numel(), kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        op[i] = static_cast<scalar_t>(silu_scale_fwd<acc_t>(static_cast<acc_t>(xp[i]), b));
    });
  });
  return out;
}

at::Tensor silu_scale_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x, double beta) {
  const auto a = silu_scale_backward_args(grad_out, x);
  if (a.n == 0) return a.grad_x;
  const auto &xc = a.x, &gc = a.grad_out, &dx = a.grad_x;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "silu_scale_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    const scalar_t* gp = gc.const_data_ptr<scalar_t>();
    scalar_t* dp = dx.mutable_data_ptr<scalar_t>();
    const acc_t b = static_cast<acc_t>(beta);
    at::parallel_for(0, x.numel(), kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        dp[i] = static_cast<scalar_t>(
            silu_scale_bwd<acc_t>(static_cast<acc_t>(gp[i]), static_cast<acc_t>(xp[i]), b));
    });
  });
  return dx;
}

}  // namespace

// silu(x) * beta, any shape; the output takes x's strides (x's suggested format if x is not dense).
TORCH_LIBRARY_FRAGMENT(nfnet_fast, m) {
  m.def("silu_scale(Tensor x, float beta) -> Tensor");
  m.def("_silu_scale_backward(Tensor grad_out, Tensor x, float beta) -> Tensor grad_x");
}

TORCH_LIBRARY_IMPL(nfnet_fast, CPU, m) {
  m.impl("silu_scale", &silu_scale_cpu);
  m.impl("_silu_scale_backward", &silu_scale_backward_cpu);
}

// The backward op has no derivative of its own: a gradient of it (a double backward, e.g. a gradient
// penalty) is an error when asked for (autograd's not-implemented node), never silently zero, as the
// default fallback (a warning) made it. A first-order backward passes straight through.
TORCH_LIBRARY_IMPL(nfnet_fast, Autograd, m) {
  m.impl("_silu_scale_backward", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace nfnet_fast
