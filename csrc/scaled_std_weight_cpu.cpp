// CPU twin of csrc/scaled_std_weight.cu: same row math (scaled_std_weight.h), one row per task.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
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
  check_std_weight_args(weight, gain);
  const auto w = weight.contiguous();
  const auto g = gain.contiguous();
  auto out = at::empty_like(w, at::MemoryFormat::Contiguous);
  const int64_t rows = w.size(0), n = rows ? w.numel() / rows : 0;
  if (w.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "scaled_std_weight_cpu", [&] {
    fwd_rows<scalar_t>(w.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                       rows, n, scale, eps);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> scaled_std_weight_backward_cpu(const at::Tensor& grad_out,
                                                                  const at::Tensor& weight, const at::Tensor& gain,
                                                                  double scale, double eps) {
  check_std_weight_args(weight, gain);
  check_std_weight_grad(grad_out, weight);
  const auto w = weight.contiguous();
  const auto g = gain.contiguous();
  const auto dy = grad_out.to(w.scalar_type()).contiguous();
  auto dw = at::empty_like(w, at::MemoryFormat::Contiguous);
  auto dgain = at::empty_like(g, at::MemoryFormat::Contiguous);
  const int64_t rows = w.size(0), n = rows ? w.numel() / rows : 0;
  if (w.numel() == 0) return {dw, dgain};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "scaled_std_weight_backward_cpu", [&] {
    bwd_rows<scalar_t>(dy.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(),
                       dw.mutable_data_ptr<scalar_t>(), dgain.mutable_data_ptr<scalar_t>(), rows, n, scale, eps);
  });
  return {dw, dgain};
}

}  // namespace

TORCH_LIBRARY_IMPL(nfnet_fast, CPU, m) {
  m.impl("scaled_std_weight", &scaled_std_weight_cpu);
  m.impl("scaled_std_weight_backward", &scaled_std_weight_backward_cpu);
}

}  // namespace nfnet_fast
