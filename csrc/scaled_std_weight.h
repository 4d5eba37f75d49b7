// Scaled weight standardisation, timm's ScaledStdConv2d:
//   w_hat[o, i] = (w[o, i] - mean_o) * rsqrt(var_o + eps) * gain_o * scale
// with the biased variance over the fan-in i of output channel o. Statistics and math in fp32
// (accumulated in the wider `acc_t`), storage in the weight's dtype.
#pragma once

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

}  // namespace nfnet_fast
