"""adaLN RMSNorm-zero modulation, every face that runs here vs the PyTorch reference: a DiT training
batch (B32 T64 N1792, Lumina-Next hidden), forward and backward, fp32 and bf16.
python benchmarks/ops/bench_rms_norm_modulate.py [--json out]"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness import Bench, parse_args  # noqa: E402

from blip3o_fast.ops import rms_norm_modulate  # noqa: E402

B, T, N, EPS = 32, 64, 1792, 1e-5


def main():
    args = parse_args(__doc__)
    bench = Bench("rms_norm_modulate", {"B": B, "T": T, "N": N, "eps": EPS}, args)
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x, dy = (torch.randn(B, T, N, generator=gen).to(bench.device, dtype) for _ in range(2))
        w = (1 + 0.1 * torch.randn(N, generator=gen)).to(bench.device, dtype)
        scale = (0.1 * torch.randn(B, N, generator=gen)).to(bench.device, dtype)
        rstd = torch.rsqrt(x.float().pow(2).mean(-1) + EPS).reshape(-1)
        es, rows = x.element_size(), B * T
        case = f"B{B} T{T} N{N}"
        bench.run(case, "fwd", dtype,
                  {f: (lambda f=f: rms_norm_modulate(x, w, scale, EPS, backend=f)) for f in bench.faces},
                  nbytes=2 * rows * N * es + (N + B * N) * es + rows * 4)
        bwd = torch.ops.blip3o_fast.rms_norm_modulate_bwd
        bench.run(case, "bwd", dtype, {f: (lambda f=f: bwd(dy, x, w, scale, rstd, f)) for f in bench.faces},
                  nbytes=3 * rows * N * es + (N + B * N) * es + rows * 4 + (N + B * N) * 4)
    bench.report()


if __name__ == "__main__":
    main()
