"""The shared benchmark harness (DESIGN.md, "Performance: how we measure").

Each case is timed as the median of timed repeats after warmup (slow cases stop at a time budget). The machine's peaks are measured in
the same run: a large memcpy gives GB/s (bytes read + bytes written per second), a large fp32 matmul
gives FLOP/s. Every row prints median time, GB/s moved, the fraction of the memcpy peak, and the
speed-up over the reference face ("torch") on the same inputs. --json writes the machine, peaks,
configuration and rows for later comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from blip3o_fast.ops import available_backends


@dataclass
class Row:
    op: str
    case: str
    direction: str
    dtype: str
    face: str
    median_ms: float
    gb_per_s: float
    frac_memcpy_peak: float
    tflop_per_s: float | None
    speedup_vs_torch: float | None


def parse_args(description: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--json", help="write machine, peaks and results to this path")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return ap.parse_args()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int,
            budget_s: float = 3.0, min_repeats: int = 3) -> float:
    """Median wall time of fn in milliseconds, synchronising the device around each repeat. A slow
    case (the reference on a small CPU) stops early once budget_s is spent, after min_repeats."""
    start = time.perf_counter()
    for _ in range(warmup):
        fn()
        _sync(device)
        if time.perf_counter() - start > budget_s / 2:
            break
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats and (len(times) < min_repeats or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict:
    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def measure_peaks(device: torch.device, warmup: int, repeats: int) -> dict:
    """Measured, not datasheet: memcpy GB/s (read + write) and fp32 matmul TFLOP/s on this device."""
    nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), device, warmup, repeats)
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    mm_ms = time_ms(lambda: a @ b, device, warmup, max(3, repeats // 2))
    return {
        "memcpy_bytes": 2 * nbytes,
        "memcpy_gb_per_s": 2 * nbytes / copy_ms / 1e6,
        "matmul_n": n,
        "matmul_fp32_tflop_per_s": 2 * n**3 / mm_ms / 1e9,
    }


def faces_for(device: torch.device) -> list[str]:
    """Built faces that run on this device, reference first (Triton on CPU is the interpreter:
    a correctness tool, not a timing)."""
    built = available_backends()
    if device.type == "cpu":
        wanted = ("torch", "cpu")
    else:
        wanted = ("torch", "triton", "cuda")
    return [f for f in wanted if f in built]


class Bench:
    """Collects rows for one op's script; prints them as a table and writes JSON."""

    def __init__(self, op: str, config: dict, args: argparse.Namespace):
        self.op = op
        self.config = config
        self.args = args
        self.device = torch.device(args.device)
        self.machine = machine_info(self.device)
        self.peaks = measure_peaks(self.device, args.warmup, args.repeats)
        self.faces = faces_for(self.device)
        self.rows: list[Row] = []

    def run(
        self,
        case: str,
        direction: str,
        dtype: torch.dtype,
        calls: dict[str, Callable[[], object]],
        nbytes: int,
        flops: int | None = None,
    ) -> None:
        """Time calls[face]() for each face here; nbytes is the minimal traffic the op must move."""
        ref_ms = None
        for face in self.faces:
            ms = time_ms(calls[face], self.device, self.args.warmup, self.args.repeats)
            if face == "torch":
                ref_ms = ms
            gbs = nbytes / ms / 1e6
            self.rows.append(Row(
                op=self.op, case=case, direction=direction, dtype=str(dtype).replace("torch.", ""), face=face,
                median_ms=ms, gb_per_s=gbs, frac_memcpy_peak=gbs / self.peaks["memcpy_gb_per_s"],
                tflop_per_s=flops / ms / 1e9 if flops else None,
                speedup_vs_torch=ref_ms / ms if ref_ms else None,
            ))

    def report(self) -> None:
        m, p = self.machine, self.peaks
        print(f"# {self.op} on {m['gpu'] or m['cpu']} ({m['cores']} cores, torch {m['torch']}, "
              f"{m['torch_threads']} threads)")
        print(f"# measured peaks: memcpy {p['memcpy_gb_per_s']:.1f} GB/s, fp32 matmul "
              f"{p['matmul_fp32_tflop_per_s'] * 1e3:.1f} GFLOP/s; config {self.config}")
        with_flops = any(r.tflop_per_s for r in self.rows)
        head = f"{'case':<30} {'dir':<4} {'dtype':<9} {'face':<7} {'median ms':>10} {'GB/s':>8} {'%peak':>6}"
        head += f" {'TFLOP/s':>8}" * with_flops + f" {'vs torch':>9}"
        print(head)
        print("-" * len(head))
        for r in self.rows:
            line = (f"{r.case:<30} {r.direction:<4} {r.dtype:<9} {r.face:<7} {r.median_ms:>10.3f} {r.gb_per_s:>8.1f} "
                    f"{100 * r.frac_memcpy_peak:>5.0f}%")
            if with_flops:
                line += f" {r.tflop_per_s:>8.2f}" if r.tflop_per_s else f" {'-':>8}"
            print(line + (f" {r.speedup_vs_torch:>8.2f}x" if r.speedup_vs_torch else f" {'-':>9}"))
        if self.args.json:
            with open(self.args.json, "w") as f:
                json.dump({"op": self.op, "machine": m, "peaks": p, "config": self.config,
                           "results": [asdict(r) for r in self.rows]}, f, indent=1)
            print(f"# wrote {self.args.json}")
