// RoPE + KV-cache write rules shared by the CPU and CUDA faces (oracle:
// python/blip3o_fast/ops/rope_kv_cache_write.py). The rotation itself is rope.h's rotate_a / rotate_b in
// the rotate-half layout: channel i pairs with i + D/2.
#pragma once
#include "blip3o/common.h"
#include "blip3o/rope.h"

namespace blip3o::rope_kv_cache_write {

// A token's k/v row goes to the cache only at a slot inside the pool: negative slots mark padding rows,
// and a slot past the pool (unchecked on GPUs) is dropped rather than written out of bounds.
BLIP3O_HD bool slot_written(int64_t slot, int64_t num_slots) { return slot >= 0 && slot < num_slots; }

}  // namespace blip3o::rope_kv_cache_write
