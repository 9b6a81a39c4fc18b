"""Per-request token sampling for the decode engine: one row of logits per request, per-row
temperature / top-k / top-p / seed / counter, fixed shapes and no host sync (CUDA-graph capturable).
Not differentiable (it returns integer tokens); no autograd is registered.

Per row, with raw = logits.float():
  temperature <= 0   greedy: argmax(raw), the lowest index on ties.
  otherwise          s = raw / temperature (IEEE division); the kept set is a threshold set
                     {i : s_i >= tau}, with these tie-exact rules (all faces count them the same way):
                       top-k (0 < k < V): keep value v iff count(s > v) < k  (tau_k = the k-th largest,
                         every token tied with it kept)
                       top-p (p < 1): with w_j = exp(s_j - max s) over the top-k set and Z = sum w,
                         keep v iff sum(w_j : s_j > v) < p * Z, or v is the row max (always kept)
                     On tie-free rows this is exactly engine.text_generation.filter_logits.
                     The token is the Gumbel-max draw argmax_{kept} (s_i + gumbel(seed, counter, i)),
                     lowest index on ties, with the counter-based noise of csrc/include/blip3o/sample_tokens.h
                     (a fixed hash of (seed, counter, token index) and a log built from IEEE +,-,*,/ only),
                     so a row's token depends on (logits, parameters, seed, counter) alone, never on the
                     batch, and all faces draw the same noise bits.
  logprobs           log_softmax(raw)[token] (no temperature, no filter): what the engine reports.
Faces agree exactly on the noise and on the top-k threshold; top-p masses are float sums whose order
differs by face (sorted prefix here and on the CPU, index-ordered tiles on GPUs), so a token whose
mass boundary lies within float rounding of p * Z may be kept by one face and not another.

Faces: sample_tokens_reference (here), csrc/cpu/sample_tokens.cpp, kernels/sample_tokens.py,
csrc/cuda/sample_tokens.cu. Kernel contract (every tensor contiguous, one device):
  sample_tokens(logits[B,V] f32|f16|bf16, temperature[B] f32, top_k[B] i32, top_p[B] f32, seeds[B] i64,
                counters[B] i64, tokens[B] i64, logprobs[B] f32)
"""

from __future__ import annotations

import torch

from blip3o_fast.ops import dispatch
from blip3o_fast.ops.checks import check_float

_M32 = 0xFFFFFFFF
# The float32 constants of plog (csrc/include/blip3o/sample_tokens.h), bit-exact through float.fromhex.
_C3, _C5, _C7, _C9 = (float.fromhex(h) for h in ("0x1.555556p-2", "0x1.99999ap-3", "0x1.24924ap-3", "0x1.c71c72p-4"))
_LN2_HI, _LN2_LO = float.fromhex("0x1.63p-1"), float.fromhex("-0x1.bd0106p-13")


def _mul32(a: torch.Tensor, c: int) -> torch.Tensor:
    """a * c mod 2^32 for a in [0, 2^32) held in int64, split so no product overflows int64."""
    return (a * (c & 0xFFFF) + (((a * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def row_key(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """The per-(seed, counter) hash key, as int64 in [0, 2^32)."""
    h = _mix((seeds & _M32) ^ 0x9E3779B9)
    h = _mix(h ^ ((seeds >> 32) & _M32))
    h = _mix(h ^ (counters & _M32))
    return _mix(h ^ ((counters >> 32) & _M32))


def plog(x: torch.Tensor) -> torch.Tensor:
    """Natural log of positive normal fp32 values, bit-identical to the kernels' plog."""
    b = x.view(torch.int32).long()
    mant = b & 0x7FFFFF
    high = mant > 0x3504F3
    m = (mant | torch.where(high, 0x3F000000, 0x3F800000)).to(torch.int32).view(torch.float32)
    e = ((b >> 23) - torch.where(high, 126, 127)).to(torch.float32)
    s = (m - 1.0) / (m + 1.0)
    z = s * s
    p = _C9 * z
    p = (p + _C7) * z
    p = (p + _C5) * z
    p = (p + _C3) * z
    r = s * p + s
    return e * _LN2_HI + (e * _LN2_LO + (r + r))


def gumbel_noise(seeds: torch.Tensor, counters: torch.Tensor, vocab: int) -> torch.Tensor:
    """(B, vocab) fp32 Gumbel noise of each row's (seed, counter), token by token."""
    idx = torch.arange(vocab, dtype=torch.int64, device=seeds.device)
    bits = _mix(row_key(seeds, counters)[:, None] ^ _mix(idx)[None, :])
    u = (((bits >> 9) << 1) | 1).to(torch.float32) * 2.0**-24
    return -plog(-plog(u))


def kept_threshold(s: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """tau (B,) fp32 such that the kept set of each row of s (B, V) is {s >= tau} (rules in the module doc)."""
    vocab = s.shape[-1]
    vals = s.sort(-1, descending=True).values
    row_max = vals[:, :1]
    k_on = (top_k > 0) & (top_k < vocab)
    kth = vals.gather(1, (top_k.clamp(1, vocab) - 1).long()[:, None])[:, 0]
    tau = torch.where(k_on, kth, float("-inf"))
    w = torch.exp(vals - row_max) * (vals >= tau[:, None])
    z = w.sum(-1, keepdim=True)
    before = torch.cat([torch.zeros_like(w[:, :1]), w.cumsum(-1)[:, :-1]], -1)
    neg = (-vals).contiguous()
    first = torch.searchsorted(neg, neg)  # first position of each value's tie group
    keep = (before.gather(1, first) < top_p[:, None] * z) | (vals == row_max)
    tau_p = torch.where(keep, vals, float("inf")).min(-1).values
    return torch.where(top_p < 1, torch.maximum(tau, tau_p), tau)


def sample_tokens_reference(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
    seeds: torch.Tensor, counters: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    raw = logits.float()
    warm = temperature > 0
    s = raw / torch.where(warm, temperature, 1.0)[:, None]
    tau = kept_threshold(s, top_k, top_p)
    score = torch.where(s >= tau[:, None], s + gumbel_noise(seeds, counters, raw.shape[-1]), float("-inf"))
    tokens = torch.where(warm, score.argmax(-1), raw.argmax(-1))
    logprobs = raw.gather(1, tokens[:, None])[:, 0] - torch.logsumexp(raw, -1)
    return tokens, logprobs


@torch.library.custom_op("blip3o_fast::sample_tokens", mutates_args=())
def _sample(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, seeds: torch.Tensor,
    counters: torch.Tensor, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    _, fn = dispatch.kernel_for("sample_tokens", logits.device, backend or None)
    if fn is None:
        return sample_tokens_reference(logits, temperature, top_k, top_p, seeds, counters)
    b = logits.shape[0]
    tokens = torch.empty(b, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(b, dtype=torch.float32, device=logits.device)
    fn(logits, temperature, top_k, top_p, seeds, counters, tokens, logprobs)
    return tokens, logprobs


@_sample.register_fake
def _(logits, temperature, top_k, top_p, seeds, counters, backend):
    b = logits.shape[0]
    return logits.new_empty((b,), dtype=torch.int64), logits.new_empty((b,), dtype=torch.float32)


_PARAMS = (("temperature", torch.float32), ("top_k", torch.int32), ("top_p", torch.float32), ("seeds", torch.int64),
           ("counters", torch.int64))


def sample_tokens(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, seeds: torch.Tensor,
    counters: torch.Tensor, *, backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next token (B,) int64 and its log-probability under the raw logits (B,) fp32 for each row of
    logits (B, V). Per row: temperature (fp32; <= 0 greedy), top_k (int32; <= 0 or >= V off), top_p (fp32;
    >= 1 off), seeds and counters (int64; the engine passes the token position as the counter)."""
    op = "sample_tokens"
    check_float(op, "logits", logits)
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"{op}: logits must be (B, V) with V >= 1, got {tuple(logits.shape)}")
    if logits.shape[1] >= 2**31:
        raise ValueError(f"{op}: the vocabulary must be below 2^31 tokens, got {logits.shape[1]}")
    b = logits.shape[0]
    given = (temperature, top_k, top_p, seeds, counters)
    for (name, dtype), t in zip(_PARAMS, given):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != dtype:
            raise TypeError(f"{op}: {name} must be {dtype}, got {t.dtype}")
        if tuple(t.shape) != (b,):
            raise ValueError(f"{op}: {name} must have shape ({b},), got {tuple(t.shape)}")
        if t.device != logits.device:
            raise ValueError(f"{op}: {name} is on {t.device} but logits is on {logits.device}")
    if dispatch.requested_backend(backend) == "torch":
        return sample_tokens_reference(logits, *given)
    return dispatch.call(_sample, logits.contiguous(), *(t.contiguous() for t in given), backend or "")
