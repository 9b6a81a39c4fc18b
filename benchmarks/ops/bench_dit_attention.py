"""Fused DiT attention, every face that runs here vs the PyTorch reference: the BLIP3-o DiT's shapes
(28 heads of 64, 64 image tokens), self-attention at batch 2 (CFG doubles batch 1) and 8,
cross-attention over a 64-token context (mask, gate, residual, hoisted k LayerNorm), and one
4096-token self-attention (forward only); forward and backward, fp32 and bf16.
TFLOP/s counts the attention matmuls only (4*B*H*Tq*Tk*D forward, 2.5x that backward); "%peak" is the
fraction of the harness's measured fp32 matmul peak.  python benchmarks/ops/bench_dit_attention.py [--json out]"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness import Bench, parse_args  # noqa: E402

from blip3o_fast.ops import dit_attention  # noqa: E402

HEADS, D = 28, 64
# (case, B, Tq, Tk, cross, backward)
CASES = [
    ("self B=2 T=64", 2, 64, 64, False, True),
    ("self B=8 T=64", 8, 64, 64, False, True),
    ("cross B=2 T=64 Tk=64", 2, 64, 64, True, True),
    ("self B=1 T=4096", 1, 4096, 4096, False, False),
]


def make_inputs(b, tq, tk, cross, dtype, device, gen):
    r = lambda *s: torch.randn(*s, generator=gen).to(device, dtype)  # noqa: E731
    x = dict(q=r(b, tq, HEADS, D), k=r(b, tk, HEADS, D), v=r(b, tk, HEADS, D),
             q_weight=1 + 0.1 * r(HEADS * D), q_bias=0.1 * r(HEADS * D))
    angles = torch.rand(1, tq, D // 2, generator=gen).to(device)
    x.update(cos=angles.cos(), sin=angles.sin(), rope_k=not cross)
    if cross:
        mask = torch.ones(b, tk, dtype=torch.bool)
        mask[:, tk - tk // 4:] = False  # a padded context
        x.update(key_mask=mask.to(device), gate=r(HEADS), residual=r(b, tq, HEADS, D))
    else:
        x.update(k_weight=1 + 0.1 * r(HEADS * D), k_bias=0.1 * r(HEADS * D))
    return x


def main():
    args = parse_args(__doc__)
    bench = Bench("dit_attention", {"heads": HEADS, "head_dim": D, "cases": CASES}, args)
    peak = bench.peaks["matmul_fp32_tflop_per_s"]
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for case, b, tq, tk, cross, backward in CASES:
            x = make_inputs(b, tq, tk, cross, dtype, bench.device, gen)
            es = x["q"].element_size()
            flops = 4 * b * HEADS * tq * tk * D
            nbytes = (2 * b * tq + 2 * b * tk) * HEADS * D * es + (b * tq * HEADS * D * es if cross else 0)
            fwd = {f: (lambda f=f: dit_attention(**x, backend=f)) for f in bench.faces}
            bench.run(case, "fwd", dtype, fwd, nbytes=nbytes, flops=flops)
            if not backward:
                continue
            leaves = {n: x[n].detach().requires_grad_() for n in ("q", "k", "v", "q_weight", "q_bias")}
            dy = torch.randn(b, tq, HEADS, D, generator=gen).to(bench.device, dtype)

            def bwd(f):
                out = dit_attention(**{**x, **leaves}, backend=f)
                return torch.autograd.grad(out, list(leaves.values()), dy)

            # timed: forward + backward (the backward needs the forward's saved tensors)
            bench.run(case, "f+b", dtype, {f: (lambda f=f: bwd(f)) for f in bench.faces},
                      nbytes=3 * nbytes, flops=flops + 5 * flops // 2)
    bench.report()
    print(f"# %peak of TFLOP/s vs the fp32 matmul peak ({peak * 1e3:.1f} GFLOP/s):")
    for r in bench.rows:
        if r.tflop_per_s:
            print(f"#   {r.case:<24} {r.direction:<4} {r.dtype:<9} {r.face:<7} {100 * r.tflop_per_s / peak:6.1f}%")


if __name__ == "__main__":
    main()
