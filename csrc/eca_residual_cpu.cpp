// The eca_residual op: its schema, and the CPU twin of csrc/eca_residual.cu: the same plan (partial
// sums per (image, pixel range, channel)), the same per-channel and per-element math
// (eca_residual.h), the same two passes forward and backward.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <vector>

#include "eca_residual.h"

namespace nfnet_fast {
namespace {

EcaPlan cpu_plan(int64_t N, int64_t C, int64_t HW, int elem_size, at::MemoryFormat format, int align) {
  return eca_plan(N, C, HW, elem_size, format == at::MemoryFormat::ChannelsLast, align, /*cuda=*/false,
                  /*target_blocks=*/4 * at::get_num_threads());
}

// Pixel range [p0, p1) of range s.
inline void range_of(const EcaPlan& pl, int64_t s, int64_t& p0, int64_t& p1) {
  p0 = s * pl.split_len;
  p1 = std::min(pl.HW, p0 + pl.split_len);
}

// The reduction pass: partial[(n * splits + s) * C + c] = sum over range s of f(i, n, c), with i
// the element's offset. One task per (image, range), as one CUDA block per (image, tile, range).
template <typename acc_t, typename F>
void reduce_ranges(const EcaPlan& pl, acc_t* partial, const F& f) {
  at::parallel_for(0, pl.N * pl.splits, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(pl.C);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / pl.splits, s = item % pl.splits;
      int64_t p0, p1;
      range_of(pl, s, p0, p1);
      acc_t* dst = partial + item * pl.C;
      if (pl.channels_last) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t base = (n * pl.HW + p) * pl.C;
          for (int64_t c = 0; c < pl.C; ++c) acc[c] += f(base + c, n, c);
        }
        std::copy(acc.begin(), acc.end(), dst);
      } else {
        for (int64_t c = 0; c < pl.C; ++c) {
          const int64_t base = (n * pl.C + c) * pl.HW;
          acc_t sum = 0;
          for (int64_t p = p0; p < p1; ++p) sum += f(base + p, n, c);
          dst[c] = sum;
        }
      }
    }
  });
}

// The elementwise pass: f(i, n, c) for every element, by (image, range).
template <typename F>
void for_each_element(const EcaPlan& pl, const F& f) {
  at::parallel_for(0, pl.N * pl.splits, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / pl.splits, s = item % pl.splits;
      int64_t p0, p1;
      range_of(pl, s, p0, p1);
      if (pl.channels_last) {
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t base = (n * pl.HW + p) * pl.C;
          for (int64_t c = 0; c < pl.C; ++c) f(base + c, n, c);
        }
      } else {
        for (int64_t c = 0; c < pl.C; ++c) {
          const int64_t base = (n * pl.C + c) * pl.HW;
          for (int64_t p = p0; p < p1; ++p) f(base + p, n, c);
        }
      }
    }
  });
}

// Sum over the ranges of partial, for channel c of image n.
template <typename acc_t>
acc_t sum_partials(const EcaPlan& pl, const acc_t* partial, int64_t n, int64_t c) {
  acc_t sum = 0;
  for (int64_t s = 0; s < pl.splits; ++s) sum += partial[(n * pl.splits + s) * pl.C + c];
  return sum;
}

// coef[n, c] = scale * g[n, c], the gates from the channel means, zero-padded by p on each side.
template <typename acc_t>
void gates_from_means(const EcaPlan& pl, const acc_t* mean, const acc_t* w, int k, acc_t scale, acc_t* g_out,
                      acc_t* coef_out) {
  const int p = (k - 1) / 2;
  at::parallel_for(0, pl.N, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> m(pl.C + 2 * p, acc_t(0));
    for (int64_t n = begin; n < end; ++n) {
      std::copy(mean + n * pl.C, mean + (n + 1) * pl.C, m.begin() + p);
      for (int64_t c = 0; c < pl.C; ++c) {
        const acc_t g = sigmoid(eca_logit(m.data() + c, w, k));
        if (g_out) g_out[n * pl.C + c] = g;
        coef_out[n * pl.C + c] = scale * g;
      }
    }
  });
}

template <typename scalar_t>
void forward_impl(EcaResidualArgs& a, double scale_d, std::optional<double> beta_next) {
  using acc_t = at::opmath_type<scalar_t>;
  const EcaPlan pl = cpu_plan(a.N, a.C, a.HW, sizeof(scalar_t), a.format,
                              common_alignment({a.y.const_data_ptr(), a.x_next.const_data_ptr()}));
  auto partial = at::empty({a.sums.defined() ? 0 : pl.N * pl.splits * pl.C}, a.mean.options());
  const scalar_t* y = a.y.const_data_ptr<scalar_t>();
  const scalar_t* sc = a.sc.defined() ? a.sc.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* out = a.x_next.mutable_data_ptr<scalar_t>();
  scalar_t* act = beta_next.has_value() ? a.a_next.mutable_data_ptr<scalar_t>() : nullptr;
  acc_t* mean = a.mean.mutable_data_ptr<acc_t>();
  const acc_t* w = a.w.const_data_ptr<acc_t>();
  const acc_t scale = static_cast<acc_t>(scale_d), beta = static_cast<acc_t>(beta_next.value_or(0.0));

  if (a.sums.defined()) {  // y's sums came from its producer: no pooling pass
    const acc_t* sums = a.sums.const_data_ptr<acc_t>();
    for (int64_t i = 0; i < pl.N * pl.C; ++i) mean[i] = eca_mean(sums[i], pl.HW);
  } else {
    reduce_ranges<acc_t>(pl, partial.mutable_data_ptr<acc_t>(),
                         [&](int64_t i, int64_t, int64_t) { return static_cast<acc_t>(y[i]); });
    const acc_t* part = partial.const_data_ptr<acc_t>();
    at::parallel_for(0, pl.N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n)
        for (int64_t c = 0; c < pl.C; ++c) mean[n * pl.C + c] = eca_mean(sum_partials(pl, part, n, c), pl.HW);
    });
  }
  std::vector<acc_t> coef(pl.N * pl.C);
  gates_from_means<acc_t>(pl, mean, w, a.k, scale, nullptr, coef.data());
  for_each_element(pl, [&](int64_t i, int64_t n, int64_t c) {
    const acc_t o = eca_out(static_cast<acc_t>(y[i]), sc ? static_cast<acc_t>(sc[i]) : acc_t(0), coef[n * pl.C + c]);
    out[i] = static_cast<scalar_t>(o);
    if (act) act[i] = static_cast<scalar_t>(eca_act(o, beta));
  });
}

template <typename scalar_t>
at::Tensor backward_impl(EcaResidualBackwardArgs& a, double scale_d, std::optional<double> beta_next) {
  using acc_t = at::opmath_type<scalar_t>;
  const int k = a.k, p = (k - 1) / 2;
  const EcaPlan pl = cpu_plan(a.N, a.C, a.HW, sizeof(scalar_t), a.format,
                              common_alignment({a.y.const_data_ptr(), a.grad_y.const_data_ptr()}));
  auto partial = at::empty({pl.N * pl.splits * pl.C}, a.mean.options());
  const scalar_t* y = a.y.const_data_ptr<scalar_t>();
  const scalar_t* dout = a.dout.const_data_ptr<scalar_t>();
  const scalar_t* dact = a.dact.defined() ? a.dact.const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* sc = a.sc.defined() ? a.sc.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* dsc = dact ? a.grad_shortcut.mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* dx = a.grad_y.mutable_data_ptr<scalar_t>();
  const acc_t* mean = a.mean.const_data_ptr<acc_t>();
  const acc_t* w = a.w.const_data_ptr<acc_t>();
  const acc_t scale = static_cast<acc_t>(scale_d), beta = static_cast<acc_t>(beta_next.value_or(0.0));

  std::vector<acc_t> g(pl.N * pl.C), coef(pl.N * pl.C);
  gates_from_means<acc_t>(pl, mean, w, k, scale, g.data(), coef.data());

  // Pass 1: dX (stored as the shortcut's gradient when act has a gradient) and dsum = sum dX * y.
  reduce_ranges<acc_t>(pl, partial.mutable_data_ptr<acc_t>(), [&](int64_t i, int64_t n, int64_t c) {
    const acc_t yv = static_cast<acc_t>(y[i]);
    acc_t dX = static_cast<acc_t>(dout[i]);
    if (dact) {
      const acc_t o = eca_out(yv, sc ? static_cast<acc_t>(sc[i]) : acc_t(0), coef[n * pl.C + c]);
      dX = eca_dout_total(dX, static_cast<acc_t>(dact[i]), o, beta);
      dsc[i] = static_cast<scalar_t>(dX);
    }
    return dX * yv;
  });

  // Per channel: dz (gradient of the gate's logit) and what each element gets back through the mean.
  const acc_t* part = partial.const_data_ptr<acc_t>();
  std::vector<acc_t> dz(pl.N * pl.C), add(pl.N * pl.C);
  at::parallel_for(0, pl.N, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> dzp(pl.C + 2 * p, acc_t(0));
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t c = 0; c < pl.C; ++c) {
        const int64_t nc = n * pl.C + c;
        dz[nc] = dzp[c + p] = eca_dlogit(sum_partials(pl, part, n, c), g[nc], scale);
      }
      for (int64_t c = 0; c < pl.C; ++c) add[n * pl.C + c] = eca_dmean_hw(dzp.data() + c + 2 * p, w, k, pl.HW);
    }
  });

  // Pass 2: dy from dX as stored (the same values the CUDA kernel reads back).
  const scalar_t* dX_src = dact ? dsc : dout;
  for_each_element(pl, [&](int64_t i, int64_t n, int64_t c) {
    const int64_t nc = n * pl.C + c;
    dx[i] = static_cast<scalar_t>(eca_dy(static_cast<acc_t>(dX_src[i]), coef[nc], add[nc]));
  });

  // dw: per image, then over images in a fixed order.
  std::vector<acc_t> ws(pl.N * k);
  at::parallel_for(0, pl.N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      for (int j = 0; j < k; ++j) {
        acc_t s = 0;
        for (int64_t c = 0; c < pl.C; ++c) {
          const int64_t ct = c + j - p;
          if (ct >= 0 && ct < pl.C) s += eca_dweight_term(dz[n * pl.C + c], mean[n * pl.C + ct]);
        }
        ws[n * k + j] = s;
      }
  });
  auto dw = at::empty({k}, a.mean.options());
  acc_t* dwp = dw.mutable_data_ptr<acc_t>();
  for (int j = 0; j < k; ++j) {
    acc_t s = 0;
    for (int64_t n = 0; n < pl.N; ++n) s += ws[n * k + j];
    dwp[j] = s;
  }
  return dw;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> eca_residual_cpu(const at::Tensor& y, const at::Tensor& weight,
                                                                const std::optional<at::Tensor>& shortcut,
                                                                double coef, std::optional<double> beta_next,
                                                                const std::optional<at::Tensor>& sums) {
  auto a = eca_residual_args(y, weight, shortcut, beta_next, sums);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.y.scalar_type(), "eca_residual_cpu",
                                  [&] { forward_impl<scalar_t>(a, coef, beta_next); });
  return {a.x_next, a.a_next, a.mean};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> eca_residual_backward_cpu(
    const std::optional<at::Tensor>& grad_x_next, const std::optional<at::Tensor>& grad_a_next, const at::Tensor& y,
    const at::Tensor& weight, const std::optional<at::Tensor>& shortcut, const at::Tensor& stats, double coef,
    std::optional<double> beta_next, bool want_bias_sums) {
  auto a = eca_residual_backward_args(grad_x_next, grad_a_next, y, weight, shortcut, stats, beta_next);
  at::Tensor dw;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.y.scalar_type(), "eca_residual_backward_cpu",
                                  [&] { dw = backward_impl<scalar_t>(a, coef, beta_next); });
  return {a.grad_y, dw.to(weight.scalar_type()).reshape(weight.sizes()), a.grad_shortcut,
          eca_bias_sums(a, want_bias_sums)};
}

}  // namespace

// y: (N, C, H, W); weight: the conv1d kernel, (k,) or (1, 1, k); shortcut: like y, or None (then
// this is ops.eca); x_next = coef * y * gate(y) [+ shortcut]; a_next = silu(x_next) * beta_next when
// beta_next is given, else (0,); stats = the (N, C) channel means (fp32; fp64 for float64 y), which
// the backward reuses. The outputs take y's layout (eca_format). sums: y's (N, C) channel sums over
// its pixels when y's producer computed them (fused_conv's want_sums), so y is not read to pool it;
// they are y's function, not an input of their own: the backward differentiates through y.
TORCH_LIBRARY_FRAGMENT(nfnet_fast, m) {
  m.def(
      "eca_residual(Tensor y, Tensor weight, Tensor? shortcut, float coef, float? beta_next, Tensor? sums=None)"
      " -> (Tensor x_next, Tensor a_next, Tensor stats)");
  // Gradients of y, weight and, when grad_a_next is given, of x_next's total, which is the
  // shortcut's; without grad_a_next the third output is (0,) and the shortcut's gradient is
  // grad_x_next. A missing grad_x_next is zero. bias_sums: with want_bias_sums, the (2, C) sums of
  // grad_y and of the shortcut's gradient over (N, H, W) (eca_bias_sums), else (0,).
  m.def(
      "_eca_residual_backward(Tensor? grad_x_next, Tensor? grad_a_next, Tensor y, Tensor weight, Tensor? shortcut,"
      " Tensor stats, float coef, float? beta_next, bool want_bias_sums=False) -> (Tensor grad_y,"
      " Tensor grad_weight, Tensor grad_shortcut, Tensor bias_sums)");
}

TORCH_LIBRARY_IMPL(nfnet_fast, CPU, m) {
  m.impl("eca_residual", &eca_residual_cpu);
  m.impl("_eca_residual_backward", &eca_residual_backward_cpu);
}

// The backward op has no derivative of its own: a gradient of it (a double backward, e.g. a gradient
// penalty) is an error when asked for (autograd's not-implemented node), never silently zero, as the
// default fallback (a warning) made it. A first-order backward passes straight through.
TORCH_LIBRARY_IMPL(nfnet_fast, Autograd, m) {
  m.impl("_eca_residual_backward", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace nfnet_fast
