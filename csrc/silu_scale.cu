// CUDA kernels of silu(x) * beta and its backward: a flat, memory-bound elementwise pass.
// Each thread handles kIlp vectors of 16 bytes (8 fp16/bf16 or 4 fp32 values): all loads are
// issued before any math (kept as raw words until then) so enough bytes are in flight to saturate HBM. Unaligned tensors fall
// back to 8-byte or scalar accesses (same kernel, V = 8/elem or 1); the n % V tail is done by the
// last block with scalar accesses.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "silu_scale.h"
#include "vec.cuh"

namespace nfnet_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kIlp = 4;
constexpr int kMinBlocks = 4;  // <= 64 registers: 4 resident blocks per SM

template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    silu_fwd_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out, int64_t n, float beta_f) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t beta = static_cast<acc_t>(beta_f);
  const int64_t nvec = n / V;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * (kThreads * kIlp) + threadIdx.x;
  Pack<scalar_t, V> xp[kIlp];
#pragma unroll
  for (int j = 0; j < kIlp; ++j) {
    const int64_t i = base + j * kThreads;
    if (i < nvec) xp[j] = load_pack<V>(x + i * V);
  }
#pragma unroll
  for (int j = 0; j < kIlp; ++j) {
    const int64_t i = base + j * kThreads;
    if (i < nvec) {
      acc_t v[V];
      unpack<V>(xp[j], v);
#pragma unroll
      for (int e = 0; e < V; ++e) v[e] = silu_scale_fwd<acc_t>(v[e], beta);
      store_vec<V>(out + i * V, v);
    }
  }
  if (blockIdx.x == gridDim.x - 1) {  // the n % V elements after the last whole vector
    const int64_t i = nvec * V + threadIdx.x;
    if (i < n) out[i] = static_cast<scalar_t>(silu_scale_fwd<acc_t>(static_cast<acc_t>(x[i]), beta));
  }
}

template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    silu_bwd_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x, scalar_t* __restrict__ dx,
                    int64_t n, float beta_f) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t beta = static_cast<acc_t>(beta_f);
  const int64_t nvec = n / V;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * (kThreads * kIlp) + threadIdx.x;
  Pack<scalar_t, V> gp[kIlp], xp[kIlp];
#pragma unroll
  for (int j = 0; j < kIlp; ++j) {
    const int64_t i = base + j * kThreads;
    if (i < nvec) {
      gp[j] = load_pack<V>(dy + i * V);
      xp[j] = load_pack<V>(x + i * V);
    }
  }
#pragma unroll
  for (int j = 0; j < kIlp; ++j) {
    const int64_t i = base + j * kThreads;
    if (i < nvec) {
      acc_t g[V], v[V];
      unpack<V>(gp[j], g);
      unpack<V>(xp[j], v);
#pragma unroll
      for (int e = 0; e < V; ++e) v[e] = silu_scale_bwd<acc_t>(g[e], v[e], beta);
      store_vec<V>(dx + i * V, v);
    }
  }
  if (blockIdx.x == gridDim.x - 1) {
    const int64_t i = nvec * V + threadIdx.x;
    if (i < n)
      dx[i] = static_cast<scalar_t>(silu_scale_bwd<acc_t>(static_cast<acc_t>(dy[i]), static_cast<acc_t>(x[i]), beta));
  }
}

// Blocks for n elements at V per access: whole blocks of kThreads * kIlp vectors, at least one
// (the tail-only case n < V).
int64_t blocks_for(int64_t n, int v) {
  const int64_t nvec = n / v, per_block = kThreads * kIlp;
  return std::max<int64_t>(1, (nvec + per_block - 1) / per_block);
}

at::Tensor silu_scale_cuda(const at::Tensor& x, double beta) {
  check_float_tensor(x, "x");
  check_cuda_dtype(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto a = silu_scale_args(x);
  if (a.n == 0) return a.out;
  const int64_t n = a.n;
  const auto& xc = a.x;
  const auto& out = a.out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  NFF_DISPATCH_CUDA_TYPES(x.scalar_type(), "silu_scale_cuda", [&] {
    // Flat memory: the tail is handled apart, so only the pointers' alignment limits the width.
    const int vec = pick_vec(sizeof(scalar_t), 16, common_alignment({xc.const_data_ptr(), out.const_data_ptr()}));
    dispatch_vec<scalar_t>(vec, [&](auto v) {
      constexpr int V = decltype(v)::value;
      silu_fwd_kernel<scalar_t, V><<<blocks_for(n, V), kThreads, 0, stream>>>(
          xc.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), n, static_cast<float>(beta));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

at::Tensor silu_scale_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x, double beta) {
  check_float_tensor(x, "x");
  check_cuda_dtype(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto a = silu_scale_backward_args(grad_out, x);
  if (a.n == 0) return a.grad_x;
  const int64_t n = a.n;
  const auto &xc = a.x, &gc = a.grad_out, &dx = a.grad_x;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  NFF_DISPATCH_CUDA_TYPES(x.scalar_type(), "silu_scale_backward_cuda", [&] {
    const int vec = pick_vec(sizeof(scalar_t), 16,
                             common_alignment({xc.const_data_ptr(), gc.const_data_ptr(), dx.const_data_ptr()}));
    dispatch_vec<scalar_t>(vec, [&](auto v) {
      constexpr int V = decltype(v)::value;
      silu_bwd_kernel<scalar_t, V><<<blocks_for(n, V), kThreads, 0, stream>>>(
          gc.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(), n,
          static_cast<float>(beta));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(nfnet_fast, CUDA, m) {
  m.impl("silu_scale", &silu_scale_cuda);
  m.impl("_silu_scale_backward", &silu_scale_backward_cuda);
}

}  // namespace nfnet_fast
