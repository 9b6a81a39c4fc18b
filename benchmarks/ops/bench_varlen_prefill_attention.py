"""Varlen causal prefill attention, every face that runs here vs PyTorch eager: Qwen2.5-0.5B's attention
(14 q heads, 2 kv heads, head dim 64) over one packed batch of 4 prompts of 64 tokens and 1 of 512, fp32
and bf16. The "torch" face is the eager path the op replaces in the engine: one causal GQA SDPA call per
distinct prompt length over the prompts of that length. TFLOP/s counts the causal attention matmuls only
(4 * H * D * L(L+1)/2 per prompt); the footer gives it as a fraction of the harness's measured fp32
matmul peak.  python benchmarks/ops/bench_varlen_prefill_attention.py [--json out]"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness import Bench, parse_args  # noqa: E402

from blip3o_fast.ops import varlen_prefill_attention  # noqa: E402

HEADS, KV_HEADS, D = 14, 2, 64
LENGTHS = (64, 64, 64, 64, 512)


def grouped_sdpa(q, k, v, lengths):
    """PyTorch eager: prompts of one length batched into one causal SDPA call."""
    out = torch.empty_like(q)
    starts = torch.tensor([0, *lengths]).cumsum(0)[:-1].tolist()
    by_length: dict[int, list[int]] = {}
    for start, n in zip(starts, lengths):
        by_length.setdefault(n, []).append(start)
    for n, firsts in by_length.items():
        rows = (torch.tensor(firsts, device=q.device)[:, None] + torch.arange(n, device=q.device)).view(-1)
        qs, ks, vs = (x[rows].view(len(firsts), n, x.shape[1], D).transpose(1, 2) for x in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
        out[rows] = o.transpose(1, 2).reshape(-1, HEADS, D)
    return out


def main():
    args = parse_args(__doc__)
    bench = Bench("varlen_prefill_attention", {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": D,
                                               "lengths": LENGTHS}, args)
    peak = bench.peaks["matmul_fp32_tflop_per_s"]
    gen = torch.Generator().manual_seed(0)
    n = sum(LENGTHS)
    cu = torch.tensor([0, *LENGTHS], dtype=torch.int32).cumsum(0, dtype=torch.int32).to(bench.device)
    flops = sum(4 * HEADS * D * length * (length + 1) // 2 for length in LENGTHS)
    case = f"qwen0.5B {'+'.join(map(str, LENGTHS))}"
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = (torch.randn(n, h, D, generator=gen).to(bench.device, dtype) for h in (HEADS, KV_HEADS, KV_HEADS))
        nbytes = 2 * (q.numel() + k.numel()) * q.element_size()  # q, k, v in; out
        calls = {f: (lambda f=f: varlen_prefill_attention(q, k, v, cu, max(LENGTHS), backend=f)) for f in bench.faces}
        calls["torch"] = lambda: grouped_sdpa(q, k, v, LENGTHS)
        bench.run(case, "fwd", dtype, calls, nbytes=nbytes, flops=flops)
    bench.report()
    print(f"# %peak of TFLOP/s vs the fp32 matmul peak ({peak * 1e3:.1f} GFLOP/s):")
    for r in bench.rows:
        print(f"#   {r.dtype:<9} {r.face:<7} {100 * r.tflop_per_s / peak:6.1f}%")


if __name__ == "__main__":
    main()
