"""CLIP-feature generation end to end: our DiT + sampler vs the released diffusers-based loop.

The reference is what BLIP3-o runs (spec 5.1): PixArtAlphaTextProjection caption projection +
diffusers' LuminaNextDiT2DModel + FlowMatchEulerDiscreteScheduler (built per call), sigmas
linspace(1, 1/N, N), the doubled batch unconditional (zeroed condition) first, the timestep cast
to an integer, guidance 3.0. Both sides share the same random weights (our model's parameters are
the reference's tensors) and start from the same noise. Cases, fixed here:
  bench DiT   64 tokens, width 1792, 28 heads, 4 layers, context 64 x 2048, fp32, batch 1 and 4,
              10 steps, CFG 3.0
  full DiT    the same with 24 layers (the released size), batch 1, a single step
Rows: the reference loop; ours with reference_exact=True (must agree within 1e-4 relative: the
script exits 1 otherwise); ours default (Euler with float timesteps: it differs from the reference
where sigma*1000 is not an integer). Per row: time per call, per DiT step, effective GFLOP/s (the
reference's FLOPs per step over the row's time: hoisting makes ours do less), speed-up vs the
reference, max |difference| / max |reference|. Every path first runs one untimed single-step call
(lazy initialisation); then each is timed over --repeats calls (median; default 1, as the
reference takes seconds per step on a small CPU). The few-step solvers are compared in
bench_few_step_solvers.py.

    python benchmarks/bench_dit_sampler.py [--json out.json] [--cases bench,full] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import machine_info, measure_peaks  # noqa: E402

from blip3o_fast.engine.flow_sampler import initial_noise, sample_features  # noqa: E402
from blip3o_fast.models.config import DiTConfig  # noqa: E402
from blip3o_fast.models.dit import NextDiT  # noqa: E402

BENCH = dict(hidden_size=1792, num_attention_heads=28, num_kv_heads=28, in_channels=1792, sample_size=8,
             patch_size=1, caption_dim=2048)
CASES = {
    "bench": [dict(layers=4, batch=1, steps=10), dict(layers=4, batch=4, steps=10)],
    "full": [dict(layers=24, batch=1, steps=1)],
}
CONTEXT_LEN, GUIDANCE, SHIFT, TOLERANCE = 64, 3.0, 1.0, 1e-4


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write machine, peaks, configuration and rows to this path")
    ap.add_argument("--cases", default="bench,full")
    ap.add_argument("--repeats", type=int, default=1, help="timed calls per row (median)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return ap.parse_args()


class Reference(torch.nn.Module):
    """BLIP3-o's DiT as released: caption projection, then diffusers' Lumina-Next DiT."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        from diffusers.models.embeddings import PixArtAlphaTextProjection, get_2d_rotary_pos_embed_lumina
        from diffusers.models.transformers.lumina_nextdit2d import LuminaNextDiT2DModel

        self.caption_projection = PixArtAlphaTextProjection(cfg.caption_dim, cfg.hidden_size, act_fn="gelu_tanh")
        self.dit = LuminaNextDiT2DModel(
            sample_size=cfg.sample_size, patch_size=cfg.patch_size, in_channels=cfg.in_channels,
            hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
            num_kv_heads=cfg.num_kv_heads, multiple_of=cfg.multiple_of, norm_eps=cfg.norm_eps, learn_sigma=False,
            qk_norm=True, cross_attention_dim=cfg.hidden_size,
        )
        self.rope = get_2d_rotary_pos_embed_lumina(cfg.head_dim, 384, 384)

    def forward(self, x, timestep, context):
        mask = torch.ones(context.shape[:2], dtype=torch.long, device=context.device)  # as released: all ones
        rope = self.rope.to(x.device)
        return self.dit(x, timestep, self.caption_projection(context), mask, rope, cross_attention_kwargs={},
                        return_dict=False)[0]


def reference_loop(ref: Reference, cond: torch.Tensor, latents: torch.Tensor, steps: int) -> torch.Tensor:
    """The released sampler loop (blip3o_qwen_inference.py, spec 5.1) -> (B, tokens, C)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), device=latents.device)
    cond2 = torch.cat([torch.zeros_like(cond), cond])
    with torch.no_grad():
        for t in sched.timesteps:
            inp = torch.cat([latents, latents])
            v = ref(inp, t.expand(inp.shape[0]).to(torch.long), cond2)
            v_u, v_c = v.chunk(2)
            latents = sched.step(v_u + GUIDANCE * (v_c - v_u), t, latents, return_dict=False)[0]
    return latents.flatten(2).transpose(1, 2)


def build(layers: int, device: torch.device) -> tuple[DiTConfig, Reference, NextDiT]:
    cfg = DiTConfig(num_layers=layers, **BENCH)
    torch.manual_seed(0)
    ref = Reference(cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith(".gate"):  # zero at init: randomise so the cross-attention path counts
                p.copy_(torch.randn_like(p) * 0.5)
    ref = ref.to(device)
    with torch.device("meta"):
        ours = NextDiT(cfg)
    sd = {f"caption_projection.{k}": v for k, v in ref.caption_projection.state_dict().items()}
    sd.update({k: v for k, v in ref.dit.state_dict().items() if k != "pad_token"})
    ours.load_state_dict(sd, strict=True, assign=True)  # shares the reference's tensors
    return cfg, ref, ours.eval()


def step_flops(cfg: DiTConfig, rows: int, ctx: int) -> int:
    """FLOPs of one DiT evaluation at `rows` samples as the reference computes it (every step
    redoes the caption projection, cross K/V and adaLN; attention counted as QK^T and PV)."""
    d, f, t, te, c = cfg.hidden_size, cfg.ffn_hidden_size, cfg.sample_size**2, cfg.time_embed_dim, cfg.in_channels
    per_layer = t * (5 * d * d + 3 * d * f) + ctx * 2 * d * d + 2 * t * (t + ctx) * d + te * 4 * d
    per_sample = cfg.num_layers * per_layer + ctx * (cfg.caption_dim * d + d * d) + 2 * t * c * d + te * d
    return 2 * rows * per_sample


def timed(fn, device: torch.device, repeats: int) -> tuple[float, object]:
    """(median seconds, last result) over `repeats` calls."""
    out, times = None, []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def main() -> int:
    args = parse_args()
    device = torch.device(args.device)
    machine, peaks = machine_info(device), measure_peaks(device, 2, 5)
    rows, ok = [], True
    for case_name in args.cases.split(","):
        by_layers: dict[int, tuple] = {}
        for case in CASES[case_name]:
            if case["layers"] not in by_layers:
                by_layers.clear()  # one model size in memory at a time
                by_layers[case["layers"]] = build(case["layers"], device)
            cfg, ref, ours = by_layers[case["layers"]]
            b, steps = case["batch"], case["steps"]
            label = f"{case['layers']}L b{b} {steps} step{'s' * (steps > 1)}"
            cond = torch.randn(b, CONTEXT_LEN, cfg.caption_dim, generator=torch.Generator().manual_seed(1)).to(device)
            noise = initial_noise(list(range(b)), cfg.in_channels, cfg.sample_size, device)
            tokens = noise.flatten(2).transpose(1, 2)
            flops = step_flops(cfg, 2 * b, CONTEXT_LEN)
            paths = {
                "reference (diffusers)": lambda n: reference_loop(ref, cond, noise, n),
                "ours reference_exact": lambda n: sample_features(ours, cond, num_steps=n, guidance_scale=GUIDANCE,
                                                                  shift=SHIFT, noise=tokens, reference_exact=True),
                "ours default (euler)": lambda n: sample_features(ours, cond, num_steps=n, guidance_scale=GUIDANCE,
                                                                  shift=SHIFT, noise=tokens),
            }
            for fn in paths.values():
                fn(1)
            ref_s, want = timed(lambda: paths["reference (diffusers)"](steps), device, args.repeats)
            for path, fn in paths.items():
                if path == "reference (diffusers)":
                    sec, got = ref_s, want
                else:
                    sec, got = timed(lambda fn=fn: fn(steps), device, args.repeats)
                diff = rel_diff(got, want)
                if path == "ours reference_exact" and not diff < TOLERANCE:
                    ok = False
                rows.append(dict(case=label, path=path, batch=b, steps=steps, ms_per_call=sec * 1e3,
                                 ms_per_step=sec * 1e3 / steps, gflop_per_s=flops * steps / sec / 1e9,
                                 speedup_vs_reference=ref_s / sec, max_rel_diff=diff))
                print(f"# {label:<18} {path:<22} {sec * 1e3:>10.1f} ms", file=sys.stderr, flush=True)
        by_layers.clear()

    print(f"# DiT sampler on {machine['gpu'] or machine['cpu']} ({machine['cores']} cores, torch {machine['torch']}, "
          f"{machine['torch_threads']} threads); memcpy {peaks['memcpy_gb_per_s']:.1f} GB/s, fp32 matmul "
          f"{peaks['matmul_fp32_tflop_per_s'] * 1e3:.1f} GFLOP/s; fp32, CFG {GUIDANCE}, context {CONTEXT_LEN}")
    head = (f"{'case':<18} {'path':<22} {'ms/call':>10} {'ms/step':>9} {'GFLOP/s':>8} {'%peak':>6} "
            f"{'vs ref':>7} {'max rel diff':>12}")
    print(head)
    print("-" * len(head))
    for r in rows:
        frac = r["gflop_per_s"] / (peaks["matmul_fp32_tflop_per_s"] * 1e3)
        print(f"{r['case']:<18} {r['path']:<22} {r['ms_per_call']:>10.1f} {r['ms_per_step']:>9.1f} "
              f"{r['gflop_per_s']:>8.1f} {100 * frac:>5.0f}% {r['speedup_vs_reference']:>6.2f}x "
              f"{r['max_rel_diff']:>12.2e}")
    print(f"# reference_exact within {TOLERANCE:g} of the reference: {'yes' if ok else 'NO'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bench": "dit_sampler", "machine": machine, "peaks": peaks,
                       "config": {"shape": BENCH, "cases": CASES, "context": CONTEXT_LEN, "guidance": GUIDANCE,
                                  "shift": SHIFT, "dtype": "fp32"}, "results": rows}, f, indent=1)
        print(f"# wrote {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
