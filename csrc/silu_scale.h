// silu(x) * beta, the NF block's scaled pre-activation, and its derivative. Math in the wider
// `acc_t` (fp32, or fp64 for float64 tensors), storage in the tensor's dtype.
#pragma once

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

}  // namespace nfnet_fast
