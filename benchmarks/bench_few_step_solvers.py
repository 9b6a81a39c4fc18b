"""Few-step sampling: how close each solver gets to the exact ODE solution for a given DiT budget.

Each solver integrates the same flow (same DiT, condition, noise, CFG 3.0) with few steps and is
compared with a 200-step Euler solution, and with the Richardson extrapolation 2*E200 - E100
(second-order accurate: its distance to E200 estimates E200's own error, which floors the
comparisons). Target: multistep at 10 steps closer than Euler at 30.

The DiT: a small random Lumina-Next DiT (4 layers, width 512, 8 heads, context 64 x 512, 256
feature channels), fp32, batch 4 (8 rows with CFG), shift 1 and 3. Random weights need two changes
to give a velocity field like a trained one: the per-head cross-attention gates (zero at init)
are randomised so the condition matters, and the timestep embedder reads only the low-frequency
sinusoids (k >= 80 of 128; periods >= ~2000 timesteps). Random weights on the high frequencies
(periods down to ~6 timesteps) make v oscillate in sigma as a trained DiT does not, and then no
solver converges in few steps; a trained DiT is smooth in t.

    python benchmarks/bench_few_step_solvers.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import machine_info  # noqa: E402

from blip3o_fast.engine.flow_sampler import sample_features  # noqa: E402
from blip3o_fast.models.config import DiTConfig  # noqa: E402
from blip3o_fast.models.dit import NextDiT  # noqa: E402

CFG = DiTConfig(hidden_size=512, num_layers=4, num_attention_heads=8, num_kv_heads=8, in_channels=256,
                sample_size=8, patch_size=1, caption_dim=512)
BATCH, CONTEXT_LEN, GUIDANCE, SHIFTS = 4, 64, 3.0, (1.0, 3.0)
LOW_FREQ_START = 80  # of the 128 sinusoid frequencies, the first (fastest) 80 are cut
RUNS = [("euler", 2, n) for n in (5, 10, 20, 30)] + [("heun", 2, n) for n in (5, 10)] + \
       [("multistep", o, n) for o in (2, 3) for n in (5, 10, 20)]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write machine, configuration and rows to this path")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return ap.parse_args()


def smooth_random_dit(device: torch.device) -> NextDiT:
    torch.manual_seed(0)
    dit = NextDiT(CFG).eval()
    with torch.no_grad():
        for name, p in dit.named_parameters():
            if name.endswith(".gate"):
                p.copy_(torch.randn_like(p) * 0.5)
        w = dit.time_caption_embed.timestep_embedder.linear_1.weight  # columns [cos f_k | sin f_k], k < 128
        w[:, :LOW_FREQ_START] = 0
        w[:, 128 : 128 + LOW_FREQ_START] = 0
    return dit.to(device)


def errors(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """(max |diff| / max |want|, rms diff / rms want)."""
    d, w = (got - want).float(), want.float()
    return (d.abs().max() / w.abs().max()).item(), (d.pow(2).mean().sqrt() / w.pow(2).mean().sqrt()).item()


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    dit = smooth_random_dit(device)
    cond = torch.randn(BATCH, CONTEXT_LEN, CFG.caption_dim, generator=torch.Generator().manual_seed(1)).to(device)
    seeds = list(range(BATCH))
    rows = []
    for shift in SHIFTS:
        def run(solver: str, order: int, steps: int) -> torch.Tensor:
            return sample_features(dit, cond, num_steps=steps, guidance_scale=GUIDANCE, shift=shift, seeds=seeds,
                                   solver=solver, order=order)

        e200, e100 = run("euler", 2, 200), run("euler", 2, 100)
        richardson = 2 * e200 - e100
        floor = errors(e200, richardson)
        rows.append(dict(shift=shift, solver="euler", order=1, steps=200, dit_evals=200, ms=None,
                         max_rel_vs_e200=0.0, rms_rel_vs_e200=0.0, max_rel_vs_richardson=floor[0],
                         rms_rel_vs_richardson=floor[1]))
        for solver, order, steps in RUNS:
            t0 = time.perf_counter()
            got = run(solver, order, steps)
            ms = (time.perf_counter() - t0) * 1e3
            vs200, vsr = errors(got, e200), errors(got, richardson)
            rows.append(dict(shift=shift, solver=solver, order={"euler": 1, "heun": 2}.get(solver, order), steps=steps,
                             dit_evals=2 * steps - 1 if solver == "heun" else steps, ms=ms,
                             max_rel_vs_e200=vs200[0], rms_rel_vs_e200=vs200[1], max_rel_vs_richardson=vsr[0],
                             rms_rel_vs_richardson=vsr[1]))
            print(f"# shift {shift} {solver}{order if solver == 'multistep' else ''} {steps}: {ms:.0f} ms",
                  file=sys.stderr, flush=True)

    m = machine_info(device)
    print(f"# few-step solvers on {m['gpu'] or m['cpu']}; DiT {CFG.num_layers}L width {CFG.hidden_size}, "
          f"batch {BATCH}, CFG {GUIDANCE}; errors are max|diff|/max|ref| (rms in brackets)")
    head = f"{'shift':>5} {'solver':<15} {'steps':>5} {'DiT evals':>9} {'vs Euler-200':>22} {'vs Richardson':>22}"
    print(head)
    print("-" * len(head))
    for r in rows:
        name = r["solver"] + (f" (AB{r['order']})" if r["solver"] == "multistep" else "")
        print(f"{r['shift']:>5.1f} {name:<15} {r['steps']:>5} {r['dit_evals']:>9} "
              f"{r['max_rel_vs_e200']:>10.2e} [{r['rms_rel_vs_e200']:.2e}] "
              f"{r['max_rel_vs_richardson']:>10.2e} [{r['rms_rel_vs_richardson']:.2e}]")
    for shift in SHIFTS:
        pick = {(r["solver"], r["order"], r["steps"]): r["max_rel_vs_e200"] for r in rows if r["shift"] == shift}
        eu = pick[("euler", 1, 30)]
        for order in (2, 3):
            ab = pick[("multistep", order, 10)]
            print(f"# shift {shift}: multistep AB{order} @10 steps {ab:.2e} vs Euler @30 steps {eu:.2e}: "
                  f"{'closer' if ab < eu else 'NOT closer'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bench": "few_step_solvers", "machine": m,
                       "config": {"dit": vars(CFG), "batch": BATCH, "context": CONTEXT_LEN, "guidance": GUIDANCE,
                                  "low_freq_start": LOW_FREQ_START}, "results": rows}, f, indent=1)
        print(f"# wrote {args.json}")


if __name__ == "__main__":
    main()
