// Vector loads and stores for the CUDA kernels: V elements in one 16-, 8- or 2/4-byte access.
// Callers guarantee alignment (pick_vec in common.h), so the casts below are legal.
#pragma once

#include <ATen/Dispatch.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <type_traits>

namespace nfnet_fast {

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <int V, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_vec(const scalar_t* __restrict__ p, acc_t (&out)[V]) {
  const Pack<scalar_t, V> pk = *reinterpret_cast<const Pack<scalar_t, V>*>(p);
#pragma unroll
  for (int i = 0; i < V; ++i) out[i] = static_cast<acc_t>(pk.v[i]);
}

template <int V, typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_vec(scalar_t* __restrict__ p, const acc_t (&in)[V]) {
  Pack<scalar_t, V> pk;
#pragma unroll
  for (int i = 0; i < V; ++i) pk.v[i] = static_cast<scalar_t>(in[i]);
  *reinterpret_cast<Pack<scalar_t, V>*>(p) = pk;
}

// Calls f(std::integral_constant<int, V>{}) for the vector width chosen at run time: the 16-byte
// width, the 8-byte width, or 1 (scalar fallback). Other values cannot come from pick_vec.
template <typename scalar_t, typename F>
void dispatch_vec(int vec, F&& f) {
  constexpr int kV16 = 16 / sizeof(scalar_t);
  constexpr int kV8 = 8 / sizeof(scalar_t);
  if (vec == kV16) {
    f(std::integral_constant<int, kV16>{});
  } else if (kV8 > 1 && vec == kV8) {
    f(std::integral_constant<int, (kV8 > 1 ? kV8 : 1)>{});
  } else {
    TORCH_CHECK(vec == 1, "internal error: unsupported vector width ", vec);
    f(std::integral_constant<int, 1>{});
  }
}

}  // namespace nfnet_fast

// AT_DISPATCH for the dtypes the CUDA kernels are built for (float64 is rejected before this with
// check_cuda_dtype, so no double kernels are compiled).
#define NFF_DISPATCH_CUDA_TYPES(TYPE, NAME, ...)                 \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))
