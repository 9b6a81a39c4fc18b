"""The CLIP-feature sampler: ODE integration of the DiT's flow-matching velocity (spec 5.1).

x runs from noise at sigma = 1 to features at sigma = 0 along dx/dsigma = v(x, sigma). Solvers:
  euler      x += (sigma_next - sigma) v: one DiT call per step; the released sampler.
  heun       Euler predictor, trapezoidal corrector with v at sigma_next (2nd order); the step to
             sigma = 0 stays Euler, so N steps cost 2N - 1 calls (as diffusers' FlowMatchHeun)
             and the DiT is never asked about t = 0, which training never sampled.
  multistep  variable-step Adams-Bashforth on the velocity in sigma: one DiT call per step,
             x_{n+1} = x_n + sum_j c_nj v_{n-j}, where c_nj integrates, from sigma_n to sigma_n+1,
             the Lagrange polynomial through the last k = min(order, n + 1) velocities (`order` 2
             or 3; the first steps use the lower orders they have the history for). Flow-matching
             paths are nearly straight, so v varies slowly along them and extrapolating it is
             accurate: in benchmarks/bench_few_step_solvers.py 10 steps land about as close to
             the exact ODE solution as Euler with 30, or closer. (Extrapolating the x0 prediction
             in log-SNR instead, DPM-Solver++(2M) style, did worse there.)
Every grid is linspace(1, 1/N, N) shifted by shift*s / (1 + (shift-1)*s), then 0.

Classifier-free guidance runs as one doubled batch, the unconditional half (zeroed backbone states)
first, and the guidance combine happens inside the update op (ops.flow_step). Work that does not
change across steps is done once per call: the caption projection, every layer's cross-attention
K/V (normed), and the adaLN terms of every timestep of the schedule.

Every buffer the loop touches (latents, the doubled DiT input, velocity history, timesteps,
condition, modulations) is allocated before it starts and reused, so each step reads and writes
fixed addresses. On CUDA the whole loop is captured once as a CUDA graph per configuration and
replayed with new inputs copied into those buffers (no Python between steps); elsewhere the same
loop runs eagerly.

`reference_exact=True` (Euler only) reproduces the released sampler's arithmetic: the sigma grid as
diffusers' FlowMatchEulerDiscreteScheduler holds it (float32), the timestep fed to the DiT
truncated to an integer, the guidance combine in the model's dtype and the latents rounded to it
after each step. The default keeps the latents in fp32 and feeds float timesteps, as in training.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict

import numpy as np
import torch

from blip3o_fast.models.dit import DiTCondition, DiTSchedule, NextDiT
from blip3o_fast.ops import flow_step

SOLVERS = ("euler", "heun", "multistep")
# CUDA graphs kept per process (each holds its buffers and graph memory); least recently used goes first.
MAX_CACHED_GRAPHS = 4


def flow_sigmas(num_steps: int, shift: float = 1.0, reference_exact: bool = False) -> torch.Tensor:
    """Sigmas (num_steps + 1,): linspace(1, 1/N, N) shifted by shift*s / (1 + (shift-1)*s), then 0.

    Exact mode builds the grid as the reference does (numpy float64 linspace, then float32
    arithmetic) and returns float32; otherwise the grid is float64."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    s = np.linspace(1.0, 1.0 / num_steps, num_steps)
    if reference_exact:
        # The scheduler casts the given sigmas to float32 before shifting; with 30 steps that grid
        # gives sigma*1000 = 200.0 and 100.0 at steps 24 and 27 where float64 gives 199.99... and
        # 99.99..., and the integer cast turns that into a different timestep.
        s = s.astype(np.float32)
    s = shift * s / (1 + (shift - 1) * s)
    sig = torch.from_numpy(np.ascontiguousarray(s))
    return torch.cat([sig, sig.new_zeros(1)])


def multistep_coefficients(sigmas: torch.Tensor, order: int) -> torch.Tensor:
    """Adams-Bashforth weights (N, order) for the grid sigmas (N + 1,): step n does
    x += sum_j c[n, j] v_{n-j}, c[n, j] = integral over [sigma_n, sigma_n+1] of the Lagrange basis
    polynomial of node sigma_{n-j} through nodes sigma_n .. sigma_{n-k+1}, k = min(order, n + 1)."""
    if order not in (1, 2, 3):
        raise ValueError(f"multistep order must be 1, 2 or 3, got {order}")
    s = sigmas.double().numpy()
    n_steps = len(s) - 1
    coef = np.zeros((n_steps, order))
    for n in range(n_steps):
        nodes = s[n - min(order, n + 1) + 1 : n + 1][::-1]  # sigma_n, sigma_n-1, ...
        for j, sj in enumerate(nodes):
            basis = np.polynomial.Polynomial([1.0])
            for sm in np.delete(nodes, j):
                basis = basis * np.polynomial.Polynomial([-sm, 1.0]) / (sj - sm)
            antiderivative = basis.integ()
            coef[n, j] = antiderivative(s[n + 1]) - antiderivative(s[n])
    return torch.from_numpy(coef)


def initial_noise(seeds: list[int], channels: int, size: int, device: torch.device) -> torch.Tensor:
    """Per-request seeded fp32 noise (B, C, size, size): a request's noise does not depend on its batch."""
    draws = [
        torch.randn((1, channels, size, size), generator=torch.Generator("cpu").manual_seed(int(s)), dtype=torch.float32)
        for s in seeds
    ]
    return torch.cat(draws).to(device)


class FlowSampler:
    """One sampling configuration with its static buffers: `run` loads a condition, its schedule of
    adaLN terms and the initial latents into them and integrates. Shapes, the grid and the solver's
    weights are fixed at construction, so the loop is the same work at the same addresses every
    call (what a CUDA graph needs)."""

    def __init__(
        self,
        dit: NextDiT,
        cond: DiTCondition,
        schedule: DiTSchedule,
        timesteps: torch.Tensor,
        sigmas: torch.Tensor,
        *,
        solver: str,
        order: int,
        guidance_scale: float,
        guided: bool,
        reference_exact: bool,
    ):
        cfg = dit.cfg
        param = next(dit.parameters())
        self.dtype = param.dtype
        rows = cond.batch_size
        self.batch = rows // 2 if guided else rows
        self.solver, self.guidance, self.exact = solver, guidance_scale, reference_exact
        # Python floats: baked into the loop (and a captured graph) as kernel arguments.
        self.dt = [float(sigmas[i + 1] - sigmas[i]) for i in range(len(sigmas) - 1)]
        self.coef = multistep_coefficients(sigmas, order).tolist() if solver == "multistep" else None
        self.order = order
        # The condition and schedule computed for the first call become the static buffers.
        self.cond, self.schedule = cond, schedule
        self.timesteps = timesteps[:, None].expand(len(timesteps), rows).contiguous()
        size, c = cfg.sample_size, cfg.in_channels
        state_dtype = self.dtype if reference_exact else torch.float32
        self.x = torch.zeros(self.batch, c, size, size, dtype=state_dtype, device=param.device)
        self.inp = torch.zeros(rows, c, size, size, dtype=self.dtype, device=param.device)
        n_vel = {"euler": 0, "heun": 1, "multistep": max(order - 1, 0)}[solver]
        self.v_hist = [torch.zeros_like(self.x, dtype=torch.float32) for _ in range(n_vel)]
        self.x_pred = torch.zeros_like(self.x) if solver == "heun" else None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.dit = weakref.ref(dit)  # a cached graph belongs to this module's weights

    def load(self, cond: DiTCondition, schedule: DiTSchedule, x0: torch.Tensor) -> None:
        if cond is not self.cond:
            self.cond.cross_kv.copy_(cond.cross_kv)
            if cond.key_mask is not None:
                self.cond.key_mask.copy_(cond.key_mask)
            self.schedule.layers.copy_(schedule.layers)
            self.schedule.final_scale.copy_(schedule.final_scale)
        self.x.copy_(x0)

    def _velocity(self, dit: NextDiT, src: torch.Tensor, k: int) -> torch.Tensor:
        """The DiT at grid point k on src, duplicated into both CFG halves of the static input."""
        reps = self.inp.shape[0] // self.batch
        self.inp.view(reps, *src.shape).copy_(src.expand(reps, *src.shape))
        return dit.forward_with_condition(self.inp, self.timesteps[k], self.cond, self.schedule[k])

    def integrate(self, dit: NextDiT) -> None:
        """The whole loop on the static buffers (eager, or recorded by a CUDA graph capture)."""
        g, x, n = self.guidance, self.x, len(self.dt)
        for i, dt in enumerate(self.dt):
            if self.solver == "euler" or (self.solver == "heun" and i == n - 1):
                flow_step(x, self._velocity(dit, x, i), dt, g, exact=self.exact)
            elif self.solver == "heun":
                vb = self.v_hist[0]
                flow_step(x, self._velocity(dit, x, i), dt, g, out=self.x_pred, v_save=vb)
                flow_step(x, self._velocity(dit, self.x_pred, i + 1), dt / 2, g, v_prev=vb, c_prev=dt / 2)
            else:
                self._multistep(dit, i)

    def _multistep(self, dit: NextDiT, i: int) -> None:
        """Step i of order-k Adams-Bashforth; velocity i - j lives in v_hist[(i - j) % (order - 1)]."""
        x, c, slots = self.x, self.coef[i], len(self.v_hist)
        nodes = min(self.order, i + 1)
        v = self._velocity(dit, x, i)
        last = i == len(self.dt) - 1
        save = None if last or not slots else self.v_hist[i % slots]
        if nodes == 3:
            # The oldest term goes in first; its buffer then takes the new velocity.
            x.add_(self.v_hist[(i - 2) % slots], alpha=c[2])
        if nodes >= 2:
            flow_step(x, v, c[0], self.guidance, v_prev=self.v_hist[(i - 1) % slots], c_prev=c[1], v_save=save)
        else:
            flow_step(x, v, c[0], self.guidance, v_save=save)

    def run(self, dit: NextDiT, cond: DiTCondition, schedule: DiTSchedule, x0: torch.Tensor,
            cuda_graph: bool) -> torch.Tensor:
        self.load(cond, schedule, x0)
        if not (cuda_graph and self.x.is_cuda):
            self.integrate(dit)
            return self.x.clone()
        if self.graph is None:
            # Warm up on a side stream first (library handles, kernel compilation), then record.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.integrate(dit)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.integrate(dit)
            self.x.copy_(x0)  # warm-up and capture consumed the loaded latents
        self.graph.replay()
        return self.x.clone()


_GRAPHS: OrderedDict[tuple, FlowSampler] = OrderedDict()


def sample_features(
    dit: NextDiT,
    cond_hidden: torch.Tensor,
    *,
    num_steps: int = 30,
    guidance_scale: float = 3.0,
    shift: float = 1.0,
    num_train_timesteps: int = 1000,
    noise: torch.Tensor | None = None,
    seeds: list[int] | None = None,
    reference_exact: bool = False,
    solver: str = "euler",
    order: int = 2,
    cuda_graph: bool = True,
) -> torch.Tensor:
    """cond_hidden (B, n_query, caption_dim) -> CLIP features (B, size*size, C) in the DiT's dtype,
    tokens row-major. `noise` (B, size*size, C) replaces the seeded initial noise. solver: euler |
    heun | multistep (`order` 2 or 3). Guidance applies when guidance_scale > 1. On CUDA the loop
    runs as a CUDA graph (cached per configuration) unless cuda_graph=False."""
    cfg = dit.cfg
    param = next(dit.parameters())
    device, dtype = param.device, param.dtype
    size, c = cfg.sample_size, cfg.in_channels
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if reference_exact and solver != "euler":
        raise ValueError(f"reference_exact reproduces the released Euler sampler; solver {solver!r} has no reference")
    if solver == "multistep" and order not in (2, 3):
        raise ValueError(f"multistep order must be 2 or 3, got {order}")
    if cond_hidden.dim() != 3 or cond_hidden.shape[-1] != cfg.caption_dim:
        raise ValueError(f"cond_hidden must be (B, n_query, {cfg.caption_dim}), got {tuple(cond_hidden.shape)}")
    b = cond_hidden.shape[0]
    if noise is not None:
        if tuple(noise.shape) != (b, size * size, c):
            raise ValueError(f"noise must be ({b}, {size * size}, {c}) (B, tokens, feature dim), got {tuple(noise.shape)}")
        x0 = noise.to(device=device, dtype=torch.float32).transpose(1, 2).reshape(b, c, size, size)
    elif seeds is not None:
        if len(seeds) != b:
            raise ValueError(f"need one seed per request: {b} requests, {len(seeds)} seeds")
        x0 = initial_noise(seeds, c, size, device)
    else:
        raise ValueError("sample_features needs seeds (one per request) or noise")
    if reference_exact:
        x0 = x0.to(dtype)  # the released sampler keeps its latents in the model's dtype

    sigmas = flow_sigmas(num_steps, shift, reference_exact)
    timesteps = sigmas[:-1] * num_train_timesteps
    timesteps = (timesteps.to(torch.long) if reference_exact else timesteps.float()).to(device)

    cond_hidden = cond_hidden.to(device=device, dtype=dtype)
    guided = guidance_scale > 1.0
    if guided:
        cond_hidden = torch.cat([torch.zeros_like(cond_hidden), cond_hidden])
    with torch.no_grad():
        cond = dit.precompute_condition(cond_hidden)
        schedule = dit.modulations(timesteps, cond)
        use_graph = cuda_graph and device.type == "cuda"
        key = (id(dit), param.data_ptr(), b, cond_hidden.shape[1], num_steps, float(shift), num_train_timesteps,
               solver, order, float(guidance_scale), reference_exact, dtype, device)
        sampler = _GRAPHS.get(key) if use_graph else None
        if sampler is None or sampler.dit() is not dit:
            sampler = FlowSampler(dit, cond, schedule, timesteps, sigmas, solver=solver, order=order,
                                  guidance_scale=guidance_scale, guided=guided, reference_exact=reference_exact)
            if use_graph:
                _GRAPHS[key] = sampler
                while len(_GRAPHS) > MAX_CACHED_GRAPHS:
                    _GRAPHS.popitem(last=False)
        elif use_graph:
            _GRAPHS.move_to_end(key)
        x = sampler.run(dit, cond, schedule, x0, use_graph)
    return x.to(dtype).flatten(2).transpose(1, 2).contiguous()
