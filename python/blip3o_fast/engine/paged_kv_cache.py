"""Paged KV cache for the AR decoding engine: fixed-size blocks in per-layer pools, a block allocator,
per-sequence block tables, and the two attention calls that read it.

Layout: one tensor (layers, 2, num_blocks, block_size, kv_heads, head_dim); `key_cache(l)` and
`value_cache(l)` are the (num_blocks, block_size, kv_heads, head_dim) pools of layer l. Token i of a
sequence lives in slot `table[i // block_size] * block_size + i % block_size` of the flattened pool.
The pool is sized once from a byte budget and never grows.

`paged_attention` (decode: one query per sequence against its cached keys) and `prefill_attention`
(ragged causal attention over packed fresh prompts) are the only places attention is computed, so a
fused kernel replaces each with one call of the same signature.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


class OutOfBlocks(RuntimeError):
    """The allocator has fewer free blocks than asked for (the engine preempts on it)."""


class BlockAllocator:
    """Free list over block ids 0..num_blocks-1. Lowest ids go out first; freed ones are reused first."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"BlockAllocator needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: pop() gives the lowest id first
        self._used = [False] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocks(f"asked for {n} blocks, {len(self._free)} of {self.num_blocks} are free")
        blocks = [self._free.pop() for _ in range(n)]
        for b in blocks:
            self._used[b] = True
        return blocks

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            if not 0 <= b < self.num_blocks or not self._used[b]:
                raise ValueError(f"block {b} is not allocated (double free or foreign id)")
            self._used[b] = False
        self._free.extend(reversed(blocks))


class PagedKVCache:
    """K/V pools for every layer, the allocator, and the block table of each live sequence."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_blocks: int,
        block_size: int = 16,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.allocator = BlockAllocator(num_blocks)
        # Zeroed, not empty: masked attention weights are exactly 0, but 0 * NaN garbage would still be NaN.
        self.kv = torch.zeros(num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)
        self.tables: dict[object, list[int]] = {}

    @staticmethod
    def bytes_per_block(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * elem

    @classmethod
    def from_budget(
        cls,
        kv_cache_bytes: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        block_size: int = 16,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> "PagedKVCache":
        """As many blocks as fit in kv_cache_bytes (keys and values of every layer count)."""
        per_block = cls.bytes_per_block(num_layers, num_kv_heads, head_dim, block_size, dtype)
        num_blocks = int(kv_cache_bytes) // per_block
        if num_blocks < 1:
            raise ValueError(
                f"kv_cache_bytes={kv_cache_bytes} holds no block: one block of {block_size} tokens needs {per_block} "
                f"bytes ({num_layers} layers x K,V x {num_kv_heads} kv heads x {head_dim} x {dtype})"
            )
        return cls(num_layers, num_kv_heads, head_dim, num_blocks, block_size, dtype=dtype, device=device)

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def key_cache(self, layer: int) -> torch.Tensor:
        return self.kv[layer, 0]

    def value_cache(self, layer: int) -> torch.Tensor:
        return self.kv[layer, 1]

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def reserve(self, seq_id: object, num_tokens: int) -> None:
        """Grow seq_id's table to hold num_tokens tokens; raises OutOfBlocks (changing nothing) if it can't."""
        table = self.tables.setdefault(seq_id, [])
        missing = self.blocks_for(num_tokens) - len(table)
        if missing > 0:
            try:
                table.extend(self.allocator.allocate(missing))
            except OutOfBlocks:
                if not table:
                    del self.tables[seq_id]
                raise

    def can_reserve(self, seq_id: object, num_tokens: int) -> bool:
        have = len(self.tables.get(seq_id, ()))
        return self.blocks_for(num_tokens) - have <= self.allocator.num_free

    def release(self, seq_id: object) -> None:
        table = self.tables.pop(seq_id, None)
        if table:
            self.allocator.free(table)

    def slots(self, seq_id: object, start: int, end: int) -> torch.Tensor:
        """Flat slot index of tokens start..end-1 of a sequence (long, on the cache's device)."""
        table = torch.tensor(self.tables[seq_id], dtype=torch.long)
        pos = torch.arange(start, end)
        return (table[pos // self.block_size] * self.block_size + pos % self.block_size).to(self.kv.device)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """Store k, v (N, kv_heads, head_dim) of N tokens at their flat slots (N,)."""
        flat = (self.num_blocks * self.block_size, self.num_kv_heads, self.head_dim)
        self.key_cache(layer).view(flat).index_copy_(0, slots, k.to(self.kv.dtype))
        self.value_cache(layer).view(flat).index_copy_(0, slots, v.to(self.kv.dtype))


@dataclass
class PagedAttentionPlan:
    """What paged_attention derives from the block tables, computed once per decode step and shared
    by every layer (the tables are the same for all of them): the flat slot of every key position
    (B, L) and the additive mask (B, 1, 1, L) hiding positions past each sequence's length."""

    slots: torch.Tensor
    mask: torch.Tensor


def plan_paged_attention(
    kv_cache: PagedKVCache,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    max_seq_len: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> PagedAttentionPlan:
    """max_seq_len (a host int >= every seq_len) bounds how much of the tables is gathered."""
    bs = kv_cache.block_size
    n_blocks = block_tables.shape[1] if max_seq_len is None else min(block_tables.shape[1], -(-max_seq_len // bs))
    offsets = torch.arange(bs, device=block_tables.device)
    slots = (block_tables[:, :n_blocks, None].long() * bs + offsets).flatten(1)
    hidden = torch.arange(slots.shape[1], device=block_tables.device)[None, :] >= seq_lens[:, None]
    mask = torch.zeros(hidden.shape, dtype=dtype, device=block_tables.device).masked_fill_(hidden, float("-inf"))
    return PagedAttentionPlan(slots, mask[:, None, None])


def paged_attention(
    q: torch.Tensor,
    kv_cache: PagedKVCache,
    layer: int,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    max_seq_len: int | None = None,
    scale: float | None = None,
    plan: PagedAttentionPlan | None = None,
) -> torch.Tensor:
    """Decode attention: q (B, heads, head_dim), one query per sequence, against the first seq_lens[b]
    cached tokens of sequence b, found through block_tables (B, max_blocks) int. Returns (B, heads, head_dim).

    GQA: heads is a multiple of kv_heads. max_seq_len and plan only save this reference work (a
    kernel reads the tables itself and may ignore both). Reference: gather the keys, then SDPA."""
    if plan is None:
        plan = plan_paged_attention(kv_cache, block_tables, seq_lens, max_seq_len=max_seq_len, dtype=q.dtype)
    b, h, d = q.shape
    kvh = kv_cache.num_kv_heads
    flat = (-1, kvh, d)
    idx = plan.slots.view(-1)
    k = kv_cache.key_cache(layer).view(flat).index_select(0, idx).view(b, -1, kvh, d).transpose(1, 2)
    v = kv_cache.value_cache(layer).view(flat).index_select(0, idx).view(b, -1, kvh, d).transpose(1, 2)
    out = F.scaled_dot_product_attention(
        q[:, :, None], k.to(q.dtype), v.to(q.dtype), attn_mask=plan.mask.to(q.dtype), scale=scale,
        enable_gqa=h != kvh,
    )
    return out[:, :, 0]


def prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: list[int], *, scale: float | None = None
) -> torch.Tensor:
    """Causal attention within each of several packed sequences (varlen): q (N, heads, D), k, v
    (N, kv_heads, D); sequence i is rows cu_seqlens[i]..cu_seqlens[i+1]-1. Returns (N, heads, D).

    Prefill never reads the cache: a prompt (or a preempted request's prompt + generated tokens) is
    always recomputed whole. Reference: one batched SDPA per distinct sequence length."""
    out = torch.empty_like(q)
    gqa = q.shape[1] != k.shape[1]
    by_length: dict[int, list[int]] = {}
    for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        by_length.setdefault(end - start, []).append(start)
    for n, starts in by_length.items():
        rows = (torch.tensor(starts, device=q.device)[:, None] + torch.arange(n, device=q.device)).view(-1)
        qs, ks, vs = (x[rows].view(len(starts), n, x.shape[1], x.shape[2]).transpose(1, 2) for x in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=gqa)
        out[rows] = o.transpose(1, 2).reshape(-1, q.shape[1], q.shape[2])
    return out
