"""Paged decode attention, every face that runs here vs the PyTorch reference (gather + softmax): one
decode step of Qwen2.5-0.5B's attention (14 query heads, 2 kv heads, head dim 64) over a paged cache of
16-token blocks in shuffled order, contexts of 128 and 4096 tokens at batch 1 and 16, fp32 and bf16,
num_splits left to the op's default. GB/s counts the K/V bytes the step must read (q and out are
noise); "%peak" is that against the harness's measured memcpy bandwidth.
    python benchmarks/ops/bench_paged_decode_attention.py [--json out]"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness import Bench, parse_args  # noqa: E402

from blip3o_fast.ops import paged_decode_attention  # noqa: E402
from blip3o_fast.ops.paged_decode_attention import default_num_splits  # noqa: E402

HEADS, KV_HEADS, D, BLOCK = 14, 2, 64, 16
CASES = [(1, 128), (16, 128), (1, 4096), (16, 4096)]  # (batch, context)


def make_inputs(batch, context, dtype, device, gen):
    blocks = -(-context // BLOCK)
    order = torch.randperm(batch * blocks, generator=gen)
    tables = order.view(batch, blocks).int()
    k = torch.randn(batch * blocks, BLOCK, KV_HEADS, D, generator=gen)
    v = torch.randn(batch * blocks, BLOCK, KV_HEADS, D, generator=gen)
    q = torch.randn(batch, HEADS, D, generator=gen)
    lens = torch.full((batch,), context, dtype=torch.int32)
    return [t.to(device) for t in (q.to(dtype), k.to(dtype), v.to(dtype), tables, lens)]


def main():
    args = parse_args(__doc__)
    bench = Bench("paged_decode_attention", {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": D,
                                             "block_size": BLOCK, "cases": CASES}, args)
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for batch, context in CASES:
            x = make_inputs(batch, context, dtype, bench.device, gen)
            splits = default_num_splits(batch, KV_HEADS, x[3].shape[1], BLOCK, bench.device)
            nbytes = 2 * batch * context * KV_HEADS * D * x[0].element_size()
            calls = {f: (lambda f=f: paged_decode_attention(*x, backend=f)) for f in bench.faces}
            bench.run(f"B={batch} ctx={context} splits={splits}", "fwd", dtype, calls, nbytes=nbytes)
    bench.report()


if __name__ == "__main__":
    main()
