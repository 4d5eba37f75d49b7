// CUDA kernels of scaled weight standardisation: one block per output channel (a row of the
// weight's fan-in, a few KB that stays in L1 between passes), math shared with the CPU twin.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "reduce.cuh"
#include "scaled_std_weight.h"

namespace nfnet_fast {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void row_stats(const scalar_t* wr, int64_t n, acc_t eps, acc_t* scratch, acc_t& mean,
                                          acc_t& rstd) {
  acc_t s1 = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s1 += static_cast<acc_t>(wr[i]);
  mean = block_sum(s1, scratch) / static_cast<acc_t>(n);
  acc_t s2 = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const acc_t d = static_cast<acc_t>(wr[i]) - mean;
    s2 += d * d;
  }
  rstd = row_rstd<acc_t>(block_sum(s2, scratch), n, eps);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) fwd_kernel(const scalar_t* __restrict__ w, const scalar_t* __restrict__ gain,
                                                       scalar_t* __restrict__ out, int64_t n, float scale, float eps) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t scratch[32];
  const int64_t o = blockIdx.x;
  const scalar_t* wr = w + o * n;
  acc_t mean, rstd;
  row_stats<scalar_t, acc_t>(wr, n, static_cast<acc_t>(eps), scratch, mean, rstd);
  const acc_t mul = rstd * static_cast<acc_t>(gain[o]) * static_cast<acc_t>(scale);
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
    out[o * n + i] = static_cast<scalar_t>(std_weight_fwd<acc_t>(static_cast<acc_t>(wr[i]), mean, mul));
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    bwd_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ w, const scalar_t* __restrict__ gain,
               scalar_t* __restrict__ dw, scalar_t* __restrict__ dgain, int64_t n, float scale, float eps) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t scratch[32];
  const int64_t o = blockIdx.x;
  const scalar_t* wr = w + o * n;
  const scalar_t* dyr = dy + o * n;
  acc_t mean, rstd;
  row_stats<scalar_t, acc_t>(wr, n, static_cast<acc_t>(eps), scratch, mean, rstd);
  acc_t s_dy = 0, s_dy_xhat = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const acc_t g = static_cast<acc_t>(dyr[i]);
    s_dy += g;
    s_dy_xhat += g * (static_cast<acc_t>(wr[i]) - mean) * rstd;
  }
  s_dy = block_sum(s_dy, scratch);
  s_dy_xhat = block_sum(s_dy_xhat, scratch);
  if (threadIdx.x == 0) dgain[o] = static_cast<scalar_t>(s_dy_xhat * static_cast<acc_t>(scale));
  const acc_t gs = static_cast<acc_t>(gain[o]) * static_cast<acc_t>(scale);
  const acc_t mean_dy = s_dy / static_cast<acc_t>(n), mean_dy_xhat = s_dy_xhat / static_cast<acc_t>(n);
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const acc_t xhat = (static_cast<acc_t>(wr[i]) - mean) * rstd;
    dw[o * n + i] =
        static_cast<scalar_t>(std_weight_bwd<acc_t>(static_cast<acc_t>(dyr[i]), xhat, rstd, gs, mean_dy, mean_dy_xhat));
  }
}

// Fewer threads for short rows (1x1 convs of the stem have fan-in 3..27): whole warps, at most kThreads.
int threads_for(int64_t n) {
  const int64_t warps = (n + 31) / 32;
  return static_cast<int>(std::min<int64_t>(kThreads, std::max<int64_t>(32, warps * 32)));
}

void check_args(const at::Tensor& weight, const at::Tensor& gain) {
  check_float_tensor(weight, "weight");
  check_float_tensor(gain, "gain");
  check_same_device(weight, "weight", gain, "gain");
  TORCH_CHECK(weight.dim() >= 2, "weight must have at least 2 dims, got shape ", weight.sizes());
  TORCH_CHECK(gain.numel() == weight.size(0), "gain must have one value per output channel (", weight.size(0),
              "), got shape ", gain.sizes());
  TORCH_CHECK(gain.scalar_type() == weight.scalar_type(), "gain dtype ", gain.scalar_type(),
              " must equal weight dtype ", weight.scalar_type());
}

at::Tensor scaled_std_weight_cuda(const at::Tensor& weight, const at::Tensor& gain, double scale, double eps) {
  check_args(weight, gain);
  const c10::cuda::CUDAGuard guard(weight.device());
  const auto w = weight.contiguous();
  const auto g = gain.contiguous();
  auto out = at::empty_like(w, at::MemoryFormat::Contiguous);
  const int64_t rows = w.size(0), n = rows ? w.numel() / rows : 0;
  if (w.numel() == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "scaled_std_weight_cuda", [&] {
    fwd_kernel<scalar_t><<<rows, threads_for(n), 0, stream>>>(w.const_data_ptr<scalar_t>(),
                                                              g.const_data_ptr<scalar_t>(),
                                                              out.mutable_data_ptr<scalar_t>(), n, scale, eps);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> scaled_std_weight_backward_cuda(const at::Tensor& grad_out,
                                                                   const at::Tensor& weight, const at::Tensor& gain,
                                                                   double scale, double eps) {
  check_args(weight, gain);
  check_float_tensor(grad_out, "grad_out");
  check_same_device(grad_out, "grad_out", weight, "weight");
  TORCH_CHECK(grad_out.sizes() == weight.sizes(), "grad_out shape ", grad_out.sizes(), " must equal weight shape ",
              weight.sizes());
  const c10::cuda::CUDAGuard guard(weight.device());
  const auto w = weight.contiguous();
  const auto g = gain.contiguous();
  const auto dy = grad_out.to(w.scalar_type()).contiguous();
  auto dw = at::empty_like(w, at::MemoryFormat::Contiguous);
  auto dgain = at::empty_like(g, at::MemoryFormat::Contiguous);
  const int64_t rows = w.size(0), n = rows ? w.numel() / rows : 0;
  if (w.numel() == 0) return {dw, dgain};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "scaled_std_weight_backward_cuda", [&] {
    bwd_kernel<scalar_t><<<rows, threads_for(n), 0, stream>>>(
        dy.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(),
        dw.mutable_data_ptr<scalar_t>(), dgain.mutable_data_ptr<scalar_t>(), n, scale, eps);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dw, dgain};
}

}  // namespace

TORCH_LIBRARY_IMPL(nfnet_fast, CUDA, m) {
  m.impl("scaled_std_weight", &scaled_std_weight_cuda);
  m.impl("scaled_std_weight_backward", &scaled_std_weight_backward_cuda);
}

}  // namespace nfnet_fast
