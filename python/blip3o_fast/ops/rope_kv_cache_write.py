"""RoPE of q and k fused with the paged KV-cache write, as the attention path of an AR layer needs it:

    q_rot = RoPE(q), k_rot = RoPE(k)                  rotate-half layout (LLaMA, Qwen), ops.rope's math
    k_cache[slot_t] = k_rot[t], v_cache[slot_t] = v[t]  for every token t with slot_t >= 0

One pass over q, k and v instead of two RoPE launches plus two index_copy_ calls. cos/sin are the
per-token fp32 tables ops.rope_cos_sin / ops.mrope_cos_sin build (1-D RoPE and Qwen's 3-D M-RoPE give
the same layout), without their batch axis. A slot is block * block_size + offset in the flattened
(num_blocks * block_size) pool; a negative slot means "do not write" (padding rows). Results equal
ops.apply_rope followed by index_copy_ (bitwise on the CPU faces in fp32; GPU faces may contract the
rotation into FMAs, as apply_rope's own GPU faces do). Inference only: there is no backward.

Faces: rope_kv_cache_write_reference (here), csrc/cpu/rope_kv_cache_write.cpp,
kernels/rope_kv_cache_write.py, csrc/cuda/rope_kv_cache_write.cu.
Kernel contract (all faces; every tensor contiguous; q, k, v, caches, q_rot, k_rot of one dtype):
  rope_kv_cache_write(q[T,H,D], k[T,KVH,D], v[T,KVH,D], cos[T,D/2] fp32, sin[T,D/2] fp32,
                      k_cache[NB,BS,KVH,D], v_cache[NB,BS,KVH,D], slots[T] int64, q_rot[T,H,D], k_rot[T,KVH,D])
  Slots must be < NB * BS. That is checked here when slots live on the CPU; on a GPU the check would
  cost a device sync per call (and break CUDA-graph capture), so there the kernels skip any slot
  outside [0, NB * BS) like a negative one: a bad slot is not written, and nothing is written out of bounds.
"""

from __future__ import annotations

import torch

from blip3o_fast.ops import dispatch
from blip3o_fast.ops.checks import check_float, check_same, check_shape
from blip3o_fast.ops.rope import rope_reference


def rope_kv_cache_write_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle: ops.rope's reference rotation, then index_copy_ of the rows whose slot is >= 0."""
    q_rot = rope_reference(q[None], cos[None], sin[None])[0]
    k_rot = rope_reference(k[None], cos[None], sin[None])[0]
    keep = slots >= 0
    flat = (-1, k.shape[1], k.shape[2])
    k_cache.view(flat).index_copy_(0, slots[keep], k_rot[keep])
    v_cache.view(flat).index_copy_(0, slots[keep], v[keep])
    return q_rot, k_rot


@torch.library.custom_op("blip3o_fast::rope_kv_cache_write", mutates_args=("k_cache", "v_cache"))
def _rope_kv_cache_write(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    _, fn = dispatch.kernel_for("rope_kv_cache_write", q.device, backend or None)
    if fn is None:
        return rope_kv_cache_write_reference(q, k, v, cos, sin, k_cache, v_cache, slots)
    q_rot, k_rot = torch.empty_like(q), torch.empty_like(k)
    fn(q, k, v, cos, sin, k_cache, v_cache, slots, q_rot, k_rot)
    return q_rot, k_rot


@_rope_kv_cache_write.register_fake
def _(q, k, v, cos, sin, k_cache, v_cache, slots, backend):
    return torch.empty_like(q), torch.empty_like(k)


def rope_kv_cache_write(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (T, H, D) and k (T, KVH, D) by the per-token tables cos/sin (T, D/2), write rotated k and v
    into k_cache/v_cache (num_blocks, block_size, KVH, D) at slots (T,) int64 (negative: skipped), in place.
    Returns (q_rot, k_rot). Inference only."""
    op = "rope_kv_cache_write"
    check_float(op, "q", q)
    check_same(op, "q", q, k=k, v=v, k_cache=k_cache, v_cache=v_cache)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(f"{op}: {name} must be 3-D (T, heads, D), got shape {tuple(t.shape)}")
    t, h, d = q.shape
    kvh = k.shape[1]
    if d % 2:
        raise ValueError(f"{op}: head dim D must be even for RoPE, got {d}")
    if k.shape[0] != t or k.shape[2] != d:
        raise ValueError(f"{op}: k must be (T={t}, KVH, D={d}), got {tuple(k.shape)}")
    check_shape(op, "v", v, tuple(k.shape))
    for name, tab in (("cos", cos), ("sin", sin)):
        check_float(op, name, tab)
        if tab.device != q.device:
            raise ValueError(f"{op}: {name} is on {tab.device} but q is on {q.device}")
        check_shape(op, name, tab, (t, d // 2))
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.dim() != 4 or tuple(cache.shape[2:]) != (kvh, d):
            raise ValueError(f"{op}: {name} must be (num_blocks, block_size, {kvh}, {d}), got {tuple(cache.shape)}")
        if not cache.is_contiguous():  # written in place: a contiguous copy would lose the writes
            raise ValueError(f"{op}: {name} must be contiguous (it is written in place)")
    check_shape(op, "v_cache", v_cache, tuple(k_cache.shape))
    if not isinstance(slots, torch.Tensor) or slots.dtype != torch.int64:
        got = slots.dtype if isinstance(slots, torch.Tensor) else type(slots).__name__
        raise TypeError(f"{op}: slots must be an int64 tensor, got {got}")
    if slots.device != q.device:
        raise ValueError(f"{op}: slots is on {slots.device} but q is on {q.device}")
    check_shape(op, "slots", slots, (t,))
    capacity = k_cache.shape[0] * k_cache.shape[1]
    if slots.device.type == "cpu" and t and int(slots.max()) >= capacity:
        raise ValueError(f"{op}: slot {int(slots.max())} is past the cache's {capacity} slots")
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    if dispatch.requested_backend(backend) == "torch":
        return rope_kv_cache_write_reference(q, k, v, cos, sin, k_cache, v_cache, slots)
    return dispatch.call(_rope_kv_cache_write, q.contiguous(), k.contiguous(), v.contiguous(), cos, sin, k_cache,
                         v_cache, slots.contiguous(), backend or "")
