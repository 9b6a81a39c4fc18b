"""One multitask training step: our TrainingModule vs a reference-style step, samples/s and peak memory.

The reference is what the released training code runs: a transformers LlamaForCausalLM backbone
(queries appended as input embeddings, final hidden states at the query positions), the released
DiT (PixArtAlphaTextProjection + diffusers' LuminaNextDiT2DModel, all-ones masks, the RoPE table
moved to the device every call), flow-matching MSE, and the text CE through transformers' full
fp32 logits. Ours: one backbone pass over generation and understanding rows, our fused DiT ops with
their backward, and the fused lm_head + CE (no logits). Both sides share the same random weights and
inputs (the first step's losses must agree: the script exits 1 otherwise), then each step is
forward + backward + AdamW over every parameter.

Fixed case (so numbers stay comparable): LLaMA-style backbone width 512, 4 layers, 8 heads (4 KV),
FFN 1408, vocabulary 32000; DiT width 512, 4 layers, 8 heads, 256-wide features on the 8 x 8 grid;
per step 4 generation samples (32 prompt tokens + [IMG] + 64 queries) and 4 understanding samples
(128 tokens, the last 64 labelled). fp32 on the CPU, bf16 parameters on CUDA (both sides).
Each side runs in its own subprocess, so its peak memory is its own: CUDA max_memory_allocated, or
on the CPU the peak resident set (which includes the process's imports and weights).

    python benchmarks/bench_training.py [--steps 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import machine_info  # noqa: E402

from blip3o_fast.models.blip3o import BLIP3oNetwork  # noqa: E402
from blip3o_fast.models.config import BLIP3oConfig, DiTConfig, TextConfig  # noqa: E402
from blip3o_fast.training.batches import IGNORE, TrainBatch  # noqa: E402
from blip3o_fast.training.model import TrainingModule  # noqa: E402
from blip3o_fast.tokenizer import TokenIds  # noqa: E402

TEXT = dict(arch="llama3", vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=4, rms_norm_eps=1e-5, rope_theta=500000.0,
            attention_bias=False, tie_word_embeddings=False)
DIT = dict(hidden_size=512, num_layers=4, num_attention_heads=8, num_kv_heads=8, in_channels=256, sample_size=8,
           patch_size=1, caption_dim=512)
GEN, UND, PROMPT, UND_LEN, LABELLED, N_QUERY = 4, 4, 32, 128, 64, 64
PAD, IMG = 0, 1
LOSS_TOLERANCE = 1e-3


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per side (median)")
    ap.add_argument("--json", help="write machine, configuration and rows to this path")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--side", choices=["ours", "reference"], help=argparse.SUPPRESS)  # a child process
    return ap.parse_args()


def build(device: torch.device, dtype: torch.dtype):
    """The reference modules (random, seed 0) and our network holding copies of the same weights."""
    from diffusers.models.embeddings import PixArtAlphaTextProjection, get_2d_rotary_pos_embed_lumina
    from diffusers.models.transformers.lumina_nextdit2d import LuminaNextDiT2DModel
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = BLIP3oConfig(backbone="llama3", text=TextConfig(**TEXT), vision=None, dit=DiTConfig(**DIT), n_query=N_QUERY)
    torch.manual_seed(0)
    t = cfg.text
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads, rms_norm_eps=t.rms_norm_eps, rope_theta=t.rope_theta,
        tie_word_embeddings=False, attn_implementation="sdpa",
    ))
    d = cfg.dit
    projection = PixArtAlphaTextProjection(d.caption_dim, d.hidden_size, act_fn="gelu_tanh")
    lumina = LuminaNextDiT2DModel(
        sample_size=d.sample_size, patch_size=d.patch_size, in_channels=d.in_channels, hidden_size=d.hidden_size,
        num_layers=d.num_layers, num_attention_heads=d.num_attention_heads, num_kv_heads=d.num_kv_heads,
        multiple_of=d.multiple_of, norm_eps=d.norm_eps, learn_sigma=False, qk_norm=True,
        cross_attention_dim=d.hidden_size,
    )
    with torch.no_grad():  # zero at init: randomise so the cross-attention path counts
        for layer in lumina.layers:
            layer.gate.normal_(0, 0.5)
    queries = torch.randn(1, N_QUERY, t.hidden_size)
    net = BLIP3oNetwork(cfg)
    state = dict(hf.state_dict())
    state["model.latent_queries"] = queries
    state.update({f"model.dit.model.caption_projection.{k}": v for k, v in projection.state_dict().items()})
    state.update({f"model.dit.model.{k}": v for k, v in lumina.state_dict().items() if k != "pad_token"})
    net.load_state_dict(state, strict=True)
    rope = get_2d_rotary_pos_embed_lumina(d.head_dim, 384, 384)
    ref = torch.nn.ModuleDict({"hf": hf, "projection": projection, "lumina": lumina})
    ref.queries = torch.nn.Parameter(queries.clone())
    return net.to(device, dtype), ref.to(device, dtype), rope


def inputs(device: torch.device):
    """Token ids, labels, CLIP-like targets and the flow draws, the same for both sides."""
    g = torch.Generator().manual_seed(1)
    gen_ids = torch.cat([torch.randint(2, TEXT["vocab_size"], (GEN, PROMPT), generator=g),
                         torch.full((GEN, 1), IMG)], dim=1)
    und_ids = torch.randint(2, TEXT["vocab_size"], (UND, UND_LEN), generator=g)
    labels = und_ids.clone()
    labels[:, : UND_LEN - LABELLED] = IGNORE
    targets = torch.randn(GEN, N_QUERY, DIT["in_channels"], generator=g)
    noise = torch.randn(GEN, N_QUERY, DIT["in_channels"], generator=g)
    sigma = torch.rand(GEN, generator=g)
    keep = torch.tensor([True, True, False, True])
    return {k: v.to(device) for k, v in dict(gen_ids=gen_ids, und_ids=und_ids, labels=labels, targets=targets,
                                              noise=noise, sigma=sigma, keep=keep).items()}


def our_batch(x: dict) -> TrainBatch:
    """Generation rows left-padded to the understanding length, then the understanding rows."""
    device = x["gen_ids"].device
    total = UND_LEN
    gen_len = PROMPT + 1 + N_QUERY
    ids = torch.full((GEN + UND, total), PAD, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    ids[:GEN, total - gen_len: total - N_QUERY] = x["gen_ids"]
    mask[:GEN, total - gen_len:] = 1
    ids[GEN:], mask[GEN:] = x["und_ids"], 1
    labels = torch.full_like(ids, IGNORE)
    labels[GEN:] = x["labels"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return TrainBatch([str(i) for i in range(GEN + UND)], ids, mask, positions, labels,
                      torch.ones(GEN + UND, device=device), GEN, None, None, None, x["targets"], x["sigma"],
                      x["keep"], x["noise"])


def grid(tokens: torch.Tensor) -> torch.Tensor:
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], 8, 8)


def reference_loss(ref, rope, x: dict, dtype: torch.dtype) -> torch.Tensor:
    hf = ref["hf"]
    embeds = hf.model.embed_tokens(x["gen_ids"])
    h = hf.model(inputs_embeds=torch.cat([embeds, ref.queries.expand(GEN, -1, -1)], dim=1)).last_hidden_state
    cond = h[:, -N_QUERY:] * x["keep"].to(h.dtype)[:, None, None]
    x0, noise, s = grid(x["targets"]), grid(x["noise"]), x["sigma"].view(-1, 1, 1, 1)
    x_t = ((1 - s) * x0 + s * noise).to(dtype)
    mask = torch.ones(cond.shape[:2], dtype=torch.long, device=cond.device)
    pred = ref["lumina"](x_t, x["sigma"] * 1000, ref["projection"](cond), mask, rope.to(x_t.device),
                         cross_attention_kwargs={}, return_dict=False)[0]
    flow = F.mse_loss(pred.float(), (noise - x0).float())
    ce = hf(input_ids=x["und_ids"], labels=x["labels"]).loss  # full fp32 logits
    return flow + ce


def run_side(side: str, device: torch.device, steps: int) -> dict:
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    net, ref, rope = build(device, dtype)
    x = inputs(device)
    ids = TokenIds(img=IMG, query=None, image_pad=None, vision_start=None, vision_end=None, pad=PAD, eos=(2,))
    if side == "ours":
        module = TrainingModule(net, ids, "clip_flow")
        del ref
        batch = our_batch(x)
        text_tokens = int((batch.labels[:, 1:] != IGNORE).sum())

        def loss_fn():
            return module(batch, 1.0 / GEN, 1.0 / text_tokens)[0]
    else:
        module = ref
        del net

        def loss_fn():
            return reference_loss(ref, rope, x, dtype)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-5)

    def step() -> float:
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    first = step()  # warm-up, and the loss both sides must agree on
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"side": side, "first_loss": first, "step_ms": step_s * 1e3, "samples_per_s": (GEN + UND) / step_s,
            "peak_bytes": peak, "peak_kind": "cuda_max_allocated" if device.type == "cuda" else "cpu_max_rss"}


def main() -> int:
    args = parse_args()
    device = torch.device(args.device)
    if args.side:
        print(json.dumps(run_side(args.side, device, args.steps)))
        return 0
    rows = []
    for side in ("reference", "ours"):
        cmd = [sys.executable, __file__, "--side", side, "--steps", str(args.steps), "--device", args.device]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    ref, ours = rows
    print(f"device {device} ({machine_info(device)['gpu'] or machine_info(device)['cpu']}), "
          f"{GEN} generation + {UND} understanding samples per step, {args.steps} timed steps")
    print(f"{'side':<10} {'first loss':>12} {'step ms':>10} {'samples/s':>10} {'peak MiB':>10} {'speed-up':>9}")
    for r in rows:
        print(f"{r['side']:<10} {r['first_loss']:>12.6f} {r['step_ms']:>10.1f} {r['samples_per_s']:>10.2f} "
              f"{r['peak_bytes'] / 2**20:>10.1f} {ref['step_ms'] / r['step_ms']:>8.2f}x")
    diff = abs(ours["first_loss"] - ref["first_loss"]) / abs(ref["first_loss"])
    tolerance = LOSS_TOLERANCE if device.type == "cpu" else 2e-2
    print(f"first-step loss difference {diff:.2e} (tolerance {tolerance:.0e}); peak memory: {ours['peak_kind']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine_info(device), "text": TEXT, "dit": DIT,
                                               "rows": rows, "loss_rel_diff": diff}, indent=2))
    return 0 if diff <= tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
