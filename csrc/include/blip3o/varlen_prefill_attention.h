// Varlen causal prefill attention math shared by the CPU and CUDA faces (oracle:
// python/blip3o_fast/ops/varlen_prefill_attention.py): the call's dims, a sequence's rows, the causal
// rule and the online-softmax rescale.
#pragma once
#include "blip3o/common.h"

namespace blip3o::varlen_prefill_attention {

// q/out (tokens, heads, d); k/v (tokens, kv_heads, d); seqs + 1 offsets in cu_seqlens.
struct Dims {
  int64_t tokens, seqs, heads, kv_heads, d;
  float scale;
};

// Rows [start, start + len) of sequence s, its offsets clamped into [0, tokens] and made nondecreasing,
// so even offsets the host did not check address nothing out of bounds.
BLIP3O_HD void seq_rows(const int32_t* cu, int64_t s, int64_t tokens, int64_t& start, int64_t& len) {
  const int64_t a = cu[s] < 0 ? 0 : (cu[s] > tokens ? tokens : cu[s]);
  const int64_t b = cu[s + 1] < a ? a : (cu[s + 1] > tokens ? tokens : cu[s + 1]);
  start = a;
  len = b - a;
}

// Causal rule: the query at position pos of its sequence sees keys 0 .. pos of the same sequence.
BLIP3O_HD int64_t visible_keys(int64_t pos) { return pos + 1; }

// Online softmax: the factor rescaling what was accumulated under the old running max (exp(-inf) = 0
// covers a row that had nothing yet).
BLIP3O_HD float online_rescale(float m_old, float m_new) { return m_old == m_new ? 1.0f : expf(m_old - m_new); }

}  // namespace blip3o::varlen_prefill_attention
