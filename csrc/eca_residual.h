// The eca_residual op: ECA (efficient channel attention) fused with the NF block's residual tail.
// Its names, the same in nfnet_fast/ops.py, kernels/eca_residual.py and here:
//
//   mean[n, c]  = sum_hw y[n, c] / HW                           (pooling, fp32 sums)
//   g[n, c]     = sigmoid(sum_j w[j] * mean[n, c + j - p])      (conv1d over channels, k odd,
//                                                                zero padding p = (k - 1) / 2)
//   x_next      = coef * g * y + shortcut                        (coef = alpha * attn_gain;
//                                                                no shortcut: ops.eca, coef = gain)
//   a_next      = silu(x_next) * beta_next                       (optional next pre-activation)
//   stats       = mean, the (N, C) channel means the backward reuses
//
// The per-channel and per-element math below is shared by the CPU twin (eca_residual_cpu.cpp) and
// the CUDA kernels (eca_residual.cu), and so are the work plan and the host-side argument handling.
//
// Backward, with dX = d(loss)/d(x_next) (its own gradient plus the one through a_next):
//   dX        = dout + dact * beta * silu'(out)       (out = x_next recomputed in fp32 from y, shortcut, g)
//   dsum[n,c] = sum_hw dX * y
//   dz[n,c]   = dsum * scale * g * (1 - g)                         (gradient of the gate's logit)
//   dmean[c]  = sum_j w[j] * dz[c - j + p]                         (the conv1d transposed)
//   dy        = dX * scale * g + dmean / HW,  dshortcut = dX,  dw[j] = sum_{n,c} dz[n,c] * mean[n,c+j-p]
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <optional>

#include "common.h"
#include "silu_scale.h"

namespace nfnet_fast {

// ---------------------------------------------------------------------------------------------
// per-channel math

template <typename acc_t>
NFF_HD acc_t eca_mean(acc_t sum, int64_t hw) {
  return nff_div(sum, static_cast<acc_t>(hw));
}

// Logit of channel c's gate; `m` points at mean[c - p] of a window that holds zeros for channels
// outside [0, C) (the conv1d's zero padding).
template <typename acc_t>
NFF_HD acc_t eca_logit(const acc_t* m, const acc_t* w, int k) {
  acc_t z = 0;
  for (int j = 0; j < k; ++j) z += w[j] * m[j];
  return z;
}

// Gradient of the logit from dsum = sum_hw dX * y, since out = scale * g * y + ...
template <typename acc_t>
NFF_HD acc_t eca_dlogit(acc_t dsum, acc_t g, acc_t scale) {
  return dsum * scale * g * (static_cast<acc_t>(1) - g);
}

// Gradient of mean[c] through the conv1d; `dz_hi` points at dz[c + p] of a window that holds
// zeros outside [0, C).
template <typename acc_t>
NFF_HD acc_t eca_dmean(const acc_t* dz_hi, const acc_t* w, int k) {
  acc_t d = 0;
  for (int j = 0; j < k; ++j) d += w[j] * dz_hi[-j];
  return d;
}

// dmean[c] / HW: what every element of channel c gets back through the pooling.
template <typename acc_t>
NFF_HD acc_t eca_dmean_hw(const acc_t* dz_hi, const acc_t* w, int k, int64_t hw) {
  return nff_div(eca_dmean(dz_hi, w, k), static_cast<acc_t>(hw));
}

// Gradient of w[j] from one (n, c): dz[c] times the mean the tap saw; summed over n, c.
template <typename acc_t>
NFF_HD acc_t eca_dweight_term(acc_t dz, acc_t mean_tap) {
  return dz * mean_tap;
}

// ---------------------------------------------------------------------------------------------
// per-element math; coef = scale * g of the element's channel, sc = 0 without a shortcut

template <typename acc_t>
NFF_HD acc_t eca_out(acc_t y, acc_t sc, acc_t coef) {
  return sc + coef * y;
}

template <typename acc_t>
NFF_HD acc_t eca_act(acc_t out, acc_t beta) {
  return silu_scale_fwd(out, beta);
}

// Total gradient of out: its own plus the one through act = silu(out) * beta.
template <typename acc_t>
NFF_HD acc_t eca_dout_total(acc_t dout, acc_t dact, acc_t out, acc_t beta) {
  return dout + silu_scale_bwd(dact, out, beta);
}

// dy from the total gradient of out; dmean_hw = dmean[c] / HW.
template <typename acc_t>
NFF_HD acc_t eca_dy(acc_t dX, acc_t coef, acc_t dmean_hw) {
  return dX * coef + dmean_hw;
}

// ---------------------------------------------------------------------------------------------
// work plan, shared by both devices so the CPU tests exercise it
//
// The tensor is cut into blocks of (image n, tile of channels, range of pixels). The pooling pass
// writes one fp32 partial sum per (n, range, channel) into a workspace [N, splits, C]; the apply
// pass adds a channel's `splits` partials when it builds the gate. No atomics, no grid-wide
// sync, and the sums are deterministic (a fixed order), unlike atomicAdd into [N, C]. The split
// count is small (<= kEcaMaxSplits) so summing the partials is cheap next to the block's pixels;
// it exists to give the GPU enough blocks when N * tiles alone is too few (the stage at 72x72 has
// one tile of 256 channels per image).

constexpr int kEcaThreads = 256;    // CUDA threads per block
constexpr int kEcaMaxSplits = 16;

struct EcaPlan {
  bool channels_last = false;
  int64_t N = 0, C = 0, HW = 0;
  int vec = 1;            // elements per access along the contiguous dim (C if channels_last, else HW)
  int64_t tile = 1;       // channels per block (CUDA) or per task (CPU: all C)
  int64_t ctiles = 1;     // tiles per image
  int ct = 1;             // CUDA, channels_last: threads across a tile (one vector each), power of 2 <= 32
  int64_t splits = 1;     // pixel ranges per (image, tile)
  int64_t split_len = 1;  // pixels per range (a multiple of vec in NCHW so vector accesses stay aligned)
  int64_t blocks() const { return N * ctiles * splits; }
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// `align`: common_alignment of every tensor the kernels touch; `cuda`: block shapes of eca_residual.cu
// (else one task per (image, range) with all channels); `target_blocks`: how many blocks fill the
// device (CUDA: a few waves of resident blocks; CPU: a few tasks per thread).
inline EcaPlan eca_plan(int64_t N, int64_t C, int64_t HW, int elem_size, bool channels_last, int align, bool cuda,
                        int64_t target_blocks) {
  EcaPlan p;
  p.channels_last = channels_last;
  p.N = N;
  p.C = C;
  p.HW = HW;
  p.vec = pick_vec(elem_size, channels_last ? C : HW, align);
  int64_t min_split;  // fewest pixels per range: enough loads per thread to amortise the block's set-up
  if (!cuda) {
    p.tile = C;
    min_split = 16;
  } else if (channels_last) {
    // A warp spans up to 32 vectors (512 contiguous bytes) of one pixel; the block's other threads
    // take other pixels. Narrow C uses a narrower span and more pixels per step.
    const int64_t vecs = ceil_div(C, p.vec);
    int ct = 1;
    while (ct < 32 && ct < vecs) ct *= 2;
    p.ct = ct;
    p.tile = static_cast<int64_t>(ct) * p.vec;
    min_split = 4 * (kEcaThreads / ct);
  } else {
    // NCHW: a warp per channel row, so a block covers kEcaThreads / 32 channels.
    p.tile = kEcaThreads / 32;
    min_split = 2 * 32 * p.vec;
  }
  p.ctiles = ceil_div(C, p.tile);
  int64_t s = ceil_div(std::max<int64_t>(target_blocks, 1), N * p.ctiles);
  s = std::min<int64_t>(std::max<int64_t>(s, 1), kEcaMaxSplits);
  s = std::min<int64_t>(s, std::max<int64_t>(1, HW / min_split));
  int64_t len = ceil_div(HW, s);
  if (!channels_last) len = ceil_div(len, p.vec) * p.vec;  // HW % vec == 0, so len <= HW still
  p.split_len = len;
  p.splits = ceil_div(HW, len);
  return p;
}

// ---------------------------------------------------------------------------------------------
// host-side argument handling, shared by the CPU and CUDA entry points

// The layout the op runs in and returns: NCHW if y is contiguous, else channels_last if y is
// channels_last-contiguous, else the format y's strides resemble (y is then copied). The same
// rule as nfnet_fast/_library.py's activation_format (fake kernels, Triton launchers).
inline at::MemoryFormat eca_format(const at::Tensor& y) {
  if (y.is_contiguous()) return at::MemoryFormat::Contiguous;
  if (y.is_contiguous(at::MemoryFormat::ChannelsLast)) return at::MemoryFormat::ChannelsLast;
  return y.suggest_memory_format();
}

inline void eca_check_activation(const at::Tensor& t, const char* name) {
  check_float_tensor(t, name);
  TORCH_CHECK(t.dim() == 4, name, " must be 4-D (N, C, H, W), got shape ", t.sizes());
  TORCH_CHECK(t.numel() > 0, name, " must be non-empty, got shape ", t.sizes());
}

inline void eca_check_like(const at::Tensor& t, const char* name, const at::Tensor& y, const char* yname) {
  check_float_tensor(t, name);
  check_same_device(t, name, y, yname);
  TORCH_CHECK(t.sizes() == y.sizes(), name, " shape ", t.sizes(), " must equal ", yname, " shape ", y.sizes());
  TORCH_CHECK(t.scalar_type() == y.scalar_type(), name, " dtype ", t.scalar_type(), " must equal ", yname, " dtype ",
              y.scalar_type());
}

// The conv1d kernel as k values in the math dtype of y.
inline at::Tensor eca_weight(const at::Tensor& weight, const at::Tensor& y) {
  check_float_tensor(weight, "weight");
  check_same_device(weight, "weight", y, "y");
  const int64_t k = weight.numel();
  TORCH_CHECK((weight.dim() == 1 || (weight.dim() == 3 && weight.size(0) == 1 && weight.size(1) == 1)) && k % 2 == 1,
              "weight must be the ECA conv1d kernel, shape (k,) or (1, 1, k) with k odd, got shape ", weight.sizes());
  TORCH_CHECK(k <= 255, "weight: ECA kernel size ", k, " is larger than the supported 255");
  return weight.to(at::toOpMathType(y.scalar_type())).contiguous().reshape({k});
}

// What forward and backward share: y and the shortcut in the op's layout, the kernel, the sizes.
struct EcaInputs {
  at::Tensor y, sc, w;  // y and shortcut (undefined if absent) in `format`; w: (k,) in the math dtype
  at::MemoryFormat format;
  int64_t N, C, HW;
  int k;
  at::Tensor empty_act() const { return at::empty(y.sizes(), y.options().memory_format(format)); }
};

inline void eca_inputs(EcaInputs& a, const at::Tensor& y, const at::Tensor& weight,
                       const std::optional<at::Tensor>& shortcut) {
  eca_check_activation(y, "y");
  a.w = eca_weight(weight, y);
  a.k = static_cast<int>(a.w.numel());
  a.format = eca_format(y);
  a.y = y.contiguous(a.format);
  if (shortcut.has_value() && shortcut->defined()) {
    eca_check_like(*shortcut, "shortcut", y, "y");
    a.sc = shortcut->contiguous(a.format);
  }
  a.N = y.size(0);
  a.C = y.size(1);
  a.HW = y.size(2) * y.size(3);
}

struct EcaResidualArgs : EcaInputs {
  at::Tensor x_next, a_next, mean;  // a_next: (0,) when there is no beta_next; mean: (N, C) in the math dtype
  at::Tensor sums;                  // y's (N, C) channel sums from its producer, contiguous in the math
                                    // dtype; undefined when the op pools y itself
};

inline EcaResidualArgs eca_residual_args(const at::Tensor& y, const at::Tensor& weight,
                                         const std::optional<at::Tensor>& shortcut, std::optional<double> beta_next,
                                         const std::optional<at::Tensor>& sums) {
  EcaResidualArgs a;
  eca_inputs(a, y, weight, shortcut);
  TORCH_CHECK(!beta_next.has_value() || a.sc.defined(),
              "beta_next needs a shortcut: the next pre-activation belongs to the residual form (eca_residual)");
  a.x_next = a.empty_act();
  a.a_next = beta_next.has_value() ? a.empty_act() : at::empty({0}, y.options());
  const auto acc = at::toOpMathType(y.scalar_type());
  a.mean = at::empty({a.N, a.C}, y.options().dtype(acc));
  if (sums.has_value() && sums->defined()) {
    check_float_tensor(*sums, "sums");
    check_same_device(*sums, "sums", y, "y");
    TORCH_CHECK(sums->dim() == 2 && sums->size(0) == a.N && sums->size(1) == a.C,
                "sums must be y's (N, C) channel sums (", a.N, ", ", a.C, "), got shape ", sums->sizes());
    a.sums = sums->to(acc).contiguous();
  }
  return a;
}

struct EcaResidualBackwardArgs : EcaInputs {
  at::Tensor dout, dact, mean;      // d(loss)/d(x_next) and d(loss)/d(a_next) (dact undefined if absent)
  at::Tensor grad_y, grad_shortcut;  // grad_shortcut: dX when dact is given, else (0,)
};

inline EcaResidualBackwardArgs eca_residual_backward_args(
    const std::optional<at::Tensor>& grad_x_next, const std::optional<at::Tensor>& grad_a_next, const at::Tensor& y,
    const at::Tensor& weight, const std::optional<at::Tensor>& shortcut, const at::Tensor& stats,
    std::optional<double> beta_next) {
  EcaResidualBackwardArgs a;
  eca_inputs(a, y, weight, shortcut);
  const bool has_dout = grad_x_next.has_value() && grad_x_next->defined();
  const bool has_dact = grad_a_next.has_value() && grad_a_next->defined();
  TORCH_CHECK(has_dout || has_dact, "_eca_residual_backward needs grad_x_next or grad_a_next");
  auto grad_like_y = [&](const at::Tensor& g, const char* name) {  // any float dtype, y's shape and device
    check_float_tensor(g, name);
    check_same_device(g, name, y, "y");
    TORCH_CHECK(g.sizes() == y.sizes(), name, " shape ", g.sizes(), " must equal y shape ", y.sizes());
    return g.to(y.scalar_type()).contiguous(a.format);
  };
  if (has_dout) {
    a.dout = grad_like_y(*grad_x_next, "grad_x_next");
  } else {
    // x_next was not used: its gradient is zero (the kernels read it; a rare case in a model, where
    // x_next feeds the next block's shortcut and only a stage's first block drops it)
    a.dout = at::zeros(y.sizes(), y.options().memory_format(a.format));
  }
  if (has_dact) {
    a.dact = grad_like_y(*grad_a_next, "grad_a_next");
    TORCH_CHECK(beta_next.has_value(), "grad_a_next needs beta_next (the scale of a_next = silu(x_next) * beta_next)");
  }
  const auto acc = at::toOpMathType(y.scalar_type());
  check_same_device(stats, "stats", y, "y");
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == a.N && stats.size(1) == a.C && stats.scalar_type() == acc,
              "stats must be the (N, C) ", acc, " channel means that eca_residual returned, got shape ", stats.sizes(),
              " and dtype ", stats.scalar_type());
  a.mean = stats.contiguous();
  a.grad_y = a.empty_act();
  a.grad_shortcut = a.dact.defined() ? a.empty_act() : at::empty({0}, y.options());
  return a;
}

// The backward's fourth output, after its kernels ran: with want_bias_sums the (2, C) sums over (N, H, W) of
// grad_y and of the shortcut's gradient (fp32; float64 for float64 y), the gradients of the biases added last
// to y and to the shortcut (NormFreeBlock.bias_grads_in_eca), else (0,). Two aten sums here (the CPU twin: the
// passes the producers' backwards would run); the CUDA and Triton kernels make them from their reduction instead.
inline at::Tensor eca_bias_sums(const EcaResidualBackwardArgs& a, bool want_bias_sums) {
  const auto acc = a.y.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (!want_bias_sums) {
    return at::empty({0}, a.y.options().dtype(acc));
  }
  const at::Tensor& shortcut_grad = a.dact.defined() ? a.grad_shortcut : a.dout;
  return at::stack({a.grad_y.sum(at::IntArrayRef{0, 2, 3}, false, acc),
                    shortcut_grad.sum(at::IntArrayRef{0, 2, 3}, false, acc)});
}

}  // namespace nfnet_fast
