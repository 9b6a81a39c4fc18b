"""Small-M linear (decode steps), every face that runs here vs PyTorch's F.linear ("torch" rows): the
Qwen2.5-0.5B MLP up-projection (N 4864, K 896) and lm_head (N 151936, K 896) for 1, 4 and 16 rows of x,
fp32 and bf16. GB/s counts the weight bytes read once (the op's floor), against the measured memcpy
peak (read + write). Each call takes the next of several copies of the weight, so the working set
exceeds the last-level cache and the weight streams from DRAM as it does in a decode step.
python benchmarks/ops/bench_decode_linear.py [--json out]"""

import sys
from itertools import cycle
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness import Bench, parse_args  # noqa: E402

from blip3o_fast.ops import decode_linear  # noqa: E402

CASES = ((4864, 896), (151936, 896))  # (N, K)
ROWS = (1, 4, 16)
WORKING_SET = 96 << 20  # bytes of weight copies cycled through: above a 32 MiB L3


def main():
    args = parse_args(__doc__)
    bench = Bench("decode_linear", {"cases": CASES, "rows": ROWS}, args)
    gen = torch.Generator().manual_seed(0)
    torch.set_grad_enabled(False)
    for dtype in (torch.float32, torch.bfloat16):
        for n, k in CASES:
            w0 = (torch.randn(n, k, generator=gen) / k**0.5).to(bench.device, dtype)
            nbytes = w0.numel() * w0.element_size()
            weights = [w0] + [w0.clone() for _ in range(-(-WORKING_SET // nbytes) - 1)]
            for m in ROWS:
                x = torch.randn(m, k, generator=gen).to(bench.device, dtype)
                calls = {}
                for face in bench.faces:
                    ws = cycle(weights)
                    if face == "torch":
                        calls[face] = lambda ws=ws: F.linear(x, next(ws))
                    else:
                        calls[face] = lambda ws=ws, face=face: decode_linear(x, next(ws), backend=face)
                bench.run(f"M={m} N={n} K={k}", "fwd", dtype, calls, nbytes=nbytes, flops=2 * m * n * k)
            del weights, w0
    bench.report()


if __name__ == "__main__":
    main()
