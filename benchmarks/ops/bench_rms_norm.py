"""RMSNorm, every face that runs here vs the PyTorch reference: Qwen2.5-VL-7B hidden (3584) over 4096
tokens, forward and backward, fp32 and bf16.  python benchmarks/ops/bench_rms_norm.py [--json out]"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness import Bench, parse_args  # noqa: E402

from blip3o_fast.ops import rms_norm  # noqa: E402

ROWS, N, EPS = 4096, 3584, 1e-6


def main():
    args = parse_args(__doc__)
    bench = Bench("rms_norm", {"rows": ROWS, "N": N, "eps": EPS}, args)
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x, dy = (torch.randn(ROWS, N, generator=gen).to(bench.device, dtype) for _ in range(2))
        w = (1 + 0.1 * torch.randn(N, generator=gen)).to(bench.device, dtype)
        rstd = torch.rsqrt(x.float().pow(2).mean(-1) + EPS)
        es = x.element_size()
        case = f"{ROWS}x{N}"
        bench.run(case, "fwd", dtype, {f: (lambda f=f: rms_norm(x, w, EPS, backend=f)) for f in bench.faces},
                  nbytes=2 * ROWS * N * es + N * es + ROWS * 4)
        bwd = torch.ops.blip3o_fast.rms_norm_bwd
        bench.run(case, "bwd", dtype, {f: (lambda f=f: bwd(dy, x, w, rstd, f)) for f in bench.faces},
                  nbytes=3 * ROWS * N * es + N * es + ROWS * 4 + N * 4)
    bench.report()


if __name__ == "__main__":
    main()
