"""Paged KV cache for the AR decoding engine: fixed-size blocks in per-layer pools, a block allocator
and per-sequence block tables.

Layout: one tensor (layers, 2, num_blocks, block_size, kv_heads, head_dim); `key_cache(l)` and
`value_cache(l)` are the (num_blocks, block_size, kv_heads, head_dim) pools of layer l. Token i of a
sequence lives in slot `table[i // block_size] * block_size + i % block_size` of the flattened pool.
The pool is sized once from a byte budget and never grows.

The kernels that read and write the pools take them as plain tensors: ops.rope_kv_cache_write
(writes a step's K/V at its slots), ops.paged_decode_attention (reads them through the block tables).
"""

from __future__ import annotations

import torch


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
