// silu(x) * beta, the NF block's scaled pre-activation, and its derivative. Math in the wider
// `acc_t` (fp32, or fp64 for float64 tensors), storage in the tensor's dtype.
#pragma once

#include <ATen/ops/empty_like.h>

#include "common.h"

namespace nfnet_fast {

template <typename acc_t>
NFF_HD acc_t silu_scale_fwd(acc_t x, acc_t beta) {
  return x * sigmoid(x) * beta;
}

// d/dx [silu(x) * beta] = beta * s * (1 + x * (1 - s)), s = sigmoid(x) (PyTorch's silu_backward form).
template <typename acc_t>
NFF_HD acc_t silu_scale_grad(acc_t x, acc_t beta) {
  const acc_t s = sigmoid(x);
  return beta * s * (static_cast<acc_t>(1) + x * (static_cast<acc_t>(1) - s));
}

template <typename acc_t>
NFF_HD acc_t silu_scale_bwd(acc_t dy, acc_t x, acc_t beta) {
  return dy * silu_scale_grad(x, beta);
}

// ---------------------------------------------------------------------------------------------
// host-side setup shared by the CPU and CUDA entry points: the output takes x's strides when x is
// dense, else x's suggested memory format (at::empty_like), and the inputs are made dense in the
// output's strides so the kernels walk flat memory. Callers return early when n == 0.

struct SiluScaleArgs {
  at::Tensor x, out;
  int64_t n = 0;
};

inline SiluScaleArgs silu_scale_args(const at::Tensor& x) {
  check_float_tensor(x, "x");
  SiluScaleArgs a;
  a.out = at::empty_like(x);
  a.n = x.numel();
  a.x = a.n ? dense_like(x, a.out) : x;
  return a;
}

struct SiluScaleBackwardArgs {
  at::Tensor grad_out, x, grad_x;
  int64_t n = 0;
};

inline SiluScaleBackwardArgs silu_scale_backward_args(const at::Tensor& grad_out, const at::Tensor& x) {
  check_float_tensor(grad_out, "grad_out");
  check_float_tensor(x, "x");
  check_same_device(grad_out, "grad_out", x, "x");
  TORCH_CHECK(grad_out.sizes() == x.sizes(), "grad_out shape ", grad_out.sizes(), " must equal x shape ", x.sizes());
  SiluScaleBackwardArgs a;
  a.grad_x = at::empty_like(x);
  a.n = x.numel();
  a.x = a.n ? dense_like(x, a.grad_x) : x;
  a.grad_out = a.n ? dense_like(grad_out.to(x.scalar_type()), a.grad_x) : grad_out;
  return a;
}

}  // namespace nfnet_fast
