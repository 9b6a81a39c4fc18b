"""RoPE + KV-cache write, every face that runs here vs PyTorch eager: the attention-path step of a Qwen2.5
layer, q and k rotated and the rotated k and v stored into a paged cache (block size 16), for
0.5B (14/2 heads, D 64) and 7B (28/4 heads, D 128) at one 2048-token prefill and a 32-request decode
step; fp32 and bf16. The "torch" face is the unfused path: apply_rope's reference on q and k, then two
index_copy_ into the caches. GB/s counts the minimal traffic (q, k, v and the tables read; q_rot, k_rot
and the cache rows written).  python benchmarks/ops/bench_rope_kv_cache_write.py [--json out]"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness import Bench, parse_args  # noqa: E402

from blip3o_fast.ops import rope_kv_cache_write  # noqa: E402

BLOCK_SIZE = 16
# (case, tokens, heads, kv heads, head dim)
CASES = (("0.5B prefill T2048", 2048, 14, 2, 64), ("0.5B decode T32", 32, 14, 2, 64),
         ("7B prefill T2048", 2048, 28, 4, 128), ("7B decode T32", 32, 28, 4, 128))


def main():
    args = parse_args(__doc__)
    bench = Bench("rope_kv_cache_write", {"block_size": BLOCK_SIZE, "cases": CASES}, args)
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for name, t, h, kvh, d in CASES:
            dev = bench.device
            q, k, v = (torch.randn(t, x, d, generator=gen).to(dev, dtype) for x in (h, kvh, kvh))
            angles = 100 * torch.rand(t, d // 2, generator=gen)
            cos, sin = angles.cos().to(dev), angles.sin().to(dev)
            blocks = 2 * t // BLOCK_SIZE + 1
            k_cache = torch.zeros(blocks, BLOCK_SIZE, kvh, d, dtype=dtype, device=dev)
            v_cache = torch.zeros_like(k_cache)
            slots = torch.randperm(blocks * BLOCK_SIZE, generator=gen)[:t].to(dev)
            es = q.element_size()
            # read q, k, v, cos, sin; write q_rot, k_rot and the k and v cache rows
            nbytes = (2 * q.numel() + 5 * k.numel()) * es + 2 * cos.numel() * 4
            calls = {f: (lambda f=f: rope_kv_cache_write(q, k, v, cos, sin, k_cache, v_cache, slots, backend=f))
                     for f in bench.faces}
            bench.run(name, "fwd", dtype, calls, nbytes=nbytes)
    bench.report()


if __name__ == "__main__":
    main()
