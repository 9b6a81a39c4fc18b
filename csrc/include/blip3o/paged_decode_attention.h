// Paged decode attention math shared by the CPU and CUDA faces (oracle and contract:
// python/blip3o_fast/ops/paged_decode_attention.py): which tokens a split owns, the online-softmax
// update, a split's log-sum-exp, and the weights that combine the splits of one sequence.
#pragma once
#include "blip3o/common.h"

namespace blip3o::paged_decode_attention {

struct Dims {
  int64_t batch, heads, kv_heads, head_dim, block_size, max_blocks, num_splits;
};

// One call. part_out (B, H, S, D) / part_lse (B, H, S) fp32 are nullptr when num_splits == 1 (the
// single split then writes out directly).
struct Args {
  const void *q, *k_cache, *v_cache;
  const int32_t *block_tables, *seq_lens;
  void* out;
  float *part_out, *part_lse;
  float scale;
};

// Tokens [begin, end) of one sequence that split `split` of `num_splits` reads: the sequence's blocks
// are cut into num_splits runs of ceil(blocks / num_splits) whole blocks (trailing splits may be
// empty). Every face cuts the same way, so partials agree face to face.
struct TokenRange {
  int64_t begin, end;
};
BLIP3O_HD TokenRange split_tokens(int64_t seq_len, int64_t block_size, int64_t num_splits, int64_t split) {
  const int64_t len = seq_len > 0 ? seq_len : 0;
  const int64_t blocks = (len + block_size - 1) / block_size;
  const int64_t per = (blocks + num_splits - 1) / num_splits;
  const int64_t begin = split * per * block_size, end = (split + 1) * per * block_size;
  return {begin < len ? begin : len, end < len ? end : len};
}

// Online softmax: the factor rescaling what was summed under the old running max (m_old = -inf: none).
BLIP3O_HD float online_rescale(float m_old, float m_new) { return m_old == m_new ? 1.0f : expf(m_old - m_new); }

// A split's natural-log sum-exp from its running max and sum; -inf for an empty split.
BLIP3O_HD float split_lse(float m, float l) { return l > 0.0f ? m + logf(l) : -INFINITY; }

// Weight of a split's normalised partial in the combined output, relative to the largest lse; the
// combined output is sum_s w_s o_s / sum_s w_s, and 0 when every split is empty (max_lse = -inf).
BLIP3O_HD float combine_weight(float lse, float max_lse) {
  return lse == -INFINITY ? 0.0f : expf(lse - max_lse);
}

}  // namespace blip3o::paged_decode_attention
