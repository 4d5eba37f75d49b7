// CUDA kernels of scaled weight standardisation: one block per output channel (a row of the
// weight's fan-in, a few KB that stays in L1 between passes), math shared with the CPU twin.
// Rows are read with 16- or 8-byte vectors when the fan-in and the pointers allow it.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "reduce.cuh"
#include "scaled_std_weight.h"
#include "vec.cuh"

#include <type_traits>

namespace nfnet_fast {
namespace {

constexpr int kThreads = 256;

// V consecutive values of a row in the math type: one 16- or 8-byte access (vec.cuh) for
// fp32/fp16/bf16 when the row allows it, a plain load otherwise (and always for float64).
template <int V, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_row(const scalar_t* __restrict__ p, acc_t (&out)[V]) {
  if constexpr (V == 1)
    out[0] = static_cast<acc_t>(p[0]);
  else
    load_vec<V>(p, out);
}

template <int V, typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_row(scalar_t* __restrict__ p, const acc_t (&in)[V]) {
  if constexpr (V == 1)
    p[0] = static_cast<scalar_t>(in[0]);
  else
    store_vec<V>(p, in);
}

// mean and rstd of a row of n values (n % V == 0), with the two-pass variance of the CPU twin.
template <int V, typename scalar_t, typename acc_t>
__device__ __forceinline__ void row_stats(const scalar_t* wr, int64_t n, acc_t eps, acc_t* scratch, acc_t& mean,
                                          acc_t& rstd) {
  acc_t s1 = 0;
  for (int64_t i = threadIdx.x * V; i < n; i += blockDim.x * V) {
    acc_t v[V];
    load_row<V>(wr + i, v);
#pragma unroll
    for (int e = 0; e < V; ++e) s1 += v[e];
  }
  mean = block_sum(s1, scratch) / static_cast<acc_t>(n);
  acc_t s2 = 0;
  for (int64_t i = threadIdx.x * V; i < n; i += blockDim.x * V) {
    acc_t v[V];
    load_row<V>(wr + i, v);
#pragma unroll
    for (int e = 0; e < V; ++e) s2 += (v[e] - mean) * (v[e] - mean);
  }
  rstd = row_rstd<acc_t>(block_sum(s2, scratch), n, eps);
}

template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads) fwd_kernel(const scalar_t* __restrict__ w, const scalar_t* __restrict__ gain,
                                                       scalar_t* __restrict__ out, int64_t n, float scale, float eps) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t scratch[32];
  const int64_t o = blockIdx.x;
  const scalar_t* wr = w + o * n;
  acc_t mean, rstd;
  row_stats<V>(wr, n, static_cast<acc_t>(eps), scratch, mean, rstd);
  const acc_t mul = rstd * static_cast<acc_t>(gain[o]) * static_cast<acc_t>(scale);
  for (int64_t i = threadIdx.x * V; i < n; i += blockDim.x * V) {
    acc_t v[V];
    load_row<V>(wr + i, v);
#pragma unroll
    for (int e = 0; e < V; ++e) v[e] = std_weight_fwd<acc_t>(v[e], mean, mul);
    store_row<V>(out + o * n + i, v);
  }
}

template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads)
    bwd_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ w, const scalar_t* __restrict__ gain,
               scalar_t* __restrict__ dw, scalar_t* __restrict__ dgain, int64_t n, float scale, float eps) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t scratch[32];
  const int64_t o = blockIdx.x;
  const scalar_t* wr = w + o * n;
  const scalar_t* dyr = dy + o * n;
  acc_t mean, rstd;
  row_stats<V>(wr, n, static_cast<acc_t>(eps), scratch, mean, rstd);
  acc_t s_dy = 0, s_dy_xhat = 0;
  for (int64_t i = threadIdx.x * V; i < n; i += blockDim.x * V) {
    acc_t g[V], v[V];
    load_row<V>(dyr + i, g);
    load_row<V>(wr + i, v);
#pragma unroll
    for (int e = 0; e < V; ++e) {
      s_dy += g[e];
      s_dy_xhat += g[e] * (v[e] - mean) * rstd;
    }
  }
  s_dy = block_sum(s_dy, scratch);
  s_dy_xhat = block_sum(s_dy_xhat, scratch);
  if (threadIdx.x == 0) dgain[o] = static_cast<scalar_t>(s_dy_xhat * static_cast<acc_t>(scale));
  const acc_t gs = static_cast<acc_t>(gain[o]) * static_cast<acc_t>(scale);
  const acc_t mean_dy = s_dy / static_cast<acc_t>(n), mean_dy_xhat = s_dy_xhat / static_cast<acc_t>(n);
  for (int64_t i = threadIdx.x * V; i < n; i += blockDim.x * V) {
    acc_t g[V], v[V];
    load_row<V>(dyr + i, g);
    load_row<V>(wr + i, v);
#pragma unroll
    for (int e = 0; e < V; ++e) v[e] = std_weight_bwd<acc_t>(g[e], (v[e] - mean) * rstd, rstd, gs, mean_dy, mean_dy_xhat);
    store_row<V>(dw + o * n + i, v);
  }
}

// Fewer threads for short rows (the stem's first conv has fan-in 27): whole warps, at most kThreads.
int threads_for(int64_t n_access) {
  const int64_t warps = (n_access + 31) / 32;
  return static_cast<int>(std::min<int64_t>(kThreads, std::max<int64_t>(32, warps * 32)));
}

// Calls f(V) with the vector width for rows of n values at these addresses (always 1 for float64).
template <typename scalar_t, typename F>
void dispatch_row_vec(int64_t n, std::initializer_list<const void*> ptrs, F&& f) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    f(std::integral_constant<int, 1>{});
  } else {
    dispatch_vec<scalar_t>(pick_vec(sizeof(scalar_t), n, common_alignment(ptrs)), f);
  }
}

at::Tensor scaled_std_weight_cuda(const at::Tensor& weight, const at::Tensor& gain, double scale, double eps) {
  const c10::cuda::CUDAGuard guard(weight.device());
  const auto a = std_weight_args(weight, gain);
  if (a.empty()) return a.out;
  const int64_t n = a.n;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.weight.scalar_type(), "scaled_std_weight_cuda", [&] {
    dispatch_row_vec<scalar_t>(n, {a.weight.const_data_ptr(), a.out.const_data_ptr()}, [&](auto v) {
      constexpr int V = decltype(v)::value;
      fwd_kernel<scalar_t, V><<<a.rows, threads_for(n / V), 0, stream>>>(
          a.weight.const_data_ptr<scalar_t>(), a.gain.const_data_ptr<scalar_t>(), a.out.mutable_data_ptr<scalar_t>(),
          n, scale, eps);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return a.out;
}

std::tuple<at::Tensor, at::Tensor> scaled_std_weight_backward_cuda(const at::Tensor& grad_out,
                                                                   const at::Tensor& weight, const at::Tensor& gain,
                                                                   double scale, double eps) {
  const c10::cuda::CUDAGuard guard(weight.device());
  const auto a = std_weight_backward_args(grad_out, weight, gain);
  if (a.empty()) return {a.grad_weight, a.grad_gain};
  const int64_t n = a.n;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.weight.scalar_type(), "scaled_std_weight_backward_cuda",
                                  [&] {
    dispatch_row_vec<scalar_t>(
        n, {a.grad_out.const_data_ptr(), a.weight.const_data_ptr(), a.grad_weight.const_data_ptr()}, [&](auto v) {
          constexpr int V = decltype(v)::value;
          bwd_kernel<scalar_t, V><<<a.rows, threads_for(n / V), 0, stream>>>(
              a.grad_out.const_data_ptr<scalar_t>(), a.weight.const_data_ptr<scalar_t>(),
              a.gain.const_data_ptr<scalar_t>(), a.grad_weight.mutable_data_ptr<scalar_t>(),
              a.grad_gain.mutable_data_ptr<scalar_t>(), n, scale, eps);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  });
  return {a.grad_weight, a.grad_gain};
}

}  // namespace

TORCH_LIBRARY_IMPL(nfnet_fast, CUDA, m) {
  m.impl("scaled_std_weight", &scaled_std_weight_cuda);
  m.impl("_scaled_std_weight_backward", &scaled_std_weight_backward_cuda);
}

}  // namespace nfnet_fast
