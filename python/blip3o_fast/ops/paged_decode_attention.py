"""Paged decode attention: one query per sequence against its keys and values in a paged KV cache,
with grouped KV heads (GQA) and split-K over long contexts. Inference only: there is no backward
(the op refuses inputs that require grad while grad mode is on).

    paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, *, scale=None, num_splits=None,
                           backend=None) -> out

  q             (B, H, D) float32 / bfloat16 / float16: one query per sequence
  k_cache       (num_blocks, block_size, KVH, D), q's dtype and device, contiguous; v_cache likewise
  block_tables  (B, max_blocks) int32; seq_lens (B,) int32; H a multiple of KVH
  out[b, h] = softmax(scale * q[b, h] . K_b^T) V_b over the first seq_lens[b] cached tokens of
  sequence b, token i at block block_tables[b, i // block_size], offset i % block_size, kv head
  h // (H / KVH). scale defaults to D**-0.5. Math in fp32, out rounded once to q's dtype.
  A row with seq_lens[b] == 0 gives zeros (the padded rows of a fixed-shape batch: decode can then be
  captured as a CUDA graph). Table entries past ceil(seq_lens[b] / block_size) are never read and may
  hold anything; cache blocks no live entry names are never read (they may hold NaN). The live entries
  must name blocks in range and seq_lens[b] <= max_blocks * block_size: checking that would read the
  tables on the host (a sync), so it is the caller's part.
  Split-K: each sequence's blocks are cut into num_splits runs of ceil(blocks / num_splits) whole blocks
  (header csrc/include/blip3o/paged_decode_attention.h), each attended independently into a
  normalised partial and its log-sum-exp, then combined; num_splits=None picks it from the batch, the
  kv heads and the table's width (the longest context it can hold; never the lengths themselves, which
  live on the device), so long contexts at small batch fill the machine. The result does not depend
  on num_splits beyond rounding.

Faces: paged_decode_attention_reference (here: gather + masked softmax in fp32),
csrc/cpu/paged_decode_attention.cpp, kernels/paged_decode_attention.py, csrc/cuda/paged_decode_attention.cu.
The GPU faces take head dims 64 and 128 (their tiles hold whole rows of 16-byte loads); other head
dims run the reference there, with a one-time warning.
Kernel contract (all faces; every tensor contiguous):
  paged_decode_attention(q[B,H,D], k_cache[N,BS,KVH,D], v_cache[N,BS,KVH,D], block_tables[B,MB] int32,
                         seq_lens[B] int32, out[B,H,D], part_out[B,H,S,D] fp32|None,
                         part_lse[B,H,S] fp32|None, scale: float)
      q, caches and out share one dtype. S = num_splits; part_out/part_lse are scratch, None when S == 1
      (the single split then writes out directly). part_out holds each split's normalised output,
      part_lse its natural-log sum-exp (-inf for an empty split, whose part_out row is 0).
"""

from __future__ import annotations

import functools
import warnings

import torch

from blip3o_fast.ops import dispatch
from blip3o_fast.ops.checks import check_float, check_same

KERNEL = "paged_decode_attention"
GPU_HEAD_DIMS = (64, 128)  # what the triton and cuda faces take
MAX_SPLITS = 64
# A split reads at least this many tokens of the longest possible context: below it, the partial's
# write and the combine cost more than the parallelism gains.
MIN_SPLIT_TOKENS = 256


def paged_decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """The oracle: gather every sequence's keys and values through its table, masked softmax in fp32,
    rounded once to q's dtype. Reads no host value (no sync), so a CUDA graph can capture it too."""
    b, h, d = q.shape
    _, bs, kvh, _ = k_cache.shape
    g = h // kvh
    scale = d**-0.5 if scale is None else scale
    pos = torch.arange(block_tables.shape[1] * bs, device=q.device)
    live = pos[None, :] < seq_lens[:, None].long()  # (B, L): the tokens each sequence has
    # Dead positions read block 0 instead of their (arbitrary) table entry, and are zeroed after the
    # gather: an unreferenced block may hold NaN, and 0 * NaN would leak into the sums.
    blocks = torch.where(live, block_tables.long()[:, pos // bs], 0)
    slots = blocks * bs + pos % bs
    dead = ~live[:, :, None, None]
    keys = k_cache.reshape(-1, kvh, d)[slots].float().masked_fill(dead, 0.0)  # (B, L, KVH, D)
    values = v_cache.reshape(-1, kvh, d)[slots].float().masked_fill(dead, 0.0)
    scores = torch.einsum("bkgd,blkd->bkgl", q.float().view(b, kvh, g, d), keys) * scale
    scores = scores.masked_fill(~live[:, None, None, :], float("-inf"))
    # A sequence with no token has an all -inf row (softmax NaN): its probabilities are 0.
    probs = torch.softmax(scores, dim=-1).masked_fill(~live[:, None, None, :], 0.0)
    out = torch.einsum("bkgl,blkd->bkgd", probs, values)
    return out.reshape(b, h, d).to(q.dtype)


def default_num_splits(batch: int, kv_heads: int, max_blocks: int, block_size: int, device: torch.device) -> int:
    """Splits per sequence: enough (sequence, kv head, split) tasks to give every worker (two per GPU
    SM; one per CPU thread) one, with at least MIN_SPLIT_TOKENS of the table's width per split."""
    workers = 2 * _sm_count(device) if device.type == "cuda" else torch.get_num_threads()
    wanted = -(-workers // max(1, batch * kv_heads))
    room = max(1, max_blocks * block_size // MIN_SPLIT_TOKENS)
    return max(1, min(wanted, room, MAX_SPLITS))


@functools.cache
def _sm_count_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    return _sm_count_of(device.index if device.index is not None else torch.cuda.current_device())


_warned_head_dims: set[tuple[str, int]] = set()


def _head_dim_fallback(face: str, d: int) -> bool:
    """True (with a one-time warning) when a GPU face cannot take head dim d."""
    if face not in ("triton", "cuda") or d in GPU_HEAD_DIMS:
        return False
    if (face, d) not in _warned_head_dims:
        _warned_head_dims.add((face, d))
        warnings.warn(f"blip3o_fast: {KERNEL}: the {face} face takes head dims {GPU_HEAD_DIMS}, not {d}; "
                      "using the PyTorch reference", stacklevel=4)
    return True


@torch.library.custom_op("blip3o_fast::paged_decode_attention", mutates_args=())
def _paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_splits: int,
    backend: str,
) -> torch.Tensor:
    face, fn = dispatch.kernel_for(KERNEL, q.device, backend or None)
    if _head_dim_fallback(face, q.shape[-1]):
        fn = None
    if fn is None:
        return paged_decode_attention_reference(q, k_cache, v_cache, block_tables, seq_lens, scale=scale)
    b, h, d = q.shape
    out = torch.empty_like(q)
    part_out = part_lse = None
    if num_splits > 1:
        part_out = torch.empty((b, h, num_splits, d), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((b, h, num_splits), dtype=torch.float32, device=q.device)
    fn(q, k_cache, v_cache, block_tables, seq_lens, out, part_out, part_lse, float(scale))
    return out


@_paged_decode_attention.register_fake
def _(q, k_cache, v_cache, block_tables, seq_lens, scale, num_splits, backend):
    return torch.empty_like(q)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float | None = None,
    num_splits: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Decode attention over a paged KV cache (module docstring): q (B, H, D), caches (num_blocks,
    block_size, KVH, D), block_tables (B, max_blocks) int32, seq_lens (B,) int32 -> (B, H, D) in q's
    dtype. `backend`: torch | cpu | triton | cuda (default: by device). Inference only."""
    op = KERNEL
    check_float(op, "q", q)
    check_same(op, "q", q, k_cache=k_cache, v_cache=v_cache)
    if q.dim() != 3:
        raise ValueError(f"{op}: q must be 3-D (B, H, D), got shape {tuple(q.shape)}")
    b, h, d = q.shape
    if k_cache.dim() != 4:
        raise ValueError(f"{op}: k_cache must be 4-D (num_blocks, block_size, KVH, D), got shape "
                         f"{tuple(k_cache.shape)}")
    if k_cache.shape[3] != d:
        raise ValueError(f"{op}: k_cache's head dim must be q's ({d}), got shape {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"{op}: v_cache must have k_cache's shape {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    kvh, block_size = k_cache.shape[2], k_cache.shape[1]
    if kvh == 0 or h % kvh:
        raise ValueError(f"{op}: q heads ({h}) must be a multiple of the cache's kv heads ({kvh})")
    if block_size == 0:
        raise ValueError(f"{op}: block_size (k_cache dim 1) must be >= 1")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not t.is_contiguous():  # a copy of the whole pool per call would cost more than the attention
            raise ValueError(f"{op}: {name} must be contiguous")
    _check_index(op, "block_tables", block_tables, q, 2)
    _check_index(op, "seq_lens", seq_lens, q, 1)
    if block_tables.shape[0] != b or seq_lens.shape[0] != b:
        raise ValueError(f"{op}: block_tables must be ({b}, max_blocks) and seq_lens ({b},) for q's batch of {b}, "
                         f"got {tuple(block_tables.shape)} and {tuple(seq_lens.shape)}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_cache, v_cache)):
        raise RuntimeError(f"{op}: inference only (no backward); call it under torch.no_grad()")
    scale = d**-0.5 if scale is None else float(scale)
    if num_splits is None:
        num_splits = default_num_splits(b, kvh, block_tables.shape[1], block_size, q.device)
    elif not isinstance(num_splits, int) or not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"{op}: num_splits must be an int from 1 to {MAX_SPLITS}, got {num_splits!r}")
    if dispatch.requested_backend(backend) == "torch":
        return paged_decode_attention_reference(q, k_cache, v_cache, block_tables, seq_lens, scale=scale)
    return dispatch.call(_paged_decode_attention, q.contiguous(), k_cache, v_cache, block_tables.contiguous(),
                         seq_lens.contiguous(), scale, num_splits, backend or "")


def _check_index(op: str, name: str, t: torch.Tensor, q: torch.Tensor, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise TypeError(f"{op}: {name} must be int32, got {t.dtype}")
    if t.device != q.device:
        raise ValueError(f"{op}: {name} is on {t.device} but q is on {q.device}")
    if t.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D, got shape {tuple(t.shape)}")
