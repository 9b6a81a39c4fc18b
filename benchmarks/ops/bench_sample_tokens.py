"""Per-request token sampling, every face that runs here vs the PyTorch reference: the Qwen2 vocabulary
(151936) at decode batches 1 and 16, bf16 and fp32 logits, per sampling rule: greedy, temperature only,
top-k 50 + top-p 0.9, top-p 0.95. GB/s counts one read of the logits (the floor; the kernels read the row
a few times more, from L2 on GPUs).  python benchmarks/ops/bench_sample_tokens.py [--json out]"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness import Bench, parse_args  # noqa: E402

from blip3o_fast.ops import sample_tokens  # noqa: E402

VOCAB = 151936
BATCHES = (1, 16)
RULES = {"greedy": (0.0, 0, 1.0), "temp": (0.8, 0, 1.0), "k50+p0.9": (0.8, 50, 0.9), "p0.95": (0.8, 0, 0.95)}


def main():
    args = parse_args(__doc__)
    bench = Bench("sample_tokens", {"vocab": VOCAB, "batches": BATCHES, "rules": RULES}, args)
    gen = torch.Generator().manual_seed(0)
    dev = bench.device
    for dtype in (torch.bfloat16, torch.float32):
        for b in BATCHES:
            logits = (4 * torch.randn(b, VOCAB, generator=gen)).to(dev, dtype)  # LM-like spread
            seeds = torch.arange(b, dtype=torch.int64, device=dev)
            counters = torch.full((b,), 100, dtype=torch.int64, device=dev)
            for name, (t, k, p) in RULES.items():
                temp = torch.full((b,), t, device=dev)
                top_k = torch.full((b,), k, dtype=torch.int32, device=dev)
                top_p = torch.full((b,), p, device=dev)
                bench.run(f"B{b} V{VOCAB} {name}", "fwd", dtype,
                          {f: (lambda f=f: sample_tokens(logits, temp, top_k, top_p, seeds, counters, backend=f))
                           for f in bench.faces},
                          nbytes=b * VOCAB * logits.element_size())
    bench.report()


if __name__ == "__main__":
    main()
