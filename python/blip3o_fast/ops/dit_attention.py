"""Fused DiT attention (Lumina-Next): LayerNorm across heads on q (and k), 2-D RoPE, softmax attention
with grouped KV heads, the per-head tanh gate of cross-attention, and an optional residual add.

    qn  = RoPE(LayerNorm_{Hq*D}(q; q_weight, q_bias))                  per token, over all heads at once
    kn  = LayerNorm_{Hkv*D}(k; k_weight, k_bias) if k_weight given else k;  RoPE(kn) if rope_k
    o_h = softmax(qn_h kn_{h//g}^T / sqrt(D), keys where key_mask) v_{h//g}       g = Hq / Hkv
    out = residual + tanh(gate_h) * o_h          (gate and residual optional: 1 and 0 when absent)

Self-attention: rope_k=True, k_weight given. Cross-attention: rope_k=False (the LLM context gets no
RoPE), gate given, and at inference k_weight=None because the sampler hoists LayerNorm_k(k) out of
the step loop. The block sums its self and cross outputs by passing the self output as `residual`.
LayerNorm eps is fixed at 1e-5 as in Lumina-Next; RoPE uses the interleaved (complex-pair) layout.
A query whose keys are all masked out gets o = 0 (and lse = -inf).

Faces: dit_attention_reference (here), csrc/cpu/dit_attention.cpp, kernels/dit_attention.py,
csrc/cuda/dit_attention.cu. Kernel contract (all faces; every tensor contiguous; q, k, v, weights,
residual, out share one dtype; None where an optional input is absent):
  dit_attention_fwd(q[B,Tq,Hq,D], k[B,Tk,Hkv,D], v[B,Tk,Hkv,D], q_weight[Hq*D], q_bias[Hq*D],
                    k_weight[Hkv*D]|None, k_bias[Hkv*D]|None, cos[B,Tq,D/2] fp32, sin[B,Tq,D/2] fp32,
                    key_mask[B,Tk] bool|None, gate[Hq]|None, residual[B,Tq,Hq,D]|None, rope_k: bool,
                    out[B,Tq,Hq,D], lse[B,Hq,Tq] fp32, out_ungated[B,Tq,Hq,D]|None)
      lse is the natural-log sum-exp of each query's scaled scores (what the backward needs);
      out_ungated, when given, receives o before gate and residual (the backward needs it).
      With rope_k, k uses the same cos/sin rows as q (requires Tk == Tq).
  dit_attention_bwd(dout[B,Tq,Hq,D], q, k, v, q_weight, q_bias, k_weight|None, k_bias|None, cos, sin,
                    key_mask|None, gate|None, rope_k, out_ungated[B,Tq,Hq,D], lse[B,Hq,Tq] fp32,
                    dq[B,Tq,Hq,D], dk[B,Tk,Hkv,D], dv[B,Tk,Hkv,D], dq_weight[Hq*D] fp32,
                    dq_bias[Hq*D] fp32, dk_weight[Hkv*D] fp32|None, dk_bias[Hkv*D] fp32|None,
                    dgate[Hq] fp32|None)
      dout is the gradient of out; the residual's gradient is dout itself (no kernel work).
      dq_weight .. dgate are fp32 and summed over all tokens deterministically (no float atomics).
"""

from __future__ import annotations

import math

import torch

from blip3o_fast.ops import dispatch
from blip3o_fast.ops.checks import check_float, check_same, check_shape
from blip3o_fast.ops.rope import rope_reference

LN_EPS = 1e-5


def _layer_norm_heads(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """LayerNorm over all heads of a token: x (B, T, H, D) normalised over H*D, in fp32."""
    b, t, h, d = x.shape
    flat = x.float().reshape(b, t, h * d)
    flat = torch.nn.functional.layer_norm(flat, (h * d,), weight.float(), bias.float(), LN_EPS)
    return flat.view(b, t, h, d)


def dit_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_weight: torch.Tensor,
    q_bias: torch.Tensor,
    k_weight: torch.Tensor | None,
    k_bias: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    key_mask: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    rope_k: bool = True,
) -> torch.Tensor:
    """The oracle: plain PyTorch in fp32, rounded once to q's dtype. Differentiable by autograd."""
    b, tq, hq, d = q.shape
    hkv = k.shape[2]
    qn = rope_reference(_layer_norm_heads(q, q_weight, q_bias), cos, sin, interleaved=True).float()
    kn = _layer_norm_heads(k, k_weight, k_bias) if k_weight is not None else k.float()
    if rope_k:
        kn = rope_reference(kn, cos, sin, interleaved=True).float()
    rep = hq // hkv
    kh = kn.transpose(1, 2).repeat_interleave(rep, dim=1)  # (B, Hq, Tk, D)
    vh = v.float().transpose(1, 2).repeat_interleave(rep, dim=1)
    scores = qn.transpose(1, 2) @ kh.transpose(-1, -2) / math.sqrt(d)  # (B, Hq, Tq, Tk)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask.bool()[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # fully masked rows -> 0
    o = (probs @ vh).transpose(1, 2)  # (B, Tq, Hq, D)
    if gate is not None:
        o = o * gate.float().tanh().view(1, 1, hq, 1)
    if residual is not None:
        o = o + residual.float()
    return o.to(q.dtype)


def _reference_scores(q, k, q_weight, q_bias, k_weight, k_bias, cos, sin, key_mask, rope_k):
    """The reference's qn (B, Tq, Hq, D), kn (B, Tk, Hkv, D) and masked scaled scores (B, Hq, Tq, Tk), fp32."""
    qn = rope_reference(_layer_norm_heads(q, q_weight, q_bias), cos, sin, interleaved=True).float()
    kn = _layer_norm_heads(k, k_weight, k_bias) if k_weight is not None else k.float()
    if rope_k:
        kn = rope_reference(kn, cos, sin, interleaved=True).float()
    kh = kn.transpose(1, 2).repeat_interleave(q.shape[2] // k.shape[2], dim=1)
    scores = qn.transpose(1, 2) @ kh.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask.bool()[:, None, None, :], float("-inf"))
    return qn, kn, scores


def _reference_lse(q, k, q_weight, q_bias, k_weight, k_bias, cos, sin, key_mask, rope_k) -> torch.Tensor:
    """The forward's lse (B, Hq, Tq) fp32: -inf where every key is masked."""
    return torch.logsumexp(_reference_scores(q, k, q_weight, q_bias, k_weight, k_bias, cos, sin, key_mask, rope_k)[2], -1)


def _layer_norm_heads_bwd(gy, x, weight):
    """LayerNorm over all heads, backward: gy (B, T, H, D) fp32 -> dx fp32, dweight, dbias (fp32)."""
    b, t, h, d = x.shape
    xf = x.float().reshape(b, t, h * d)
    gy = gy.reshape(b, t, h * d)
    mean = xf.mean(-1, keepdim=True)
    rstd = torch.rsqrt(xf.var(-1, unbiased=False, keepdim=True) + LN_EPS)
    xhat = (xf - mean) * rstd
    g = gy * weight.float()
    dx = rstd * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    return dx.view(x.shape), (gy * xhat).sum((0, 1)), gy.sum((0, 1))


def _reference_bwd(dout, q, k, v, q_weight, q_bias, k_weight, k_bias, cos, sin, key_mask, gate, rope_k):
    """The torch face of the backward: the reference's gradients written out in fp32 (autograd does not
    record inside a custom op's implementation, so this cannot simply differentiate the reference)."""
    hq, hkv = q.shape[2], k.shape[2]
    rep = hq // hkv
    qn, kn, scores = _reference_scores(q, k, q_weight, q_bias, k_weight, k_bias, cos, sin, key_mask, rope_k)
    scale = 1.0 / math.sqrt(q.shape[-1])
    kh = kn.transpose(1, 2).repeat_interleave(rep, dim=1)  # (B, Hq, Tk, D)
    vh = v.float().transpose(1, 2).repeat_interleave(rep, dim=1)
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    do = dout.float().transpose(1, 2)  # (B, Hq, Tq, D)
    dgate = None
    if gate is not None:
        tg = gate.float().tanh()
        dgate = (do * (p @ vh)).sum((0, 2, 3)) * (1 - tg * tg)
        do = do * tg.view(1, hq, 1, 1)

    def group_sum(t):  # (B, Hq, T, D) -> (B, T, Hkv, D): a kv head's gradient sums over its q heads
        return t.unflatten(1, (hkv, rep)).sum(2).transpose(1, 2)

    dv = group_sum(p.transpose(-1, -2) @ do)
    dp = do @ vh.transpose(-1, -2)
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    dqn = (ds @ kh).transpose(1, 2) * scale
    dkn = group_sum(ds.transpose(-1, -2) @ qn.transpose(1, 2)) * scale
    dq, dqw, dqb = _layer_norm_heads_bwd(rope_reference(dqn, cos, -sin, interleaved=True), q, q_weight)
    if rope_k:
        dkn = rope_reference(dkn, cos, -sin, interleaved=True)
    dk, dkw, dkb = _layer_norm_heads_bwd(dkn, k, k_weight) if k_weight is not None else (dkn, None, None)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dqw, dqb, dkw, dkb, dgate


@torch.library.custom_op("blip3o_fast::dit_attention_fwd", mutates_args=())
def _fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_weight: torch.Tensor,
    q_bias: torch.Tensor,
    k_weight: torch.Tensor | None,
    k_bias: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    key_mask: torch.Tensor | None,
    gate: torch.Tensor | None,
    residual: torch.Tensor | None,
    rope_k: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, out_ungated, lse); out_ungated is a copy of out when there is no gate or residual."""
    _, fn = dispatch.kernel_for("dit_attention_fwd", q.device, backend or None)
    if fn is None:  # contiguous, as the kernels' outputs (and the fake's) are
        o = dit_attention_reference(
            q, k, v, q_weight, q_bias, k_weight, k_bias, cos, sin, key_mask=key_mask, rope_k=rope_k
        ).contiguous()
        out = o.clone() if gate is None and residual is None else dit_attention_reference(
            q, k, v, q_weight, q_bias, k_weight, k_bias, cos, sin,
            key_mask=key_mask, gate=gate, residual=residual, rope_k=rope_k,
        ).contiguous()
        lse = _reference_lse(q, k, q_weight, q_bias, k_weight, k_bias, cos, sin, key_mask, rope_k)
        return out, o, lse
    b, tq, hq, _ = q.shape
    out, o = torch.empty_like(q), torch.empty_like(q)
    lse = torch.empty(b, hq, tq, dtype=torch.float32, device=q.device)
    fn(q, k, v, q_weight, q_bias, k_weight, k_bias, cos, sin, key_mask, gate, residual, rope_k, out, lse, o)
    return out, o, lse


@_fwd.register_fake
def _(q, k, v, q_weight, q_bias, k_weight, k_bias, cos, sin, key_mask, gate, residual, rope_k, backend):
    b, tq, hq, _ = q.shape
    return torch.empty_like(q), torch.empty_like(q), q.new_empty((b, hq, tq), dtype=torch.float32)


@torch.library.custom_op("blip3o_fast::dit_attention_bwd", mutates_args=())
def _bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_weight: torch.Tensor,
    q_bias: torch.Tensor,
    k_weight: torch.Tensor | None,
    k_bias: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    key_mask: torch.Tensor | None,
    gate: torch.Tensor | None,
    rope_k: bool,
    out_ungated: torch.Tensor,
    lse: torch.Tensor,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dq_weight, dq_bias, dk_weight, dk_bias, dgate); the last five fp32, and empty (0,)
    where their input is absent (a custom op cannot return None)."""
    _, fn = dispatch.kernel_for("dit_attention_bwd", q.device, backend or None)
    if fn is None:
        grads = _reference_bwd(dout, q, k, v, q_weight, q_bias, k_weight, k_bias, cos, sin, key_mask, gate, rope_k)
        return tuple(_empty_f32(q) if g is None else g for g in grads)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    f32 = lambda t: None if t is None else torch.empty(t.shape, dtype=torch.float32, device=q.device)  # noqa: E731
    params = [f32(t) for t in (q_weight, q_bias, k_weight, k_bias, gate)]
    fn(dout, q, k, v, q_weight, q_bias, k_weight, k_bias, cos, sin, key_mask, gate, rope_k, out_ungated, lse,
       dq, dk, dv, *params)
    return (dq, dk, dv, *(_empty_f32(q) if g is None else g for g in params))


def _empty_f32(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty((0,), dtype=torch.float32)


@_bwd.register_fake
def _(dout, q, k, v, q_weight, q_bias, k_weight, k_bias, cos, sin, key_mask, gate, rope_k, out_ungated, lse, backend):
    f32 = lambda t: _empty_f32(q) if t is None else q.new_empty(t.shape, dtype=torch.float32)  # noqa: E731
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            *(f32(t) for t in (q_weight, q_bias, k_weight, k_bias, gate)))


def _setup(ctx, inputs, output):
    q, k, v, q_weight, q_bias, k_weight, k_bias, cos, sin, key_mask, gate, residual, rope_k, backend = inputs
    _, out_ungated, lse = output
    ctx.save_for_backward(q, k, v, q_weight, q_bias, k_weight, k_bias, cos, sin, key_mask, gate, out_ungated, lse)
    ctx.flags = (rope_k, backend, residual is not None)
    # Only `out` is differentiable: out_ungated and lse are saved for the backward, not for users.
    ctx.mark_non_differentiable(out_ungated, lse)


def _backward(ctx, dout, _do_ungated, _dlse):
    q, k, v, q_weight, q_bias, k_weight, k_bias, cos, sin, key_mask, gate, out_ungated, lse = ctx.saved_tensors
    rope_k, backend, has_residual = ctx.flags
    dout = dout.contiguous()
    dq, dk, dv, dqw, dqb, dkw, dkb, dgate = _bwd(
        dout, q, k, v, q_weight, q_bias, k_weight, k_bias, cos, sin, key_mask, gate, rope_k, out_ungated, lse, backend
    )
    cast = lambda g, t: None if t is None else g.to(t.dtype)  # noqa: E731
    return (dq, dk, dv, cast(dqw, q_weight), cast(dqb, q_bias), cast(dkw, k_weight), cast(dkb, k_bias),
            None, None, None, cast(dgate, gate), dout if has_residual else None, None, None)


_fwd.register_autograd(_backward, setup_context=_setup)


def dit_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_weight: torch.Tensor,
    q_bias: torch.Tensor,
    k_weight: torch.Tensor | None = None,
    k_bias: torch.Tensor | None = None,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    *,
    key_mask: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    rope_k: bool = True,
    backend: str | None = None,
) -> torch.Tensor:
    """Fused DiT attention (module docstring): q (B, Tq, Hq, D), k/v (B, Tk, Hkv, D), cos/sin
    (1 or B, Tq, D/2). Returns out (B, Tq, Hq, D) in q's dtype. `backend`: torch | cpu | triton | cuda
    (default: by device). The Triton face needs a power-of-two D from 16 to 128."""
    op = "dit_attention"
    check_float(op, "q", q)
    check_same(op, "q", q, k=k, v=v, q_weight=q_weight, q_bias=q_bias,
               **{n: t for n, t in (("k_weight", k_weight), ("k_bias", k_bias), ("gate", gate),
                                    ("residual", residual)) if t is not None})
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must be 4-D (B, T, H, D), got shape {tuple(t.shape)}")
    b, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"{op}: k must be (B={b}, Tk, Hkv, D={d}), got {tuple(k.shape)}")
    check_shape(op, "v", v, tuple(k.shape))
    if d % 2:
        raise ValueError(f"{op}: head dim D must be even for RoPE, got {d}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"{op}: q heads ({hq}) must be a multiple of k/v heads ({hkv})")
    check_shape(op, "q_weight", q_weight, (hq * d,))
    check_shape(op, "q_bias", q_bias, (hq * d,))
    if (k_weight is None) != (k_bias is None):
        raise ValueError(f"{op}: k_weight and k_bias must be given together (or both None)")
    if k_weight is not None:
        check_shape(op, "k_weight", k_weight, (hkv * d,))
        check_shape(op, "k_bias", k_bias, (hkv * d,))
    if rope_k and tk != tq:
        raise ValueError(f"{op}: rope_k=True rotates k with q's cos/sin rows, so Tk ({tk}) must equal Tq ({tq})")
    cos, sin = (_table(op, name, t, q) for name, t in (("cos", cos), ("sin", sin)))
    if key_mask is not None:
        if not isinstance(key_mask, torch.Tensor) or key_mask.dtype != torch.bool:
            raise TypeError(f"{op}: key_mask must be a bool tensor, got "
                            f"{key_mask.dtype if isinstance(key_mask, torch.Tensor) else type(key_mask).__name__}")
        if key_mask.device != q.device:
            raise ValueError(f"{op}: key_mask is on {key_mask.device} but q is on {q.device}")
        check_shape(op, "key_mask", key_mask, (b, tk))
    if gate is not None:
        check_shape(op, "gate", gate, (hq,))
    if residual is not None:
        check_shape(op, "residual", residual, tuple(q.shape))
    if dispatch.requested_backend(backend) == "torch":
        return dit_attention_reference(q, k, v, q_weight, q_bias, k_weight, k_bias, cos, sin,
                                       key_mask=key_mask, gate=gate, residual=residual, rope_k=rope_k)
    c = lambda t: None if t is None else t.contiguous()  # noqa: E731
    return _fwd(q.contiguous(), k.contiguous(), v.contiguous(), q_weight.contiguous(), q_bias.contiguous(),
                c(k_weight), c(k_bias), cos, sin, c(key_mask), c(gate), c(residual), bool(rope_k), backend or "")[0]


def _table(op: str, name: str, t: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    """cos/sin (1 or B, Tq, D/2) of any float dtype -> contiguous fp32 (B, Tq, D/2), as the kernels read them."""
    if t is None:
        raise TypeError(f"{op}: {name} is required (the RoPE table of q, shape (1 or B, Tq, D/2))")
    check_float(op, name, t)
    if t.device != q.device:
        raise ValueError(f"{op}: {name} is on {t.device} but q is on {q.device}")
    b, tq, _, d = q.shape
    if t.dim() != 3 or t.shape[0] not in (1, b) or tuple(t.shape[1:]) != (tq, d // 2):
        raise ValueError(f"{op}: {name} must have shape (1 or {b}, {tq}, {d // 2}), got {tuple(t.shape)}")
    return t.float().expand(b, tq, d // 2).contiguous()
