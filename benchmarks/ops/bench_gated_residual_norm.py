"""Fused DiT block epilogue (x + gate * RMSNorm(y) * w, then the next adaLN RMSNorm), every face that
runs here vs the PyTorch reference: a DiT training batch (B32 T64 N1792, Lumina-Next hidden), forward
and backward, with the next norm (mid-block) and without (last layer), fp32 and bf16.
python benchmarks/ops/bench_gated_residual_norm.py [--json out]"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness import Bench, parse_args  # noqa: E402

from blip3o_fast.ops import gated_residual_norm  # noqa: E402

B, T, N, EPS = 32, 64, 1792, 1e-5


def main():
    args = parse_args(__doc__)
    bench = Bench("gated_residual_norm", {"B": B, "T": T, "N": N, "eps": EPS}, args)
    gen = torch.Generator().manual_seed(0)
    fwd = torch.ops.blip3o_fast.gated_residual_norm_fwd
    bwd = torch.ops.blip3o_fast.gated_residual_norm_bwd
    for dtype in (torch.float32, torch.bfloat16):
        x, y, dxo, dh = (torch.randn(B, T, N, generator=gen).to(bench.device, dtype) for _ in range(4))
        wy, wn = ((1 + 0.1 * torch.randn(N, generator=gen)).to(bench.device, dtype) for _ in range(2))
        gate, sn = ((0.1 * torch.randn(B, N, generator=gen)).to(bench.device, dtype) for _ in range(2))
        es, rows = x.element_size(), B * T
        params = 2 * (N + B * N) * es
        for with_next in (True, False):
            nw, ns = (wn, sn) if with_next else (None, None)
            _, _, ry, rx = fwd(x, y, wy, gate, nw, ns, EPS, "torch")
            streams = 2 if with_next else 1  # rows of x_out (and h) written; dh read in the backward
            case = f"B{B} T{T} N{N} {'next' if with_next else 'last'}"
            bench.run(case, "fwd", dtype,
                      {f: (lambda f=f: gated_residual_norm(x, y, wy, gate, nw, ns, EPS, backend=f))
                       for f in bench.faces},
                      nbytes=(2 + streams) * rows * N * es + params + streams * rows * 4)
            dh_arg = dh if with_next else None
            bench.run(case, "bwd", dtype,
                      {f: (lambda f=f: bwd(dxo, dh_arg, x, y, wy, gate, nw, ns, ry, rx if with_next else None, f))
                       for f in bench.faces},
                      nbytes=(4 + streams) * rows * N * es + params + streams * rows * 4 + 2 * streams * (N + B * N))
    bench.report()


if __name__ == "__main__":
    main()
