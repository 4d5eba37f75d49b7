// CUDA kernels of the eca_residual op: ECA and the fused NF block tail (see eca_residual.h for the
// math, the names and the work plan).
//
// Forward: two launches, no grid-wide sync, so any size runs (up to 256x256x72x72 and beyond):
//   reduce_kernel<kPool>   y -> partial sums [N, splits, C] (fp32)
//   apply_kernel           each block adds the partials of its channels (+ the conv1d halo), builds
//                          the gates in shared memory, then streams out (and act) for its pixels.
// Backward: two launches plus a tiny one for the conv1d weight:
//   reduce_kernel<kDgrad*> sum dX * y per channel (and, with act, writes dX = grad of shortcut; with
//                          want_bias_sums, sums dX per channel too)
//   dgrad_apply_kernel     dz, dmean from the partials, then dy = dX * scale * g + dmean / HW (with
//                          want_bias_sums, also the pixel sums of dy and dX per image: the bias gradients)
//   dweight_kernel         per image sum_c dz * mean (shifted), then a sum over images.
//
// Blocks cover (image, channel tile, pixel range). channels_last: a warp reads up to 32
// consecutive 16-byte vectors of one pixel (512 contiguous bytes), the block's other warps take
// other pixels, so every access is a full, coalesced 128-bit load along C. NCHW: a warp walks one
// channel row with 16-byte vectors along H*W. Where alignment or C (or H*W) do not allow 16 bytes,
// the same kernels run with 8-byte vectors or scalars (V = 1).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <atomic>
#include <climits>
#include <cstdlib>

#include "eca_residual.h"
#include "reduce.cuh"
#include "vec.cuh"

namespace nfnet_fast {
namespace {

constexpr int kThreads = kEcaThreads;
// Register budget: 4 resident blocks (1024 threads, 64 registers) per SM, enough loads in flight
// to cover HBM latency with the U-deep load groups below. The backward reduction with act keeps
// four tensors' loads in flight and gets 2 blocks (128 registers), the forward apply with act 3
// (85 registers: at 64 its fp16/bf16 variants spill on sm_80). Without a minimum, ptxas picks its
// own target and spilled a few live values around the prologue.
constexpr int kMinBlocks = 4;
constexpr int kMinBlocksDgradAct = 2;
constexpr int kMinBlocksApplyAct = 3;

// What a block needs of the plan (kernel parameter, by value). Offsets are 64-bit; counts that are
// divided are 32-bit (64-bit integer division is a subroutine call on the GPU).
struct Geo {
  int64_t C, HW;
  int splits, split_len, ctiles, tile, ct, k;
  int sum_splits;  // pixel ranges of the sums the forward's apply reads: `splits`, or 1 for a producer's sums
};

Geo geo_of(const EcaPlan& p, int k) {
  TORCH_CHECK(p.C <= INT_MAX && p.HW <= INT_MAX, "eca: C and H * W must each be < 2^31");
  return Geo{p.C,
             p.HW,
             static_cast<int>(p.splits),
             static_cast<int>(p.split_len),
             static_cast<int>(p.ctiles),
             static_cast<int>(p.tile),
             p.ct,
             k,
             static_cast<int>(p.splits)};
}

struct BlockPos {
  int64_t n, c0, s, p0, p1;
};

// blockIdx.x -> (image, tile, range), range fastest so neighbouring blocks read neighbouring memory.
__device__ __forceinline__ BlockPos block_pos(const Geo& g) {
  unsigned b = blockIdx.x;
  const unsigned splits = g.splits, ctiles = g.ctiles;
  BlockPos r;
  r.s = b % splits;
  b /= splits;
  r.c0 = static_cast<int64_t>(b % ctiles) * g.tile;
  r.n = b / ctiles;
  r.p0 = r.s * g.split_len;
  r.p1 = min(g.HW, r.p0 + g.split_len);
  return r;
}

// The elements one thread visits: `count` vectors of V elements at off0 + it * step. `slot` is the
// tile position of its first channel: channels_last, element e of a vector is channel slot + e;
// NCHW, all V elements (consecutive pixels) are channel `slot`.
struct ThreadWork {
  int64_t c, off0, step;
  int count, slot;
  bool active;
};

template <bool CL, int V>
__device__ __forceinline__ ThreadWork thread_work(const Geo& g, const BlockPos& b) {
  ThreadWork w;
  if constexpr (CL) {
    const int tx = threadIdx.x % g.ct, ty = threadIdx.x / g.ct, pt = kThreads / g.ct;
    w.slot = tx * V;
    w.c = b.c0 + w.slot;
    const int64_t p = b.p0 + ty;
    w.off0 = (b.n * g.HW + p) * g.C + w.c;
    w.step = static_cast<int64_t>(pt) * g.C;
    w.count = p < b.p1 ? static_cast<int>(b.p1 - p + pt - 1) / pt : 0;
  } else {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    w.slot = warp;
    w.c = b.c0 + warp;
    const int64_t p = b.p0 + static_cast<int64_t>(lane) * V;
    w.off0 = (b.n * g.C + w.c) * g.HW + p;
    w.step = 32 * V;
    w.count = p < b.p1 ? static_cast<int>(b.p1 - p + 32 * V - 1) / (32 * V) : 0;
  }
  w.active = w.c < g.C;
  return w;
}

// Per-element coefficients of a thread's vector from a per-channel array of the tile.
template <bool CL, int V, typename acc_t>
__device__ __forceinline__ void tile_coefs(const acc_t* tile_vals, const ThreadWork& w, acc_t (&out)[V]) {
#pragma unroll
  for (int e = 0; e < V; ++e) out[e] = tile_vals[CL ? w.slot + e : w.slot];
}

// Writes the block's per-channel sums (each thread holds V partial sums) to dst[c] for the tile.
// channels_last: threads of equal tx hold the same channels, so they are added up through shared
// memory; NCHW: a warp holds one channel, added up with shuffles.
template <bool CL, int V, typename acc_t>
__device__ __forceinline__ void store_block_sums(const acc_t (&acc)[V], const Geo& g, const BlockPos& b,
                                                 const ThreadWork& w, acc_t* __restrict__ dst) {
  if constexpr (CL) {
    __shared__ acc_t red[kThreads * V];
    const int ct = g.ct, tx = threadIdx.x % ct, ty = threadIdx.x / ct, pt = kThreads / ct;
#pragma unroll
    for (int e = 0; e < V; ++e) red[(ty * V + e) * ct + tx] = acc[e];  // [ty][e][tx]: conflict-free along tx
    __syncthreads();
    const int t = threadIdx.x;  // tile slot e * ct + tx, i.e. channel c0 + tx * V + e
    if (t < ct * V) {
      const int e = t / ct, tx2 = t % ct;
      acc_t s = 0;
      for (int y = 0; y < pt; ++y) s += red[(y * V + e) * ct + tx2];
      const int64_t c = b.c0 + static_cast<int64_t>(tx2) * V + e;
      if (c < g.C) dst[c] = s;
    }
  } else {
    acc_t s = 0;
#pragma unroll
    for (int e = 0; e < V; ++e) s += acc[e];
    s = warp_sum(s);
    if (w.active && threadIdx.x % 32 == 0) dst[w.c] = s;
  }
}

// Channel means of the window [c_lo, c_lo + len) into m_s (zeros outside [0, C): the conv1d's
// padding), either from the partial sums (forward) or from the saved means (backward).
template <typename acc_t>
__device__ __forceinline__ void load_means_from_partials(acc_t* m_s, int64_t c_lo, int len, const Geo& g, int64_t n,
                                                         const acc_t* __restrict__ partial) {
  for (int t = threadIdx.x; t < len; t += kThreads) {
    const int64_t c = c_lo + t;
    acc_t m = 0;
    if (c >= 0 && c < g.C) {
      acc_t sum = 0;
      for (int s = 0; s < g.sum_splits; ++s) sum += partial[(n * g.sum_splits + s) * g.C + c];
      m = eca_mean(sum, g.HW);
    }
    m_s[t] = m;
  }
}

template <typename acc_t>
__device__ __forceinline__ void load_means(acc_t* m_s, int64_t c_lo, int len, const Geo& g, int64_t n,
                                           const acc_t* __restrict__ mean) {
  for (int t = threadIdx.x; t < len; t += kThreads) {
    const int64_t c = c_lo + t;
    m_s[t] = (c >= 0 && c < g.C) ? mean[n * g.C + c] : acc_t(0);
  }
}

// coef_s[t] = scale * gate of channel c0 + t, from means m_s of the window starting at c0 - p.
template <typename acc_t>
__device__ __forceinline__ void gates_to_coefs(acc_t* coef_s, const acc_t* m_s, const Geo& g, const BlockPos& b,
                                               const acc_t* __restrict__ w, acc_t scale) {
  for (int t = threadIdx.x; t < g.tile; t += kThreads)
    coef_s[t] = (b.c0 + t < g.C) ? scale * sigmoid(eca_logit(m_s + t, w, g.k)) : acc_t(0);
}

// ---------------------------------------------------------------------------------------------
// reduction pass: partial[n, s, c] = sum over the block's pixels of f(element)

enum ReduceMode { kPool = 0, kDgrad = 1, kDgradAct = 2 };

// kPool:     f = y
// kDgrad:    f = dout * y                                    (no act: dX = dout)
// kDgradAct: dX = dout + dact * beta * silu'(out), out = sc + scale * g * y recomputed in fp32;
//            dX is stored to dsc (the shortcut's gradient, read back by the apply pass); f = dX * y
// With spart (the backward's want_bias_sums), the backward modes also write spart[n, s, c] = sum of dX: the
// shortcut's gradient's pixel sums, from which the apply pass makes the producers' bias gradients.
template <typename scalar_t, int V, bool CL, int MODE>
__global__ void __launch_bounds__(kThreads, MODE == kDgradAct ? kMinBlocksDgradAct : kMinBlocks)
    reduce_kernel(const scalar_t* __restrict__ y, const scalar_t* __restrict__ dout, const scalar_t* __restrict__ dact,
                  const scalar_t* __restrict__ sc, const at::opmath_type<scalar_t>* __restrict__ mean,
                  const at::opmath_type<scalar_t>* __restrict__ w, scalar_t* __restrict__ dsc,
                  at::opmath_type<scalar_t>* __restrict__ partial, at::opmath_type<scalar_t>* __restrict__ spart,
                  float scale_f, float beta_f, Geo g) {
  using acc_t = at::opmath_type<scalar_t>;
  const BlockPos b = block_pos(g);
  const ThreadWork tw = thread_work<CL, V>(g, b);
  acc_t cf[V];
  if constexpr (MODE == kDgradAct) {
    // The gates of the tile, for recomputing out: means of [c0 - p, c0 + tile + p).
    extern __shared__ __align__(16) unsigned char smem_raw[];
    acc_t* m_s = reinterpret_cast<acc_t*>(smem_raw);
    const int p = (g.k - 1) / 2;
    acc_t* coef_s = m_s + g.tile + 2 * p;
    load_means(m_s, b.c0 - p, static_cast<int>(g.tile) + 2 * p, g, b.n, mean);
    __syncthreads();
    gates_to_coefs(coef_s, m_s, g, b, w, static_cast<acc_t>(scale_f));
    __syncthreads();
    tile_coefs<CL, V>(coef_s, tw, cf);
  }
  const acc_t beta = static_cast<acc_t>(beta_f);
  acc_t acc[V], acc_dX[V];  // (acc_dX: summed always, one add an element; stored only with spart)
#pragma unroll
  for (int e = 0; e < V; ++e) acc[e] = acc_dX[e] = 0;
  if (tw.active) {
    // U vectors per step, all loads issued before any math; a predicate rather than a
    // remainder loop handles the last step (a remainder loop made ptxas spill its trip count).
    constexpr int U = MODE == kDgradAct ? 2 : 4;
    for (int it = 0; it < tw.count; it += U) {
      Pack<scalar_t, V> yp[U], dp[U], ap[U], sp[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (it + u < tw.count) {
          const int64_t off = tw.off0 + (it + u) * tw.step;
          yp[u] = load_pack<V>(y + off);
          if constexpr (MODE != kPool) dp[u] = load_pack<V>(dout + off);
          if constexpr (MODE == kDgradAct) {
            ap[u] = load_pack<V>(dact + off);
            if (sc != nullptr) sp[u] = load_pack<V>(sc + off);
          }
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (it + u < tw.count) {
          acc_t yv[V];
          unpack<V>(yp[u], yv);
          if constexpr (MODE == kPool) {
#pragma unroll
            for (int e = 0; e < V; ++e) acc[e] += yv[e];
          } else {
            acc_t dX[V];
            unpack<V>(dp[u], dX);
            if constexpr (MODE == kDgradAct) {
              acc_t da[V], sv[V];
              unpack<V>(ap[u], da);
              if (sc != nullptr) {
                unpack<V>(sp[u], sv);
              } else {
#pragma unroll
                for (int e = 0; e < V; ++e) sv[e] = 0;
              }
#pragma unroll
              for (int e = 0; e < V; ++e) dX[e] = eca_dout_total(dX[e], da[e], eca_out(yv[e], sv[e], cf[e]), beta);
              store_vec<V>(dsc + tw.off0 + (it + u) * tw.step, dX);
            }
#pragma unroll
            for (int e = 0; e < V; ++e) {
              acc[e] += dX[e] * yv[e];
              acc_dX[e] += dX[e];
            }
          }
        }
      }
    }
  }
  store_block_sums<CL, V>(acc, g, b, tw, partial + (b.n * g.splits + b.s) * g.C);
  if (MODE != kPool && spart != nullptr) {  // (the same for the whole block: the barrier is reached by all)
    __syncthreads();  // (store_block_sums' shared buffer is read above before it is written again)
    store_block_sums<CL, V>(acc_dX, g, b, tw, spart + (b.n * g.splits + b.s) * g.C);
  }
}

// ---------------------------------------------------------------------------------------------
// forward apply: out = sc + scale * g * y, act = silu(out) * beta

enum ApplyMode { kEca = 0, kResidual = 1, kResidualAct = 2 };

template <typename scalar_t, int V, bool CL, int MODE>
__global__ void __launch_bounds__(kThreads, MODE == kResidualAct ? kMinBlocksApplyAct : kMinBlocks)
    apply_kernel(const scalar_t* __restrict__ y, const scalar_t* __restrict__ sc,
                 const at::opmath_type<scalar_t>* __restrict__ partial, const at::opmath_type<scalar_t>* __restrict__ w,
                 scalar_t* __restrict__ out, scalar_t* __restrict__ act, at::opmath_type<scalar_t>* __restrict__ mean,
                 float scale_f, float beta_f, Geo g) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int p = (g.k - 1) / 2;
  acc_t* m_s = reinterpret_cast<acc_t*>(smem_raw);  // means of [c0 - p, c0 + tile + p)
  acc_t* coef_s = m_s + g.tile + 2 * p;               // scale * gate of [c0, c0 + tile)
  const BlockPos b = block_pos(g);
  load_means_from_partials(m_s, b.c0 - p, static_cast<int>(g.tile) + 2 * p, g, b.n, partial);
  __syncthreads();
  gates_to_coefs(coef_s, m_s, g, b, w, static_cast<acc_t>(scale_f));
  if (b.s == 0) {  // one block per (image, tile) saves the means for the backward
    for (int t = threadIdx.x; t < g.tile; t += kThreads)
      if (b.c0 + t < g.C) mean[b.n * g.C + b.c0 + t] = m_s[t + p];
  }
  __syncthreads();
  const ThreadWork tw = thread_work<CL, V>(g, b);
  if (!tw.active) return;
  acc_t cf[V];
  tile_coefs<CL, V>(coef_s, tw, cf);
  const acc_t beta = static_cast<acc_t>(beta_f);
  constexpr int U = 4;  // vectors per step, loads first (see reduce_kernel)
  for (int it = 0; it < tw.count; it += U) {
    Pack<scalar_t, V> yp[U], sp[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (it + u < tw.count) {
        const int64_t off = tw.off0 + (it + u) * tw.step;
        yp[u] = load_pack<V>(y + off);
        if constexpr (MODE != kEca) sp[u] = load_pack<V>(sc + off);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (it + u < tw.count) {
        const int64_t off = tw.off0 + (it + u) * tw.step;
        acc_t v[V], sv[V];
        unpack<V>(yp[u], v);
        if constexpr (MODE != kEca) {
          unpack<V>(sp[u], sv);
        } else {
#pragma unroll
          for (int e = 0; e < V; ++e) sv[e] = 0;
        }
#pragma unroll
        for (int e = 0; e < V; ++e) v[e] = eca_out(v[e], sv[e], cf[e]);
        store_vec<V>(out + off, v);
        if constexpr (MODE == kResidualAct) {
#pragma unroll
          for (int e = 0; e < V; ++e) v[e] = eca_act(v[e], beta);
          store_vec<V>(act + off, v);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// backward apply: dy = dX * scale * g + dmean / HW
// With bpart (want_bias_sums), the blocks of the first pixel range also write y's and the shortcut's gradients'
// pixel sums per image: bpart[n, 0, c] = scale * g * S + HW * (dmean / HW), bpart[n, 1, c] = S, S = sum of dX
// (the reduce pass's spart): the bias gradients of y's producer (conv3) and the shortcut's (the downsample conv).

template <typename scalar_t, int V, bool CL>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    dgrad_apply_kernel(const scalar_t* __restrict__ dX_src, const at::opmath_type<scalar_t>* __restrict__ partial,
                       const at::opmath_type<scalar_t>* __restrict__ mean,
                       const at::opmath_type<scalar_t>* __restrict__ w, scalar_t* __restrict__ dy,
                       at::opmath_type<scalar_t>* __restrict__ dz_out, const at::opmath_type<scalar_t>* __restrict__ spart,
                       at::opmath_type<scalar_t>* __restrict__ bpart, float scale_f, Geo g) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int p = (g.k - 1) / 2;
  const int tile = static_cast<int>(g.tile);
  acc_t* m_s = reinterpret_cast<acc_t*>(smem_raw);  // means of [c0 - 2p, c0 + tile + 2p)
  acc_t* dz_s = m_s + tile + 4 * p;                   // dz of [c0 - p, c0 + tile + p)
  acc_t* coef_s = dz_s + tile + 2 * p;                // scale * g of [c0, c0 + tile)
  acc_t* add_s = coef_s + tile;                       // dmean / HW of [c0, c0 + tile)
  const acc_t scale = static_cast<acc_t>(scale_f);
  const BlockPos b = block_pos(g);
  load_means(m_s, b.c0 - 2 * p, tile + 4 * p, g, b.n, mean);
  __syncthreads();
  for (int t = threadIdx.x; t < tile + 2 * p; t += kThreads) {
    const int64_t c = b.c0 - p + t;
    const bool in_tile = t >= p && t < tile + p;
    acc_t dz = 0;
    if (c >= 0 && c < g.C) {
      const acc_t gate = sigmoid(eca_logit(m_s + t, w, g.k));
      acc_t dsum = 0;
      for (int s = 0; s < g.splits; ++s) dsum += partial[(b.n * g.splits + s) * g.C + c];
      dz = eca_dlogit(dsum, gate, scale);
      if (in_tile) {
        coef_s[t - p] = scale * gate;
        if (b.s == 0) dz_out[b.n * g.C + c] = dz;  // for the weight's gradient
      }
    } else if (in_tile) {
      coef_s[t - p] = 0;
    }
    dz_s[t] = dz;
  }
  __syncthreads();
  for (int t = threadIdx.x; t < tile; t += kThreads) {
    const int64_t c = b.c0 + t;
    add_s[t] = c < g.C ? eca_dmean_hw(dz_s + t + 2 * p, w, g.k, g.HW) : acc_t(0);
    if (bpart != nullptr && b.s == 0 && c < g.C) {
      acc_t S = 0;
      for (int s = 0; s < g.splits; ++s) S += spart[(b.n * g.splits + s) * g.C + c];
      bpart[(b.n * 2) * g.C + c] = coef_s[t] * S + static_cast<acc_t>(g.HW) * add_s[t];
      bpart[(b.n * 2 + 1) * g.C + c] = S;
    }
  }
  __syncthreads();
  const ThreadWork tw = thread_work<CL, V>(g, b);
  if (!tw.active) return;
  acc_t cf[V], ad[V];
  tile_coefs<CL, V>(coef_s, tw, cf);
  tile_coefs<CL, V>(add_s, tw, ad);
  constexpr int U = 4;  // vectors per step, loads first (see reduce_kernel)
  for (int it = 0; it < tw.count; it += U) {
    Pack<scalar_t, V> xp[U];
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (it + u < tw.count) xp[u] = load_pack<V>(dX_src + tw.off0 + (it + u) * tw.step);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (it + u < tw.count) {
        acc_t v[V];
        unpack<V>(xp[u], v);
#pragma unroll
        for (int e = 0; e < V; ++e) v[e] = eca_dy(v[e], cf[e], ad[e]);
        store_vec<V>(dy + tw.off0 + (it + u) * tw.step, v);
      }
    }
  }
}

// ws[n, j] = sum_c dz[n, c] * mean[n, c + j - p]: one block per image, a block reduction per tap.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    dweight_kernel(const acc_t* __restrict__ dz, const acc_t* __restrict__ mean, int64_t C, int k,
                   acc_t* __restrict__ ws) {
  __shared__ acc_t scratch[32];
  const int64_t n = blockIdx.x;
  const int p = (k - 1) / 2;
  for (int j = 0; j < k; ++j) {
    acc_t s = 0;
    for (int64_t c = threadIdx.x; c < C; c += kThreads) {
      const int64_t ct = c + j - p;
      if (ct >= 0 && ct < C) s += eca_dweight_term(dz[n * C + c], mean[n * C + ct]);
    }
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) ws[n * k + j] = s;
  }
}

// ---------------------------------------------------------------------------------------------
// host side

// Blocks that fill the device: kBlocksPerSm per SM, i.e. a few waves of resident 256-thread blocks
// (8 per SM fit by threads), so the last wave's tail is short. NFNET_FAST_ECA_BLOCKS_PER_SM
// overrides it for tuning.
int64_t target_blocks(int device) {
  static std::atomic<int> sm_cache[64];
  static const int per_sm = [] {
    const char* env = std::getenv("NFNET_FAST_ECA_BLOCKS_PER_SM");
    const int v = env ? std::atoi(env) : 0;
    return v > 0 ? v : 32;
  }();
  int sms = device >= 0 && device < 64 ? sm_cache[device].load(std::memory_order_relaxed) : 0;
  if (sms == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    if (device >= 0 && device < 64) sm_cache[device].store(sms, std::memory_order_relaxed);
  }
  return static_cast<int64_t>(sms) * per_sm;
}

unsigned int grid_of(const EcaPlan& pl) {
  const int64_t blocks = pl.blocks();
  TORCH_CHECK(blocks > 0 && blocks <= INT_MAX, "eca: tensor too large for one launch (", blocks, " blocks)");
  return static_cast<unsigned int>(blocks);
}

// Calls f(V, CL) with compile-time constants for the plan's vector width and layout.
template <typename scalar_t, typename F>
void dispatch_plan(const EcaPlan& pl, F&& f) {
  dispatch_vec<scalar_t>(pl.vec, [&](auto v) {
    if (pl.channels_last)
      f(v, std::true_type{});
    else
      f(v, std::false_type{});
  });
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.const_data_ptr<T>() : nullptr;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> eca_residual_cuda(const at::Tensor& y, const at::Tensor& weight,
                                                                 const std::optional<at::Tensor>& shortcut,
                                                                 double coef, std::optional<double> beta_next,
                                                                 const std::optional<at::Tensor>& sums) {
  eca_check_activation(y, "y");
  check_cuda_dtype(y, "y");
  const c10::cuda::CUDAGuard guard(y.device());
  auto a = eca_residual_args(y, weight, shortcut, beta_next, sums);
  const bool has_act = beta_next.has_value();
  const int mode = !a.sc.defined() ? kEca : (has_act ? kResidualAct : kResidual);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  NFF_DISPATCH_CUDA_TYPES(a.y.scalar_type(), "eca_residual_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* yp = a.y.const_data_ptr<scalar_t>();
    const scalar_t* sc = ptr_or_null<scalar_t>(a.sc);
    scalar_t* out = a.x_next.mutable_data_ptr<scalar_t>();
    scalar_t* act = has_act ? a.a_next.mutable_data_ptr<scalar_t>() : nullptr;
    const int align = common_alignment({yp, sc, out, act});
    const EcaPlan pl = eca_plan(a.N, a.C, a.HW, sizeof(scalar_t), a.format == at::MemoryFormat::ChannelsLast, align,
                                /*cuda=*/true, target_blocks(y.get_device()));
    // the producer's sums (one range per channel) stand in for the pooling pass's partial sums
    const bool pool = !a.sums.defined();
    auto partial = pool ? at::empty({pl.N * pl.splits * pl.C}, a.mean.options()) : a.sums;
    Geo g = geo_of(pl, a.k);
    if (!pool) g.sum_splits = 1;
    const int p = (a.k - 1) / 2;
    const size_t smem = sizeof(acc_t) * (2 * pl.tile + 2 * p);
    const acc_t* w = a.w.const_data_ptr<acc_t>();
    dispatch_plan<scalar_t>(pl, [&](auto v, auto cl) {
      constexpr int V = decltype(v)::value;
      constexpr bool CL = decltype(cl)::value;
      if (pool) {
        reduce_kernel<scalar_t, V, CL, kPool><<<grid_of(pl), kThreads, 0, stream>>>(
            yp, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, partial.mutable_data_ptr<acc_t>(), nullptr, 0.f,
            0.f, g);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      auto apply = [&](auto mode_c) {
        apply_kernel<scalar_t, V, CL, decltype(mode_c)::value><<<grid_of(pl), kThreads, smem, stream>>>(
            yp, sc, partial.const_data_ptr<acc_t>(), w, out, act, a.mean.mutable_data_ptr<acc_t>(),
            static_cast<float>(coef), static_cast<float>(beta_next.value_or(0.0)), g);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (mode == kEca)
        apply(std::integral_constant<int, kEca>{});
      else if (mode == kResidual)
        apply(std::integral_constant<int, kResidual>{});
      else
        apply(std::integral_constant<int, kResidualAct>{});
    });
  });
  return {a.x_next, a.a_next, a.mean};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> eca_residual_backward_cuda(
    const std::optional<at::Tensor>& grad_x_next, const std::optional<at::Tensor>& grad_a_next, const at::Tensor& y,
    const at::Tensor& weight, const std::optional<at::Tensor>& shortcut, const at::Tensor& stats, double coef,
    std::optional<double> beta_next, bool want_bias_sums) {
  eca_check_activation(y, "y");
  check_cuda_dtype(y, "y");
  const c10::cuda::CUDAGuard guard(y.device());
  auto a = eca_residual_backward_args(grad_x_next, grad_a_next, y, weight, shortcut, stats, beta_next);
  const bool has_act = a.dact.defined();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor dw, bias_sums;
  NFF_DISPATCH_CUDA_TYPES(a.y.scalar_type(), "eca_residual_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* yp = a.y.const_data_ptr<scalar_t>();
    const scalar_t* dout = a.dout.const_data_ptr<scalar_t>();
    const scalar_t* dact = has_act ? a.dact.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* sc = ptr_or_null<scalar_t>(a.sc);
    scalar_t* dsc = has_act ? a.grad_shortcut.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* dy = a.grad_y.mutable_data_ptr<scalar_t>();
    const int align = common_alignment({yp, dout, dact, sc, dsc, dy});
    const EcaPlan pl = eca_plan(a.N, a.C, a.HW, sizeof(scalar_t), a.format == at::MemoryFormat::ChannelsLast, align,
                                /*cuda=*/true, target_blocks(y.get_device()));
    auto partial = at::empty({pl.N * pl.splits * pl.C}, a.mean.options());
    auto dz = at::empty({pl.N, pl.C}, a.mean.options());
    // with want_bias_sums: dX's sums per (n, range, c), and per (n, c) the two bias gradients' parts
    at::Tensor spart, bpart;
    if (want_bias_sums) {
      spart = at::empty({pl.N * pl.splits * pl.C}, a.mean.options());
      bpart = at::empty({pl.N, 2, pl.C}, a.mean.options());
    }
    acc_t* sp = want_bias_sums ? spart.mutable_data_ptr<acc_t>() : nullptr;
    acc_t* bp = want_bias_sums ? bpart.mutable_data_ptr<acc_t>() : nullptr;
    const Geo g = geo_of(pl, a.k);
    const int p = (a.k - 1) / 2;
    const acc_t* w = a.w.const_data_ptr<acc_t>();
    const acc_t* mp = a.mean.const_data_ptr<acc_t>();
    const float scale_f = static_cast<float>(coef), beta_f = static_cast<float>(beta_next.value_or(0.0));
    dispatch_plan<scalar_t>(pl, [&](auto v, auto cl) {
      constexpr int V = decltype(v)::value;
      constexpr bool CL = decltype(cl)::value;
      if (has_act) {
        const size_t smem = sizeof(acc_t) * (2 * pl.tile + 2 * p);
        reduce_kernel<scalar_t, V, CL, kDgradAct><<<grid_of(pl), kThreads, smem, stream>>>(
            yp, dout, dact, sc, mp, w, dsc, partial.mutable_data_ptr<acc_t>(), sp, scale_f, beta_f, g);
      } else {
        reduce_kernel<scalar_t, V, CL, kDgrad><<<grid_of(pl), kThreads, 0, stream>>>(
            yp, dout, nullptr, nullptr, nullptr, nullptr, nullptr, partial.mutable_data_ptr<acc_t>(), sp, scale_f,
            beta_f, g);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const size_t smem = sizeof(acc_t) * (4 * pl.tile + 6 * p);
      dgrad_apply_kernel<scalar_t, V, CL><<<grid_of(pl), kThreads, smem, stream>>>(
          has_act ? dsc : dout, partial.const_data_ptr<acc_t>(), mp, w, dy, dz.mutable_data_ptr<acc_t>(), sp, bp,
          scale_f, g);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    auto ws = at::empty({pl.N, a.k}, a.mean.options());
    dweight_kernel<acc_t><<<static_cast<unsigned int>(pl.N), kThreads, 0, stream>>>(
        dz.const_data_ptr<acc_t>(), mp, pl.C, a.k, ws.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    dw = at::sum(ws, at::IntArrayRef{0});
    bias_sums = want_bias_sums ? at::sum(bpart, at::IntArrayRef{0}) : eca_bias_sums(a, false);
  });
  return {a.grad_y, dw.to(weight.scalar_type()).reshape(weight.sizes()), a.grad_shortcut, bias_sums};
}

}  // namespace

TORCH_LIBRARY_IMPL(nfnet_fast, CUDA, m) {
  m.impl("eca_residual", &eca_residual_cuda);
  m.impl("_eca_residual_backward", &eca_residual_backward_cuda);
}

}  // namespace nfnet_fast
