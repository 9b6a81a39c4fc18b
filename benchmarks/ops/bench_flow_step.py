"""Flow-matching sampler update (CFG combine + update, in place), every face that runs here vs the
PyTorch reference: the CLIP-feature sampler's latents (64 tokens x 1792 per request, B = 1 and 16
requests, the DiT velocity as a doubled CFG batch in bf16), fp32 latents for Euler, the Heun
corrector and the 2-step multistep update, and bf16 latents for the released sampler's exact step.
python benchmarks/ops/bench_flow_step.py [--json out]"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness import Bench, parse_args  # noqa: E402

from blip3o_fast.ops import flow_step  # noqa: E402

N, BATCHES, G, DT = 64 * 1792, (1, 16), 3.0, -1.0 / 30


def main():
    args = parse_args(__doc__)
    bench = Bench("flow_step", {"N": N, "B": list(BATCHES), "guidance": G, "v_dtype": "bfloat16"}, args)
    gen = torch.Generator().manual_seed(0)
    for b in BATCHES:
        x = torch.randn(b, N, generator=gen).to(bench.device)
        v = torch.randn(2 * b, N, generator=gen).to(bench.device, torch.bfloat16)
        hist = torch.randn(b, N, generator=gen).to(bench.device)
        xe = x.to(torch.bfloat16)
        total = b * N
        case = f"B{b} N{N}"
        # Each case updates a copy made once: the update is in place, and its cost does not depend
        # on the values it reads.
        runs = {
            "euler": (x.clone(), {}, 4 + 4 + 2 * 2),
            "heun-c": (x.clone(), {"v_prev": hist}, 4 + 4 + 2 * 2 + 4),
            "multistep": (x.clone(), {"v_prev": hist, "v_save": hist}, 4 + 4 + 2 * 2 + 4 + 4),
        }
        for name, (xs, kw, per_elem) in runs.items():
            bench.run(f"{case} {name}", "fwd", torch.float32,
                      {f: (lambda f=f, xs=xs, kw=kw: flow_step(xs, v, DT, G, backend=f, **kw)) for f in bench.faces},
                      nbytes=total * per_elem)
        xs = xe.clone()
        bench.run(f"{case} exact", "fwd", torch.bfloat16,
                  {f: (lambda f=f: flow_step(xs, v, DT, G, exact=True, backend=f)) for f in bench.faces},
                  nbytes=total * (2 + 2 + 2 * 2))
    bench.report()


if __name__ == "__main__":
    main()
