// Scaled weight standardisation, timm's ScaledStdConv2d:
//   w_hat[o, i] = (w[o, i] - mean_o) * rsqrt(var_o + eps) * gain_o * scale
// with the biased variance over the fan-in i of output channel o. Statistics and math in fp32
// (accumulated in the wider `acc_t`), storage in the weight's dtype.
#pragma once

#include <ATen/ops/empty_like.h>

#include <cmath>

#include "common.h"

namespace nfnet_fast {

// mean and rstd of a row from its sums: s1 = sum(w), s2 = sum((w - shift)^2) after the shift by the mean
// (two passes over a row that sits in cache, so no catastrophic cancellation).
template <typename acc_t>
NFF_HD acc_t row_rstd(acc_t centred_sq_sum, int64_t n, acc_t eps) {
  acc_t var = centred_sq_sum / static_cast<acc_t>(n);
#if defined(__CUDA_ARCH__)
  return static_cast<acc_t>(1) / sqrt(var + eps);
#else
  return static_cast<acc_t>(1) / std::sqrt(var + eps);
#endif
}

// Forward per element: the standardised, scaled weight.
template <typename acc_t>
NFF_HD acc_t std_weight_fwd(acc_t w, acc_t mean, acc_t rstd_gain_scale) {
  return (w - mean) * rstd_gain_scale;
}

// Backward per element (batch-norm backward over the fan-in), with
//   xhat = (w - mean) * rstd,  dxhat = dy * gain * scale,
//   dw = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)).
// The row sums sum_dy = sum(dy) and sum_dy_xhat = sum(dy * xhat) are taken before this is called.
template <typename acc_t>
NFF_HD acc_t std_weight_bwd(acc_t dy, acc_t xhat, acc_t rstd, acc_t gain_scale, acc_t mean_dy,
                            acc_t mean_dy_xhat) {
  return rstd * gain_scale * (dy - mean_dy - xhat * mean_dy_xhat);
}

// Host-side argument checks shared by the CPU and CUDA entry points (messages name the argument).
inline void check_std_weight_args(const at::Tensor& weight, const at::Tensor& gain) {
  check_float_tensor(weight, "weight");
  check_float_tensor(gain, "gain");
  check_same_device(weight, "weight", gain, "gain");
  TORCH_CHECK(weight.dim() >= 2, "weight must have at least 2 dims (out_channels, fan-in...), got shape ",
              weight.sizes());
  TORCH_CHECK(gain.numel() == weight.size(0), "gain must have one value per output channel (", weight.size(0),
              "), got shape ", gain.sizes());
  TORCH_CHECK(gain.scalar_type() == weight.scalar_type(), "gain dtype ", gain.scalar_type(),
              " must equal weight dtype ", weight.scalar_type());
}

inline void check_std_weight_grad(const at::Tensor& grad_out, const at::Tensor& weight) {
  check_float_tensor(grad_out, "grad_out");
  check_same_device(grad_out, "grad_out", weight, "weight");
  TORCH_CHECK(grad_out.sizes() == weight.sizes(), "grad_out shape ", grad_out.sizes(), " must equal weight shape ",
              weight.sizes());
}

// What the CPU and CUDA entry points share: checked, contiguous inputs, the outputs to fill, and
// the row geometry (rows = output channels, n = fan-in). Callers return early when empty().
struct StdWeightArgs {
  at::Tensor weight, gain, out;  // out: the standardised weight
  int64_t rows = 0, n = 0;
  bool empty() const { return weight.numel() == 0; }
};

inline StdWeightArgs std_weight_args(const at::Tensor& weight, const at::Tensor& gain) {
  check_std_weight_args(weight, gain);
  StdWeightArgs a;
  a.weight = weight.contiguous();
  a.gain = gain.contiguous();
  a.out = at::empty_like(a.weight, at::MemoryFormat::Contiguous);
  a.rows = a.weight.size(0);
  a.n = a.rows ? a.weight.numel() / a.rows : 0;
  return a;
}

struct StdWeightBackwardArgs {
  at::Tensor grad_out, weight, gain, grad_weight, grad_gain;
  int64_t rows = 0, n = 0;
  bool empty() const { return weight.numel() == 0; }
};

inline StdWeightBackwardArgs std_weight_backward_args(const at::Tensor& grad_out, const at::Tensor& weight,
                                                      const at::Tensor& gain) {
  const StdWeightArgs f = std_weight_args(weight, gain);
  check_std_weight_grad(grad_out, weight);
  StdWeightBackwardArgs a;
  a.weight = f.weight;
  a.gain = f.gain;
  a.grad_weight = f.out;
  a.grad_gain = at::empty_like(f.gain, at::MemoryFormat::Contiguous);
  a.grad_out = grad_out.to(f.weight.scalar_type()).contiguous();
  a.rows = f.rows;
  a.n = f.n;
  return a;
}

}  // namespace nfnet_fast
