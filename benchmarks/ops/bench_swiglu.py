"""SwiGLU, every face that runs here vs the PyTorch reference: Qwen2.5-VL-7B MLP activation
(1024 tokens x 18944), forward and backward, fp32 and bf16.  python benchmarks/ops/bench_swiglu.py [--json out]"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness import Bench, parse_args  # noqa: E402

from blip3o_fast.ops import swiglu  # noqa: E402

TOKENS, INTERMEDIATE = 1024, 18944


def main():
    args = parse_args(__doc__)
    bench = Bench("swiglu", {"tokens": TOKENS, "intermediate": INTERMEDIATE}, args)
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        gate, up, dy = (torch.randn(TOKENS, INTERMEDIATE, generator=gen).to(bench.device, dtype) for _ in range(3))
        moved = gate.numel() * gate.element_size()
        case = f"{TOKENS}x{INTERMEDIATE}"
        bench.run(case, "fwd", dtype, {f: (lambda f=f: swiglu(gate, up, backend=f)) for f in bench.faces},
                  nbytes=3 * moved)
        bwd = torch.ops.blip3o_fast.swiglu_bwd
        bench.run(case, "bwd", dtype, {f: (lambda f=f: bwd(dy, gate, up, f)) for f in bench.faces}, nbytes=5 * moved)
    bench.report()


if __name__ == "__main__":
    main()
