// Vector loads and stores for the CUDA kernels: V elements in one 16-, 8-, 4- or 2-byte access,
// held as 32-bit words and converted to and from the math type with bit operations. (A struct of
// c10::Half / c10::BFloat16 values also loads in one instruction, but nvcc then keeps one register
// per 16-bit element: twice the registers for a group of in-flight loads.)
// Callers guarantee alignment (pick_vec in common.h), so the casts below are legal.
#pragma once

#include <ATen/Dispatch.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

namespace nfnet_fast {

// Storage bits <-> fp32, round-to-nearest-even like c10's conversions.
template <typename T>
struct Bits;

template <>
struct Bits<float> {
  static __device__ __forceinline__ float to_float(unsigned u) { return __uint_as_float(u); }
  static __device__ __forceinline__ unsigned from_float(float f) { return __float_as_uint(f); }
};

template <>
struct Bits<c10::Half> {
  static __device__ __forceinline__ float to_float(unsigned u) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(u)));
  }
  static __device__ __forceinline__ unsigned from_float(float f) { return __half_as_ushort(__float2half_rn(f)); }
};

template <>
struct Bits<c10::BFloat16> {
  static __device__ __forceinline__ float to_float(unsigned u) { return __uint_as_float(u << 16); }
  static __device__ __forceinline__ unsigned from_float(float f) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(f));
  }
};

// V elements of T as raw 32-bit words (one word, half used, for a single 16-bit element).
template <typename T, int V>
struct Pack {
  static_assert(sizeof(T) == 2 || sizeof(T) == 4, "fp32, fp16 and bf16 only");
  static constexpr int kBytes = sizeof(T) * V;
  static constexpr int kWords = kBytes >= 4 ? kBytes / 4 : 1;
  unsigned w[kWords];
};

template <int V, typename scalar_t>
__device__ __forceinline__ Pack<scalar_t, V> load_pack(const scalar_t* __restrict__ p) {
  Pack<scalar_t, V> pk;
  constexpr int kBytes = Pack<scalar_t, V>::kBytes;
  if constexpr (kBytes == 16) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    pk.w[0] = u.x, pk.w[1] = u.y, pk.w[2] = u.z, pk.w[3] = u.w;
  } else if constexpr (kBytes == 8) {
    const uint2 u = *reinterpret_cast<const uint2*>(p);
    pk.w[0] = u.x, pk.w[1] = u.y;
  } else if constexpr (kBytes == 4) {
    pk.w[0] = *reinterpret_cast<const unsigned*>(p);
  } else {
    pk.w[0] = *reinterpret_cast<const unsigned short*>(p);
  }
  return pk;
}

template <int V, typename scalar_t>
__device__ __forceinline__ void unpack(const Pack<scalar_t, V>& pk, float (&out)[V]) {
#pragma unroll
  for (int i = 0; i < V; ++i) {
    if constexpr (sizeof(scalar_t) == 4) {
      out[i] = Bits<scalar_t>::to_float(pk.w[i]);
    } else {
      const unsigned word = pk.w[i / 2];
      out[i] = Bits<scalar_t>::to_float((i % 2) ? word >> 16 : word & 0xffffu);
    }
  }
}

template <int V, typename scalar_t>
__device__ __forceinline__ void load_vec(const scalar_t* __restrict__ p, float (&out)[V]) {
  unpack<V>(load_pack<V>(p), out);
}

template <int V, typename scalar_t>
__device__ __forceinline__ void store_vec(scalar_t* __restrict__ p, const float (&in)[V]) {
  Pack<scalar_t, V> pk;
#pragma unroll
  for (int i = 0; i < Pack<scalar_t, V>::kWords; ++i) pk.w[i] = 0;
#pragma unroll
  for (int i = 0; i < V; ++i) {
    const unsigned bits = Bits<scalar_t>::from_float(in[i]);
    if constexpr (sizeof(scalar_t) == 4)
      pk.w[i] = bits;
    else
      pk.w[i / 2] |= (i % 2) ? bits << 16 : bits;
  }
  constexpr int kBytes = Pack<scalar_t, V>::kBytes;
  if constexpr (kBytes == 16) {
    *reinterpret_cast<uint4*>(p) = make_uint4(pk.w[0], pk.w[1], pk.w[2], pk.w[3]);
  } else if constexpr (kBytes == 8) {
    *reinterpret_cast<uint2*>(p) = make_uint2(pk.w[0], pk.w[1]);
  } else if constexpr (kBytes == 4) {
    *reinterpret_cast<unsigned*>(p) = pk.w[0];
  } else {
    *reinterpret_cast<unsigned short*>(p) = static_cast<unsigned short>(pk.w[0]);
  }
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
#define NFF_DISPATCH_CUDA_TYPES(TYPE, NAME, ...)                              \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))
