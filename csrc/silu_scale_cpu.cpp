// CPU twin of csrc/silu_scale.cu: the same per-element math (silu_scale.h) over flat memory.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "silu_scale.h"

namespace nfnet_fast {
namespace {

constexpr int64_t kGrain = 32768;

at::Tensor silu_scale_cpu(const at::Tensor& x, double beta) {
  check_float_tensor(x, "x");
  auto out = at::empty_like(x);  // x's strides when x is dense, else its suggested memory format
  if (x.numel() == 0) return out;
  const auto xc = dense_like(x, out);
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
  check_float_tensor(grad_out, "grad_out");
  check_float_tensor(x, "x");
  check_same_device(grad_out, "grad_out", x, "x");
  TORCH_CHECK(grad_out.sizes() == x.sizes(), "grad_out shape ", grad_out.sizes(), " must equal x shape ", x.sizes());
  auto dx = at::empty_like(x);
  if (x.numel() == 0) return dx;
  const auto xc = dense_like(x, dx);
  const auto gc = dense_like(grad_out.to(x.scalar_type()), dx);
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

TORCH_LIBRARY_IMPL(nfnet_fast, CPU, m) {
  m.impl("silu_scale", &silu_scale_cpu);
  m.impl("silu_scale_backward", &silu_scale_backward_cpu);
}

}  // namespace nfnet_fast
