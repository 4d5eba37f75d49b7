// The adaptive_clip_grad_ op: nfnet_fast.train.adaptive_clip_grad_'s work after it has collected the
// parameters and their gradients, the same aten ops in the same order (so the same bits as its Python
// twin, train._clip_group), issued from C++. Why: the clipping is ~75 aten ops on an accelerator, but
// the Python that prepares them walks ~180 tensors (a row view of each parameter and gradient, a narrow
// and a view back of each gradient), 2.6 ms of host time a training step on the build machine and
// 9.2 ms on the H100 machine's host (docs/triton-training-step.md section 8), which an eager step whose
// host paces it pays in full. A composite (CompositeImplicitAutograd): every op it issues is dispatched as
// usual, so it runs on any device and under dispatch modes, fake tensors (static shapes: its shape
// arithmetic is on ints, so not under symbolic tracing, where Python takes the twin) and profilers.
#include <ATen/ScalarOps.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_foreach_copy.h>
#include <ATen/ops/_foreach_mul.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/linalg_vector_norm.h>
#include <ATen/ops/where.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <optional>
#include <utility>
#include <vector>

namespace nfnet_fast {
namespace {

// A unit (row) is t[i] for ndim > 1, all of t otherwise: train._row_count / _row_length.
int64_t row_count(const at::Tensor& t) { return t.dim() > 1 ? t.size(0) : 1; }
int64_t row_length(const at::Tensor& t) { return t.dim() > 1 ? t.numel() / t.size(0) : t.numel(); }

bool channels_last(const at::Tensor& t) {
  return t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// train._rows: t as a (units, row length) matrix, a view in memory order where t is contiguous or
// channels_last (a norm does not depend on the order), else a copy.
at::Tensor rows_of(const at::Tensor& t) {
  const auto r = channels_last(t) ? t.permute({0, 2, 3, 1}) : t;
  return r.reshape({row_count(t), row_length(t)});
}

// train._unrows: `rows` (t's units in rows_of's order) viewed with t's shape and strides.
at::Tensor unrows(const at::Tensor& rows, const at::Tensor& t) {
  if (channels_last(t)) return rows.view({t.size(0), t.size(2), t.size(3), t.size(1)}).permute({0, 3, 1, 2});
  return rows.view(t.sizes());
}

at::Tensor cat_or_one(const std::vector<at::Tensor>& ts) { return ts.size() == 1 ? ts[0] : at::cat(ts); }

// One (device, dtype) group: train._clip_group.
void clip_group(const std::vector<at::Tensor>& ps, const std::vector<at::Tensor>& gs, double clip_factor,
                double eps, double norm_type, bool batched) {
  // tensors grouped by row length, in order of first appearance (train._plan)
  std::vector<std::pair<int64_t, std::vector<size_t>>> groups;
  for (size_t i = 0; i < ps.size(); ++i) {
    const int64_t len = row_length(ps[i]);
    auto it = groups.begin();
    while (it != groups.end() && it->first != len) ++it;
    if (it == groups.end()) {
      groups.push_back({len, {}});
      it = groups.end() - 1;
    }
    it->second.push_back(i);
  }
  const auto acc = ps[0].scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto norms = [&](const at::Tensor& rows) {
    return at::linalg_vector_norm(rows, norm_type, at::IntArrayRef{1}, false, acc);
  };
  std::vector<at::Tensor> max_norm, grad_norm, grad_rows;
  for (const auto& group : groups) {
    if (batched) {
      std::vector<at::Tensor> p_rows, g_rows;
      for (size_t i : group.second) p_rows.push_back(rows_of(ps[i]));
      max_norm.push_back(norms(cat_or_one(p_rows)));
      for (size_t i : group.second) g_rows.push_back(rows_of(gs[i]));
      grad_rows.push_back(cat_or_one(g_rows));
      grad_norm.push_back(norms(grad_rows.back()));
    } else {
      for (size_t i : group.second) max_norm.push_back(norms(rows_of(ps[i])));
      for (size_t i : group.second) grad_norm.push_back(norms(rows_of(gs[i])));
    }
  }
  // (each op as Python dispatches it: the factor as a wrapped number, the operands in Python's order)
  auto factor = c10::scalar_to_tensor(clip_factor);
  factor.unsafeGetTensorImpl()->set_wrapped_number(true);
  auto max_n = at::cat(max_norm);
  max_n.clamp_(eps, std::nullopt).mul_(factor);
  const auto grad_n = at::cat(grad_norm);
  const auto below = grad_n.lt(max_n);
  const auto scale = at::where(below, 1.0, max_n.div(grad_n.clamp(1e-6, std::nullopt))).to(ps[0].scalar_type());
  std::vector<at::Tensor> dst, src;
  int64_t at_row = 0;
  for (size_t k = 0; k < groups.size(); ++k) {
    const auto& idx = groups[k].second;
    int64_t n_rows = 0;
    for (size_t i : idx) n_rows += row_count(gs[i]);
    const auto s = scale.narrow(0, at_row, n_rows);
    at_row += n_rows;
    int64_t start = 0;
    if (batched) {  // train._apply_batched: scale the stacked rows, copy back where they are not the gradient's
      grad_rows[k].mul_(s.unsqueeze(1));
      for (size_t i : idx) {
        const int64_t n = row_count(gs[i]);
        if (idx.size() > 1 || !grad_rows[k].is_alias_of(gs[i])) {
          dst.push_back(gs[i]);
          src.push_back(unrows(grad_rows[k].narrow(0, start, n), gs[i]));
        }
        start += n;
      }
    } else {  // train._apply_per_tensor: each tensor times its units' scales, broadcast
      for (size_t i : idx) {
        const int64_t n = row_count(gs[i]);
        std::vector<int64_t> shape(std::max<int64_t>(gs[i].dim(), 1), 1);
        shape[0] = n;
        dst.push_back(gs[i]);
        src.push_back(gs[i].dim() > 1 ? s.narrow(0, start, n).view(shape) : s.select(0, start));
        start += n;
      }
    }
  }
  if (dst.empty()) return;
  if (batched) {
    at::_foreach_copy_(dst, src, false);
  } else {
    at::_foreach_mul_(dst, src);
  }
}

// params[i] and grads[i] (the parameters with a gradient, each once, in the caller's order: the messages'
// indices count this list, not the caller's); batched:
// the accelerator path (true), the CPU one (false), or by each group's device (none: CPU per tensor).
void adaptive_clip_grad(at::TensorList params, at::TensorList grads, double clip_factor, double eps,
                        double norm_type, std::optional<bool> batched) {
  TORCH_CHECK(params.size() == grads.size(), "adaptive_clip_grad_: ", params.size(), " parameters and ",
              grads.size(), " gradients");
  // grouped by (device, dtype) in order of first appearance, as the twin groups them
  std::vector<std::pair<std::pair<at::Device, at::ScalarType>, std::pair<std::vector<at::Tensor>,
                                                                          std::vector<at::Tensor>>>>
      by_kind;
  for (size_t i = 0; i < params.size(); ++i) {
    const auto &p = params[i], &g = grads[i];
    TORCH_CHECK(p.layout() == c10::kStrided && g.layout() == c10::kStrided,
                "adaptive_clip_grad_: parameter ", i, " and its gradient must be strided (dense) tensors");
    TORCH_CHECK(at::isFloatingType(p.scalar_type()), "adaptive_clip_grad_: parameter ", i,
                " must be a floating-point tensor, got ", p.scalar_type());
    // (the shape only: a parameter whose .data changed dtype keeps a gradient of the old one, which the
    // twin, and timm, clip with the same ops)
    TORCH_CHECK(g.sizes() == p.sizes(), "adaptive_clip_grad_: gradient ", i, " has shape ", g.sizes(),
                " but its parameter has shape ", p.sizes());
    if (p.numel() == 0) continue;
    const auto kind = std::make_pair(p.device(), p.scalar_type());
    auto it = by_kind.begin();
    while (it != by_kind.end() && it->first != kind) ++it;
    if (it == by_kind.end()) {
      by_kind.push_back({kind, {}});
      it = by_kind.end() - 1;
    }
    it->second.first.push_back(p.detach());  // (as the twin: a detached grad, whatever its autograd state)
    it->second.second.push_back(g.detach());
  }
  for (const auto& [kind, tensors] : by_kind)
    clip_group(tensors.first, tensors.second, clip_factor, eps, norm_type,
               batched.value_or(kind.first.type() != c10::DeviceType::CPU));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(nfnet_fast, m) {
  m.def("adaptive_clip_grad_(Tensor[] params, Tensor(a!)[] grads, float clip_factor, float eps, float norm_type, "
        "bool? batched=None) -> ()");
}

TORCH_LIBRARY_IMPL(nfnet_fast, CompositeImplicitAutograd, m) { m.impl("adaptive_clip_grad_", &adaptive_clip_grad); }

}  // namespace nfnet_fast
