"""Fused linear + cross-entropy (the understanding loss over the lm_head), every face that runs here vs the
PyTorch reference, which materialises the (N, V) fp32 logits: Qwen2.5-0.5B's lm_head (H 896, V 151936)
over 2048 tokens, and a smaller case; fp32 and bf16; the forward alone and forward + backward (gradients
of hidden and weight), 10% of the rows ignored.
TFLOP/s count the model's matmul work (2NVH forward, 4NVH backward) for every face alike; the fused
kernels do more (the backward recomputes the logits) and the reference more memory traffic. A second
table gives each face's peak memory during one forward + backward beyond the inputs (GPU:
max_memory_allocated; CPU: the rise of the process's peak RSS, reset through /proc/self/clear_refs) and
the fraction of the measured fp32 matmul peak.
python benchmarks/ops/bench_linear_cross_entropy.py [--json out]"""

import ctypes
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness import Bench, parse_args  # noqa: E402

from blip3o_fast.ops import linear_cross_entropy  # noqa: E402

CASES = (("N2048 H896 V151936", 2048, 896, 151936), ("N512 H896 V32768", 512, 896, 32768))
IGNORED = 0.1


def _rss(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def peak_bytes(fn, device: torch.device) -> int:
    """Peak memory one call of fn takes beyond what is live before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # peak RSS := current RSS
    base = _rss("VmRSS")
    fn()
    return _rss("VmHWM") - base


def main():
    args = parse_args(__doc__)
    if args.device == "cpu":
        # glibc serves big blocks by mmap and unmaps them on free, but raises that threshold after the first
        # free: then freed logits would stay resident and hide the next call's peak. Fix it at 64 KiB.
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD
    bench = Bench("linear_cross_entropy", {"cases": [c[0] for c in CASES], "ignored": IGNORED,
                                           "reduction": "mean"}, args)
    gen = torch.Generator().manual_seed(0)
    memory = []
    for case, n, h, v in CASES:
        for dtype in (torch.float32, torch.bfloat16):
            hidden = torch.randn(n, h, generator=gen, dtype=dtype).to(bench.device).requires_grad_()
            weight = (torch.randn(v, h, generator=gen, dtype=dtype) * h**-0.5).to(bench.device).requires_grad_()
            targets = torch.randint(0, v, (n,), generator=gen)
            targets[torch.rand(n, generator=gen) < IGNORED] = -100
            targets = targets.to(bench.device)
            es = hidden.element_size()

            def fwd(face):
                with torch.no_grad():
                    return linear_cross_entropy(hidden, weight, targets, backend=face)

            def fwd_bwd(face):
                loss = linear_cross_entropy(hidden, weight, targets, backend=face)
                return torch.autograd.grad(loss, (hidden, weight))

            nbytes = (n * h + v * h) * es + n * 8
            bench.run(case, "fwd", dtype, {f: (lambda f=f: fwd(f)) for f in bench.faces}, nbytes=nbytes,
                      flops=2 * n * v * h)
            bench.run(case, "f+b", dtype, {f: (lambda f=f: fwd_bwd(f)) for f in bench.faces},
                      nbytes=3 * nbytes, flops=6 * n * v * h)
            for face in bench.faces:
                memory.append({"case": case, "dtype": str(dtype).replace("torch.", ""), "face": face,
                               "peak_mb": peak_bytes(lambda f=face: fwd_bwd(f), bench.device) / 2**20})
    bench.report()

    peak = bench.peaks["matmul_fp32_tflop_per_s"]
    print(f"\n# forward + backward: peak memory beyond the inputs, and model TFLOP/s as a fraction of the "
          f"measured fp32 matmul peak ({peak * 1e3:.1f} GFLOP/s)")
    print(f"{'case':<22} {'dtype':<9} {'face':<7} {'peak MB':>9} {'vs torch':>9} {'%mm peak':>9}")
    for m in memory:
        ref = next(r for r in memory if r["case"] == m["case"] and r["dtype"] == m["dtype"] and r["face"] == "torch")
        row = next(r for r in bench.rows if r.case == m["case"] and r.dtype == m["dtype"] and r.face == m["face"]
                   and r.direction == "f+b")
        m["frac_matmul_peak"] = row.tflop_per_s / peak
        print(f"{m['case']:<22} {m['dtype']:<9} {m['face']:<7} {m['peak_mb']:>9.1f} "
              f"{m['peak_mb'] / max(ref['peak_mb'], 1e-9):>8.3f}x {100 * m['frac_matmul_peak']:>8.0f}%")
    if args.json:
        with open(args.json) as f:
            data = json.load(f)
        data["peak_memory"] = memory
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)


if __name__ == "__main__":
    main()
