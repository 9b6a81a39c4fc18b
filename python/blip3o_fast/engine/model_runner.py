"""The backbone's forward passes over the paged KV cache, for the Engine: one packed ragged prefill
and one fixed-shape decode step, each ending in fused sampling.

Per layer both run the same fused ops: residual add + RMSNorm (ops.residual_rms_norm), the q/k/v
projections, RoPE applied to q and k while k and v are written to the cache (ops.rope_kv_cache_write),
attention (ops.varlen_prefill_attention over the packed prompts, or ops.paged_decode_attention through
the block tables), the output projection, and the SwiGLU MLP. Decode multiplies a few rows by every
weight, which a GEMM library handles poorly, so its projections and the lm_head use
ops.decode_linear (weight-streaming); prefill has many rows and uses the regular matmul. Sampling
(ops.sample_tokens) draws each row's token from (its seed, the token's position), so a request's
tokens do not depend on its batch.

Decode reads only preallocated buffers (tokens, positions, slots, sequence lengths, block tables and
the sampling parameters, at max_batch rows) and writes fixed-shape outputs, so its shapes depend only
on the padded batch size: rows past the live batch are padding (slot -1: nothing is written; length
0: attention returns zeros). On CUDA each padded batch size ("bucket") is captured once as a CUDA
graph and then replayed, so a decode step is a host-to-device copy of the inputs, one replay, and a
device-to-host copy of the sampled tokens; its activations live in the graph's memory pool and
nothing is allocated per step. On the CPU the same step runs eagerly at the live batch size.
"""

from __future__ import annotations

from dataclasses import dataclass

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from blip3o_fast import ops
from blip3o_fast.engine.paged_kv_cache import PagedKVCache
from blip3o_fast.models.causal_lm import CausalLM

# Padded batch sizes captured as CUDA graphs (each capped at max_batch, which is always one).
GRAPH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

Linear = Callable[[torch.Tensor, nn.Linear], torch.Tensor]


def prefill_linear(x: torch.Tensor, module: nn.Linear) -> torch.Tensor:
    return F.linear(x, module.weight, module.bias)


def decode_linear(x: torch.Tensor, module: nn.Linear) -> torch.Tensor:
    return ops.decode_linear(x, module.weight, module.bias)


@dataclass
class SamplingParams:
    """Per-request sampling: temperature 0 is greedy; top_k 0 and top_p 1.0 switch those filters off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0


@dataclass
class DecodeRow:
    """What one running request feeds into a decode step. table_key changes whenever its block
    table does (the row's table is re-uploaded only then)."""

    token: int
    position: int  # rope position (index + rope_delta)
    cache_index: int  # index of this token in the sequence: where its K/V go
    block_table: list[int]
    table_key: object
    sampling: SamplingParams


class _DecodeBuffers:
    """Decode inputs at max_batch rows, filled on the host and copied to the device in one go per
    tensor (the host tensors themselves on a CPU device)."""

    def __init__(self, max_batch: int, table_width: int, device: torch.device) -> None:
        self.host = {
            "tokens": torch.zeros(max_batch, dtype=torch.long),
            "positions": torch.zeros(max_batch, dtype=torch.long),
            "slots": torch.full((max_batch,), -1, dtype=torch.long),
            "seq_lens": torch.zeros(max_batch, dtype=torch.int32),
            "block_tables": torch.zeros(max_batch, table_width, dtype=torch.int32),
            "temperature": torch.zeros(max_batch, dtype=torch.float32),
            "top_k": torch.zeros(max_batch, dtype=torch.int32),
            "top_p": torch.ones(max_batch, dtype=torch.float32),
            "seeds": torch.zeros(max_batch, dtype=torch.long),
            "counters": torch.zeros(max_batch, dtype=torch.long),
        }
        if device.type == "cpu":
            self.device = self.host
        else:
            self.host = {k: v.pin_memory() for k, v in self.host.items()}
            self.device = {k: torch.zeros_like(v, device=device) for k, v in self.host.items()}
        self.np = {k: v.numpy() for k, v in self.host.items()}
        self.row_key: list[object] = [None] * max_batch

    def fill(self, rows: list[DecodeRow], padded: int, block_size: int) -> None:
        npb = self.np
        for r, row in enumerate(rows):
            npb["tokens"][r] = row.token
            npb["positions"][r] = row.position
            npb["slots"][r] = row.block_table[row.cache_index // block_size] * block_size + row.cache_index % block_size
            npb["seq_lens"][r] = row.cache_index + 1
            if self.row_key[r] != row.table_key:
                npb["block_tables"][r, :len(row.block_table)] = row.block_table
                self.row_key[r] = row.table_key
            s = row.sampling
            npb["temperature"][r], npb["top_k"][r], npb["top_p"][r] = s.temperature, s.top_k, s.top_p
            npb["seeds"][r], npb["counters"][r] = s.seed, row.cache_index + 1
        for r in range(len(rows), padded):  # padding rows: write nothing, attend to nothing
            npb["slots"][r], npb["seq_lens"][r], npb["tokens"][r], npb["positions"][r] = -1, 0, 0, 0
        if self.device is not self.host:
            for k, v in self.host.items():
                self.device[k][:padded].copy_(v[:padded], non_blocking=True)

    def view(self, n: int) -> dict[str, torch.Tensor]:
        return {k: v[:n] for k, v in self.device.items()}


class ModelRunner:
    """Prefill and decode of a CausalLM's text decoder over a PagedKVCache.

    max_batch: most rows of a decode step; table_width: block-table columns (the longest sequence in
    blocks). cuda_graphs: capture decode per bucket (default: on for CUDA devices). buckets: padded
    decode batch sizes (default: GRAPH_BUCKETS with graphs, else none: run at the live size)."""

    def __init__(
        self,
        lm: CausalLM,
        cache: PagedKVCache,
        *,
        max_batch: int,
        table_width: int,
        cuda_graphs: bool | None = None,
        buckets: tuple[int, ...] | None = None,
    ) -> None:
        self.lm = lm
        self.cache = cache
        self.device = lm.lm_head.weight.device
        self.max_batch = max_batch
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs=True needs the model on a CUDA device")
        if buckets is None and self.cuda_graphs:
            buckets = GRAPH_BUCKETS
        self.buckets = None if buckets is None else tuple(sorted({min(b, max_batch) for b in buckets} | {max_batch}))
        self._buffers = _DecodeBuffers(max_batch, table_width, self.device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._graph_pool = None

    # ------------------------------------------------------------------ shared layer stack
    def _layers(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor, attend, linear: Linear,
    ) -> torch.Tensor:
        """The decoder stack over tokens x (T, H), each layer's K/V written to the cache at slots (T,)
        before attend(q, k, v, layer) runs attention, projections through linear(x, module); returns
        the final-normed hidden states (T, H)."""
        model = self.lm.model
        layers = model.layers
        t = x.shape[0]
        norms = [layer.input_layernorm for layer in layers[1:]] + [model.norm]
        h, residual = ops.residual_rms_norm(x, None, layers[0].input_layernorm.weight, layers[0].input_layernorm.eps)
        for i, layer in enumerate(layers):
            attn, mlp = layer.self_attn, layer.mlp
            q = linear(h, attn.q_proj).view(t, attn.num_heads, attn.head_dim)
            k = linear(h, attn.k_proj).view(t, attn.num_kv_heads, attn.head_dim)
            v = linear(h, attn.v_proj).view(t, attn.num_kv_heads, attn.head_dim)
            q, k = ops.rope_kv_cache_write(q, k, v, cos, sin, self.cache.key_cache(i), self.cache.value_cache(i), slots)
            o = linear(attend(q, k, v, i).reshape(t, -1), attn.o_proj)
            post = layer.post_attention_layernorm
            h, residual = ops.residual_rms_norm(o, residual, post.weight, post.eps)
            m = linear(ops.swiglu(linear(h, mlp.gate_proj), linear(h, mlp.up_proj)), mlp.down_proj)
            h, residual = ops.residual_rms_norm(m, residual, norms[i].weight, norms[i].eps)
        return h

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (T, D/2) of positions (T,) or, for Qwen2.5-VL prompts, (3, T)."""
        cos, sin = self.lm.model.rope_tables(positions[:, None] if positions.dim() == 2 else positions[None])
        return cos.reshape(-1, cos.shape[-1]), sin.reshape(-1, sin.shape[-1])

    def _sample(self, hidden: torch.Tensor, p: dict[str, torch.Tensor], linear: Linear) -> tuple[torch.Tensor, torch.Tensor]:
        logits = linear(hidden, self.lm.lm_head).float()
        return ops.sample_tokens(logits, p["temperature"], p["top_k"], p["top_p"], p["seeds"], p["counters"])

    # ------------------------------------------------------------------ prefill
    def prefill(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        seq_lens: list[int],
        sampling: list[SamplingParams],
    ) -> tuple[list[int], list[float]]:
        """One packed forward over whole sequences: embeds (T, H) (vision features already in),
        positions (T,) or (3, T), slots (T,); sequence i is the next seq_lens[i] tokens. Samples each
        sequence's next token from its last position; returns (tokens, their logprobs)."""
        cu = torch.tensor([0] + seq_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        max_len = max(seq_lens)
        cu_dev = cu.to(self.device)
        cos, sin = self._rope(positions)

        def attend(q, k, v, layer):
            return ops.varlen_prefill_attention(q, k, v, cu_dev, max_len)

        h = self._layers(embeds, cos, sin, slots, attend, prefill_linear)
        last = (cu[1:] - 1).to(self.device)
        params = {
            "temperature": torch.tensor([s.temperature for s in sampling], dtype=torch.float32),
            "top_k": torch.tensor([s.top_k for s in sampling], dtype=torch.int32),
            "top_p": torch.tensor([s.top_p for s in sampling], dtype=torch.float32),
            "seeds": torch.tensor([s.seed for s in sampling], dtype=torch.long),
            "counters": torch.tensor(seq_lens, dtype=torch.long),  # a sequence of n tokens samples token n
        }
        tokens, logprobs = self._sample(h[last], {k: v.to(self.device) for k, v in params.items()}, decode_linear)
        return tokens.tolist(), logprobs.tolist()

    # ------------------------------------------------------------------ decode
    def _decode_forward(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The decode step over the first n buffer rows; reads and writes nothing else."""
        buf = self._buffers.view(n)
        x = self.lm.model.embed_tokens(buf["tokens"])
        # Decoding continues every M-RoPE axis with the same position, which is plain 1-D RoPE.
        cos, sin = self._rope(buf["positions"])
        tables, lens, cache = buf["block_tables"], buf["seq_lens"], self.cache

        def attend(q, k, v, layer):
            return ops.paged_decode_attention(q, cache.key_cache(layer), cache.value_cache(layer), tables, lens)

        h = self._layers(x, cos, sin, buf["slots"], attend, decode_linear)
        return self._sample(h, buf, decode_linear)

    def _padded(self, n: int) -> int:
        if self.buckets is None:
            return n
        return next(b for b in self.buckets if b >= n)

    def _graph_for(self, n: int):
        entry = self._graphs.get(n)
        if entry is None:
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            # Warm up off the capture (Triton compiles, allocator settles); the inputs are this
            # step's, so the K/V it writes are the ones the replay writes again.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._decode_forward(n)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._graph_pool):
                outputs = self._decode_forward(n)
            entry = self._graphs[n] = (graph, outputs)
        return entry

    def decode(self, rows: list[DecodeRow]) -> tuple[list[int], list[float]]:
        """One token for each row; rows[i] is buffer row i (keep a request on one row while it runs
        so its block table is not re-uploaded)."""
        if not 0 < len(rows) <= self.max_batch:
            raise ValueError(f"a decode step takes 1..{self.max_batch} rows, got {len(rows)}")
        n = self._padded(len(rows))
        self._buffers.fill(rows, n, self.cache.block_size)
        if self.cuda_graphs:
            graph, (tokens, logprobs) = self._graph_for(n)
            graph.replay()
        else:
            tokens, logprobs = self._decode_forward(n)
        live = len(rows)
        return tokens[:live].tolist(), logprobs[:live].tolist()
