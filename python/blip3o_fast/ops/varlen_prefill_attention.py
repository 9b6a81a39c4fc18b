"""Varlen causal prefill attention: S prompts packed into one token axis, each attending only to itself.

    for each sequence s (rows cu_seqlens[s] .. cu_seqlens[s+1]-1) and query head h:
        o_i = softmax_{j <= i}(scale * q_i . k_j) v_j        i, j positions within the sequence
    k and v of query head h come from kv head h // (H / KVH) (GQA); scale defaults to D**-0.5.

Zero-length sequences are allowed (they own no rows). Math in fp32 with an online softmax in the
kernels, output in q's dtype. Inference only: there is no backward (the AR engine's prefill never
needs one). The engine's current path is paged_kv_cache.prefill_attention (grouped SDPA).

Faces: varlen_prefill_attention_reference (here), csrc/cpu/varlen_prefill_attention.cpp,
kernels/varlen_prefill_attention.py, csrc/cuda/varlen_prefill_attention.cu.
Kernel contract (all faces; q, k, v, out contiguous and of one dtype):
  varlen_prefill_attention_fwd(q[N,H,D], k[N,KVH,D], v[N,KVH,D], cu_seqlens[S+1] int32, max_seqlen: int,
                               scale: float, out[N,H,D])
  cu_seqlens lives on q's device; max_seqlen (>= every length) is a sizing hint the faces may ignore.
  The value checks on cu_seqlens (0 first, N last, nondecreasing, lengths <= max_seqlen) run here when it
  lives on the CPU; on a GPU they would cost a device sync per call (per layer), so there the kernels
  instead clamp every offset into [0, N]: bad offsets give wrong rows, never out-of-bounds accesses.
"""

from __future__ import annotations

import torch

from blip3o_fast.ops import dispatch
from blip3o_fast.ops.checks import check_float, check_same


def varlen_prefill_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """The oracle: per sequence, full scores in fp32 with a causal mask, rounded once to q's dtype."""
    n, h, d = q.shape
    group = h // k.shape[1]
    scale = d**-0.5 if scale is None else scale
    out = torch.zeros((n, h, d), dtype=torch.float32, device=q.device)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qs = q[start:end].float().transpose(0, 1)  # (H, L, D)
        ks = k[start:end].float().repeat_interleave(group, dim=1).transpose(0, 1)
        vs = v[start:end].float().repeat_interleave(group, dim=1).transpose(0, 1)
        scores = qs @ ks.transpose(-1, -2) * scale  # (H, L, L)
        causal = torch.ones(end - start, end - start, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        out[start:end] = (scores.softmax(-1) @ vs).transpose(0, 1)
    return out.to(q.dtype)


@torch.library.custom_op("blip3o_fast::varlen_prefill_attention", mutates_args=())
def _varlen_prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float,
    backend: str,
) -> torch.Tensor:
    _, fn = dispatch.kernel_for("varlen_prefill_attention_fwd", q.device, backend or None)
    if fn is None:
        return varlen_prefill_attention_reference(q, k, v, cu_seqlens, scale)
    out = torch.empty_like(q)
    fn(q, k, v, cu_seqlens, max_seqlen, scale, out)
    return out


@_varlen_prefill_attention.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, scale, backend):
    return torch.empty_like(q)


def _check_cu_seqlens(op: str, cu_seqlens: torch.Tensor, tokens: int, max_seqlen: int) -> None:
    """Offsets' values: free on the CPU; on a GPU skipped (see the module docstring)."""
    if cu_seqlens.device.type != "cpu":
        return
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != tokens:
        raise ValueError(f"{op}: cu_seqlens must start at 0 and end at N = {tokens}, got {bounds[0]} .. {bounds[-1]}")
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    if any(n < 0 for n in lengths):
        raise ValueError(f"{op}: cu_seqlens must be nondecreasing, got {bounds}")
    if lengths and max(lengths) > max_seqlen:
        raise ValueError(f"{op}: max_seqlen ({max_seqlen}) is below the longest sequence ({max(lengths)})")


def varlen_prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Causal attention within each packed sequence: q (N, H, D), k, v (N, KVH, D), cu_seqlens (S+1,) int32
    offsets, max_seqlen a host int >= every length. Returns (N, H, D) in q's dtype. Inference only.
    The Triton face needs a power-of-two D from 16 to 128."""
    op = "varlen_prefill_attention"
    check_float(op, "q", q)
    check_same(op, "q", q, k=k, v=v)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(f"{op}: {name} must be 3-D (N, heads, D), got shape {tuple(t.shape)}")
    n, h, d = q.shape
    kvh = k.shape[1]
    if k.shape[0] != n or k.shape[2] != d:
        raise ValueError(f"{op}: k must be (N={n}, KVH, D={d}), got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"{op}: v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if kvh == 0 or h % kvh:
        raise ValueError(f"{op}: q heads ({h}) must be a multiple of k/v heads ({kvh})")
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32:
        got = cu_seqlens.dtype if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens).__name__
        raise TypeError(f"{op}: cu_seqlens must be an int32 tensor, got {got}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"{op}: cu_seqlens must be 1-D (S+1,) with S >= 0, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"{op}: cu_seqlens is on {cu_seqlens.device} but q is on {q.device}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise TypeError(f"{op}: max_seqlen must be a non-negative host int, got {max_seqlen!r}")
    _check_cu_seqlens(op, cu_seqlens, n, max_seqlen)
    scale = d**-0.5 if scale is None else float(scale)
    if dispatch.requested_backend(backend) == "torch":
        return varlen_prefill_attention_reference(q, k, v, cu_seqlens, scale)
    return dispatch.call(_varlen_prefill_attention, q.contiguous(), k.contiguous(), v.contiguous(),
                         cu_seqlens.contiguous(), max_seqlen, scale, backend or "")
