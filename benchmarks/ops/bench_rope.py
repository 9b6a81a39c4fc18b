"""RoPE, every face that runs here vs the PyTorch reference: Qwen2.5-VL-7B prefill (B1 T2048 H28 D128,
half layout) and a DiT training batch (B16 T64 H28 D64, interleaved as Lumina); forward and the
inverse rotation (the backward), fp32 and bf16.  python benchmarks/ops/bench_rope.py [--json out]"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness import Bench, parse_args  # noqa: E402

CASES = (("qwen B1 T2048 H28 D128 half", (1, 2048, 28, 128), False),
         ("dit B16 T64 H28 D64 inter", (16, 64, 28, 64), True))


def main():
    args = parse_args(__doc__)
    bench = Bench("rope", {name: shape for name, shape, _ in CASES}, args)
    gen = torch.Generator().manual_seed(0)
    op = torch.ops.blip3o_fast.rope
    for dtype in (torch.float32, torch.bfloat16):
        for name, (b, t, h, d), interleaved in CASES:
            x = torch.randn(b, t, h, d, generator=gen).to(bench.device, dtype)
            angles = 100 * torch.rand(b, t, d // 2, generator=gen)
            cos, sin = angles.cos().to(bench.device), angles.sin().to(bench.device)
            nbytes = 2 * x.numel() * x.element_size() + 2 * cos.numel() * 4
            for direction, inverse in (("fwd", False), ("bwd", True)):
                bench.run(name, direction, dtype,
                          {f: (lambda f=f, inv=inverse: op(x, cos, sin, interleaved, inv, f)) for f in bench.faces},
                          nbytes=nbytes)
    bench.report()


if __name__ == "__main__":
    main()
