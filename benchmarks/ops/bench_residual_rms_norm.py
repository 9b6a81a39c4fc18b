"""Decoder residual add + RMSNorm, every face that runs here vs the PyTorch reference: prefill-sized
batches (8192 rows) at the Qwen2-0.5B / Qwen2.5-VL-3B / -7B hidden sizes (896, 2048, 3584) and decode
batches (1 and 256 rows) at 3584, forward and backward, fp32 and bf16.
python benchmarks/ops/bench_residual_rms_norm.py [--json out]"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness import Bench, parse_args  # noqa: E402

from blip3o_fast.ops import residual_rms_norm  # noqa: E402

CASES = ((8192, 896), (8192, 2048), (8192, 3584), (1, 3584), (256, 3584))  # (rows, N)
EPS = 1e-6


def main():
    args = parse_args(__doc__)
    bench = Bench("residual_rms_norm", {"cases": CASES, "eps": EPS}, args)
    gen = torch.Generator().manual_seed(0)
    bwd = torch.ops.blip3o_fast.residual_rms_norm_bwd
    for dtype in (torch.float32, torch.bfloat16):
        for rows, n in CASES:
            x, r, dy, dres = (torch.randn(rows, n, generator=gen).to(bench.device, dtype) for _ in range(4))
            w = (1 + 0.1 * torch.randn(n, generator=gen)).to(bench.device, dtype)
            s = x + r
            rstd = torch.rsqrt(s.float().pow(2).mean(-1) + EPS)
            es = x.element_size()
            case = f"{rows}x{n}"
            bench.run(case, "fwd", dtype,
                      {f: (lambda f=f: residual_rms_norm(x, r, w, EPS, backend=f)) for f in bench.faces},
                      nbytes=4 * rows * n * es + n * es + rows * 4)  # x, residual in; y, new_residual out
            bench.run(case, "bwd", dtype, {f: (lambda f=f: bwd(dy, dres, s, w, rstd, f)) for f in bench.faces},
                      nbytes=4 * rows * n * es + n * es + rows * 4 + n * 4)  # dy, dres, s in; ds out
    bench.report()


if __name__ == "__main__":
    main()
