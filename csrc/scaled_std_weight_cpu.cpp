// The scaled_std_weight op: its schema, and the CPU twin of csrc/scaled_std_weight.cu: the same row
// math (scaled_std_weight.h), one row per task.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include "scaled_std_weight.h"

namespace nfnet_fast {
namespace {

// Mean and rstd of one row, two passes (the row is in cache) as the CUDA kernel does.
template <typename scalar_t, typename acc_t>
void row_stats(const scalar_t* wr, int64_t n, acc_t eps, acc_t& mean, acc_t& rstd) {
  acc_t s1 = 0;
  for (int64_t i = 0; i < n; ++i) s1 += static_cast<acc_t>(wr[i]);
  mean = s1 / static_cast<acc_t>(n);
  acc_t s2 = 0;
  for (int64_t i = 0; i < n; ++i) {
    const acc_t d = static_cast<acc_t>(wr[i]) - mean;
    s2 += d * d;
  }
  rstd = row_rstd<acc_t>(s2, n, eps);
}

template <typename scalar_t>
void fwd_rows(const scalar_t* w, const scalar_t* gain, scalar_t* out, int64_t rows, int64_t n, double scale,
              double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      const scalar_t* wr = w + o * n;
      acc_t mean, rstd;
      row_stats(wr, n, static_cast<acc_t>(eps), mean, rstd);
      const acc_t mul = rstd * static_cast<acc_t>(gain[o]) * static_cast<acc_t>(scale);
      for (int64_t i = 0; i < n; ++i)
        out[o * n + i] = static_cast<scalar_t>(std_weight_fwd<acc_t>(static_cast<acc_t>(wr[i]), mean, mul));
    }
  });
}

template <typename scalar_t>
void bwd_rows(const scalar_t* dy, const scalar_t* w, const scalar_t* gain, scalar_t* dw, scalar_t* dgain,
              int64_t rows, int64_t n, double scale, double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      const scalar_t* wr = w + o * n;
      const scalar_t* dyr = dy + o * n;
      acc_t mean, rstd;
      row_stats(wr, n, static_cast<acc_t>(eps), mean, rstd);
      acc_t sum_dy = 0, sum_dy_xhat = 0;
      for (int64_t i = 0; i < n; ++i) {
        const acc_t g = static_cast<acc_t>(dyr[i]);
        sum_dy += g;
        sum_dy_xhat += g * (static_cast<acc_t>(wr[i]) - mean) * rstd;
      }
      const acc_t gs = static_cast<acc_t>(gain[o]) * static_cast<acc_t>(scale);
      // d(loss)/d(gain_o) = scale * sum_i dy * xhat
      dgain[o] = static_cast<scalar_t>(sum_dy_xhat * static_cast<acc_t>(scale));
      const acc_t mean_dy = sum_dy / static_cast<acc_t>(n), mean_dy_xhat = sum_dy_xhat / static_cast<acc_t>(n);
      for (int64_t i = 0; i < n; ++i) {
        const acc_t xhat = (static_cast<acc_t>(wr[i]) - mean) * rstd;
        dw[o * n + i] = static_cast<scalar_t>(
            std_weight_bwd<acc_t>(static_cast<acc_t>(dyr[i]), xhat, rstd, gs, mean_dy, mean_dy_xhat));
      }
    }
  });
}

at::Tensor scaled_std_weight_cpu(const at::Tensor& weight, const at::Tensor& gain, double scale, double eps) {
  const auto a = std_weight_args(weight, gain);
  if (a.empty()) return a.out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.weight.scalar_type(), "scaled_std_weight_cpu", [&] {
    fwd_rows<scalar_t>(a.weight.const_data_ptr<scalar_t>(), a.gain.const_data_ptr<scalar_t>(),
                       a.out.mutable_data_ptr<scalar_t>(), a.rows, a.n, scale, eps);
  });
  return a.out;
}

std::tuple<at::Tensor, at::Tensor> scaled_std_weight_backward_cpu(const at::Tensor& grad_out,
                                                                  const at::Tensor& weight, const at::Tensor& gain,
                                                                  double scale, double eps) {
  const auto a = std_weight_backward_args(grad_out, weight, gain);
  if (a.empty()) return {a.grad_weight, a.grad_gain};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.weight.scalar_type(), "scaled_std_weight_backward_cpu",
                                  [&] {
    bwd_rows<scalar_t>(a.grad_out.const_data_ptr<scalar_t>(), a.weight.const_data_ptr<scalar_t>(),
                       a.gain.const_data_ptr<scalar_t>(), a.grad_weight.mutable_data_ptr<scalar_t>(),
                       a.grad_gain.mutable_data_ptr<scalar_t>(), a.rows, a.n, scale, eps);
  });
  return {a.grad_weight, a.grad_gain};
}

}  // namespace

// w_hat = (weight - mean) / sqrt(var + eps) * gain * scale per output channel (scaled_std_weight.h);
// the output is contiguous, in weight's dtype.
TORCH_LIBRARY_FRAGMENT(nfnet_fast, m) {
  m.def("scaled_std_weight(Tensor weight, Tensor gain, float scale, float eps) -> Tensor");
  m.def(
      "_scaled_std_weight_backward(Tensor grad_out, Tensor weight, Tensor gain, float scale, float eps)"
      " -> (Tensor grad_weight, Tensor grad_gain)");
}

TORCH_LIBRARY_IMPL(nfnet_fast, CPU, m) {
  m.impl("scaled_std_weight", &scaled_std_weight_cpu);
  m.impl("_scaled_std_weight_backward", &scaled_std_weight_backward_cpu);
}

// The backward op has no derivative of its own: a gradient of it (a double backward, e.g. a gradient
// penalty) is an error when asked for (autograd's not-implemented node), never silently zero, as the
// default fallback (a warning) made it. A first-order backward passes straight through.
TORCH_LIBRARY_IMPL(nfnet_fast, Autograd, m) {
  m.impl("_scaled_std_weight_backward", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace nfnet_fast
