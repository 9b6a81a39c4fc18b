// Paged decode attention CUDA kernels (contract: python/blip3o_fast/ops/paged_decode_attention.py; math:
// blip3o/paged_decode_attention.h, shared with the CPU face: the split's tokens and the combine weights).
//
// split    one block of 4 warps per (split x head chunk, kv head, sequence). A head chunk is up to 8 query
//          heads of the GQA group (kG, a power of two: G = 7 runs as 8 with one idle head), held in
//          registers, so each K/V row is read once per chunk. A token belongs to a lane group of
//          kLanes = D / (16 / sizeof(T)) lanes; each lane loads 16 bytes of its K and V rows (one uint4)
//          and keeps kG x (16 / sizeof(T)) fp32 accumulators. Scores: per-lane partial dots, reduced across
//          the group by shuffles. Online softmax in base 2 per lane group (rescaling only when the max
//          grows); the next token's rows are loaded before the current one is used. Then the groups'
//          (max, sum, acc) are merged through shared memory in group order and the block writes `out`
//          (one split) or its normalised partial and natural-log lse.
// combine  one block per (sequence, head): out = sum_s w_s o_s / sum_s w_s over the splits.
// Head dims 64 and 128; q and the caches must be 16-byte aligned (torch allocations are).
#include <cstdint>

#include "blip3o/paged_decode_attention.h"
#include "cuda/cuda_common.cuh"
#include "cuda/kernels.h"

namespace blip3o::cuda {

namespace {

namespace pda = paged_decode_attention;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;  // launch bounds (kThreads, 1): without the 1, ptxas held the
                                      // one-head kernels at 64 registers and spilled
constexpr int kMaxChunk = 8;  // query heads per block at most
constexpr float kLn2 = 0.6931471805599453f;

template <class T, int kCW>
__device__ __forceinline__ void unpack(const uint4& raw, float* f) {
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < kCW; ++i) f[i] = to_float(e[i]);
}

template <class T, int kD, int kG>
__global__ void __launch_bounds__(kThreads, 1) split_kernel(pda::Args a, pda::Dims m, int chunks, float qk_scale) {
  constexpr int kCW = 16 / sizeof(T);     // channels per 16-byte load
  constexpr int kLanes = kD / kCW;        // lanes per token
  static_assert(kLanes >= 1 && kLanes <= 32 && 32 % kLanes == 0, "a token's row must fit one warp");
  constexpr int kGroups = 32 / kLanes;    // tokens per warp step
  constexpr int kStep = kWarps * kGroups; // tokens per block step
  __shared__ float sm_m[kStep][kG], sm_l[kStep][kG];
  __shared__ __align__(16) float sm_acc[kStep][kG][kD];

  const int split = blockIdx.x / chunks, h0 = (blockIdx.x % chunks) * kG, kv = blockIdx.y;
  const int64_t b = blockIdx.z;
  const int group = static_cast<int>(m.heads / m.kv_heads);
  const int nh = group - h0 < kG ? group - h0 : kG;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int sub = lane / kLanes, part = lane % kLanes, gid = warp * kGroups + sub;
  const int64_t head0 = b * m.heads + kv * group + h0;  // row of q / out of this chunk's first head

  float q[kG][kCW];
#pragma unroll
  for (int h = 0; h < kG; ++h) {
    uint4 raw = make_uint4(0, 0, 0, 0);
    if (h < nh) raw = __ldg(reinterpret_cast<const uint4*>(static_cast<const T*>(a.q) + (head0 + h) * kD) + part);
    unpack<T, kCW>(raw, q[h]);
#pragma unroll
    for (int i = 0; i < kCW; ++i) q[h][i] *= qk_scale;
  }
  float mx[kG], sum[kG], acc[kG][kCW];
#pragma unroll
  for (int h = 0; h < kG; ++h) {
    mx[h] = -INFINITY;
    sum[h] = 0.0f;
#pragma unroll
    for (int i = 0; i < kCW; ++i) acc[h][i] = 0.0f;
  }

  const pda::TokenRange range = pda::split_tokens(a.seq_lens[b], m.block_size, m.num_splits, split);
  const int32_t* table = a.block_tables + b * m.max_blocks;
  const uint4* kc = reinterpret_cast<const uint4*>(a.k_cache);
  const uint4* vc = reinterpret_cast<const uint4*>(a.v_cache);
  // uint4 index of this lane's 16 bytes of token tok's row (int64: pools exceed 2^31 elements).
  const auto chunk_of = [&](int64_t tok) {
    const int64_t slot = static_cast<int64_t>(__ldg(table + tok / m.block_size)) * m.block_size + tok % m.block_size;
    return (slot * m.kv_heads + kv) * kLanes + part;
  };
  // The loop runs while any token of the warp is live (uniform across the warp, as the shuffles need);
  // a lane group past the end computes on zeros and skips the update.
  int64_t tok = range.begin + warp * kGroups + sub;
  uint4 kraw = make_uint4(0, 0, 0, 0), vraw = kraw;
  if (tok < range.end) {
    const int64_t c = chunk_of(tok);
    kraw = __ldg(kc + c);
    vraw = __ldg(vc + c);
  }
  for (int64_t base = range.begin + warp * kGroups; base < range.end; base += kStep, tok += kStep) {
    const int64_t next = tok + kStep;
    uint4 knext = make_uint4(0, 0, 0, 0), vnext = knext;
    if (next < range.end) {
      const int64_t c = chunk_of(next);
      knext = __ldg(kc + c);
      vnext = __ldg(vc + c);
    }
    float kf[kCW], vf[kCW];
    unpack<T, kCW>(kraw, kf);
    unpack<T, kCW>(vraw, vf);
    const bool live = tok < range.end;
#pragma unroll
    for (int h = 0; h < kG; ++h) {
      float s = 0.0f;
#pragma unroll
      for (int i = 0; i < kCW; ++i) s = fmaf(q[h][i], kf[i], s);
#pragma unroll
      for (int o = kLanes / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
      if (live) {
        if (s > mx[h]) {  // a new max: rescale what was summed under the old one (exp2(-inf) = 0)
          const float alpha = exp2f(mx[h] - s);
          sum[h] *= alpha;
#pragma unroll
          for (int i = 0; i < kCW; ++i) acc[h][i] *= alpha;
          mx[h] = s;
        }
        const float p = exp2f(s - mx[h]);
        sum[h] += p;
#pragma unroll
        for (int i = 0; i < kCW; ++i) acc[h][i] = fmaf(p, vf[i], acc[h][i]);
      }
    }
    kraw = knext;
    vraw = vnext;
  }

  // Merge the lane groups in group order (deterministic).
#pragma unroll
  for (int h = 0; h < kG; ++h) {
    if (part == 0) {
      sm_m[gid][h] = mx[h];
      sm_l[gid][h] = sum[h];
    }
#pragma unroll
    for (int i = 0; i < kCW; ++i) sm_acc[gid][h][part * kCW + i] = acc[h][i];
  }
  __syncthreads();
  const bool split_out = a.part_out != nullptr;
  for (int idx = threadIdx.x; idx < nh * kD; idx += kThreads) {
    const int h = idx / kD, c = idx % kD;
    float top = -INFINITY;
    for (int g = 0; g < kStep; ++g) top = fmaxf(top, sm_m[g][h]);
    float l = 0.0f, o = 0.0f;
    if (top != -INFINITY) {
      for (int g = 0; g < kStep; ++g) {
        const float w = exp2f(sm_m[g][h] - top);
        l += sm_l[g][h] * w;
        o += sm_acc[g][h][c] * w;
      }
    }
    o = l > 0.0f ? o / l : 0.0f;  // an empty split (or sequence) gives 0
    const int64_t row = head0 + h;
    if (split_out) {
      const int64_t prow = row * m.num_splits + split;
      a.part_out[prow * kD + c] = o;
      if (c == 0) a.part_lse[prow] = l > 0.0f ? (top + log2f(l)) * kLn2 : -INFINITY;
    } else {
      static_cast<T*>(a.out)[row * kD + c] = from_float<T>(o);
    }
  }
}

template <class T>
__global__ void combine_kernel(const float* __restrict__ part_out, const float* __restrict__ part_lse,
                               T* __restrict__ out, int splits, int d) {
  const int64_t row = blockIdx.x;
  const float* lse = part_lse + row * splits;
  float top = -INFINITY;
  for (int s = 0; s < splits; ++s) top = fmaxf(top, lse[s]);
  for (int c = threadIdx.x; c < d; c += blockDim.x) {
    float total = 0.0f, acc = 0.0f;
    for (int s = 0; s < splits; ++s) {
      const float w = pda::combine_weight(lse[s], top);
      total += w;
      acc = fmaf(w, part_out[(row * splits + s) * d + c], acc);
    }
    out[row * d + c] = from_float<T>(total > 0.0f ? acc / total : 0.0f);
  }
}

template <class T, int kD>
void launch_split(const pda::Args& a, const pda::Dims& m, int chunk, cudaStream_t st) {
  const int group = static_cast<int>(m.heads / m.kv_heads);
  const int chunks = (group + chunk - 1) / chunk;
  const dim3 grid(static_cast<unsigned>(m.num_splits * chunks), static_cast<unsigned>(m.kv_heads),
                  static_cast<unsigned>(m.batch));
  const float qk_scale = a.scale * 1.4426950408889634f;  // base-2 scores
  switch (chunk) {
    case 1: split_kernel<T, kD, 1><<<grid, kThreads, 0, st>>>(a, m, chunks, qk_scale); break;
    case 2: split_kernel<T, kD, 2><<<grid, kThreads, 0, st>>>(a, m, chunks, qk_scale); break;
    case 4: split_kernel<T, kD, 4><<<grid, kThreads, 0, st>>>(a, m, chunks, qk_scale); break;
    default: split_kernel<T, kD, kMaxChunk><<<grid, kThreads, 0, st>>>(a, m, chunks, qk_scale); break;
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

const char* paged_decode_attention(const paged_decode_attention::Args& args, const paged_decode_attention::Dims& dims,
                                   DType dt, int device, void* stream) {
  if (dims.head_dim != 64 && dims.head_dim != 128) return "head dim D must be 64 or 128";
  if (!aligned16(args.q) || !aligned16(args.k_cache) || !aligned16(args.v_cache))
    return "q, k_cache and v_cache must be 16-byte aligned";
  if (dims.batch == 0) return nullptr;
  if (dims.kv_heads > 65535 || dims.batch > 65535) return "batch and kv heads must be at most 65535 each";
  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) return error_text(guard.status());
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  const int64_t group = dims.heads / dims.kv_heads;
  const int chunk = group >= 5 ? kMaxChunk : group >= 3 ? 4 : static_cast<int>(group);  // kG >= heads, pow2
  visit_device_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    if (dims.head_dim == 64)
      launch_split<T, 64>(args, dims, chunk, st);
    else
      launch_split<T, 128>(args, dims, chunk, st);
    if (dims.num_splits > 1)
      combine_kernel<T><<<static_cast<unsigned>(dims.batch * dims.heads), 128, 0, st>>>(
          args.part_out, args.part_lse, static_cast<T*>(args.out), static_cast<int>(dims.num_splits),
          static_cast<int>(dims.head_dim));
  });
  return launch_status();
}

}  // namespace blip3o::cuda
