// Shared by the CPU twins (.cpp) and the CUDA kernels (.cu): per-element math lives in
// NFF_HD functions so the CPU build tests the very code the GPU runs.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

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

}  // namespace nfnet_fast
