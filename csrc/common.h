// Shared by the CPU twins (.cpp) and the CUDA kernels (.cu): per-element math lives in
// NFF_HD functions so the CPU build tests the very code the GPU runs.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <initializer_list>

#if defined(__CUDACC__)
#define NFF_HD __host__ __device__ __forceinline__
#else
#define NFF_HD inline
#endif

namespace nfnet_fast {

// Argument checks shared by every op: the message names the argument, as the Python layer does.
inline void check_float_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), name, " must be a tensor");
  TORCH_CHECK(t.layout() == c10::kStrided, name, " must be a strided (dense) tensor, got layout ", t.layout());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16 ||
                  t.scalar_type() == at::kDouble,
              name, " must be float32, float16 or bfloat16 (float64 on CPU), got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn) {
  TORCH_CHECK(a.device() == b.device(), an, " and ", bn, " must be on the same device, got ", a.device(), " and ",
              b.device());
}

// The CUDA kernels are built for the storage types of the network (fp32, fp16, bf16); float64 exists
// for gradcheck and runs on the CPU twins only.
inline void check_cuda_dtype(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() != at::kDouble, name,
              " is float64: the CUDA kernels take float32, float16 or bfloat16 (float64 runs on CPU tensors)");
}

// `t` with exactly the strides of `like` (a non-overlapping, dense tensor of the same shape), so the
// two can be walked as flat memory in step: t itself when the strides already agree, else a copy.
inline at::Tensor dense_like(const at::Tensor& t, const at::Tensor& like) {
  if (t.strides() == like.strides()) return t;
  auto r = at::empty_like(like);
  r.copy_(t);
  return r;
}

// The largest power of two (at most 16) that divides every address: 16 allows 128-bit accesses.
inline int common_alignment(std::initializer_list<const void*> ptrs) {
  int align = 16;
  for (const void* p : ptrs) {
    if (p == nullptr) continue;
    const auto a = reinterpret_cast<std::uintptr_t>(p);
    while (align > 1 && (a % static_cast<std::uintptr_t>(align)) != 0) align /= 2;
  }
  return align;
}

// Elements per vector access: a 16-byte vector, else an 8-byte one, else scalar, such that every
// access is aligned: `align` bytes divide every base pointer and the vector divides `inner`, the
// length of the contiguous runs (so each run starts aligned too). Only these three widths are
// compiled into the CUDA kernels.
inline int pick_vec(int elem_size, int64_t inner, int align) {
  for (int bytes = 16; bytes >= 8; bytes /= 2) {
    const int v = bytes / elem_size;
    if (v > 1 && bytes <= align && inner % v == 0) return v;
  }
  return 1;
}

// exp in the math type: expf / exp on the device (accurate versions, not __expf: the kernels are
// memory-bound, so exactness is free), std::exp on the host.
NFF_HD float nff_exp(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return std::exp(x);
#endif
}

NFF_HD double nff_exp(double x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);
#else
  return std::exp(x);
#endif
}

// Division in the math type. On the device, fp32 uses __fdividef (<= 2 ulp): IEEE division
// compiles to a slow-path subroutine call, whose register saves cost a stack frame and show up as
// spills in ptxas's report. Doubles, and everything on the host, divide exactly.
NFF_HD float nff_div(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdividef(a, b);
#else
  return a / b;
#endif
}

NFF_HD double nff_div(double a, double b) { return a / b; }

template <typename acc_t>
NFF_HD acc_t sigmoid(acc_t z) {
  // exp(-z) overflows to inf for very negative z, which gives the right limit 0.
  return nff_div(static_cast<acc_t>(1), static_cast<acc_t>(1) + nff_exp(-z));
}

}  // namespace nfnet_fast
