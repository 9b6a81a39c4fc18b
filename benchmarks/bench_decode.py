"""AR decoding end to end: our paged-KV engine vs transformers generate on the same random weights.

The fixed "bench LLM" has Qwen2.5-0.5B's text shape (24 layers, hidden 896, 14 heads, 2 KV heads,
FFN 4864, vocab 151936, tied embeddings, q/k/v biases); prompt 64 tokens, 64 new tokens (eos
ignored), batch 1, 4 and 16, fp32 and bf16. Per case: time to first token (the batch's prefill
plus its first sampled token), decode tokens/s over the remaining 63 steps, and the achieved GB/s
of a decode step (weights + the KV cache read by that step, over the step time) against this
machine's memcpy bandwidth measured in the same run. transformers runs Qwen2ForCausalLM.generate
(greedy) with its dynamic cache and its static cache: both are timed at batch 1 and the faster is
used for every batch of that dtype (--hf-cache forces one). Its TTFT is generate(max_new_tokens=1),
its per-token decode time (generate(64) - generate(1)) / 63.

    python benchmarks/bench_decode.py [--json out.json] [--dtypes fp32,bf16] [--batches 1,4,16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import machine_info, measure_peaks  # noqa: E402

from blip3o_fast.engine.engine import Engine  # noqa: E402
from blip3o_fast.engine.paged_kv_cache import PagedKVCache  # noqa: E402
from blip3o_fast.models.causal_lm import CausalLM  # noqa: E402
from blip3o_fast.models.config import TextConfig  # noqa: E402

SHAPE = dict(layers=24, hidden=896, heads=14, kv_heads=2, ffn=4864, vocab=151936, tied=True, rope_theta=1e6)
PROMPT, NEW, BLOCK = 64, 64, 16
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write machine, peaks, configuration and rows to this path")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per case (median)")
    ap.add_argument("--hf-cache", choices=["auto", "dynamic", "static", "none"], default="auto",
                    help="transformers cache: auto = the faster at batch 1; none skips transformers")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return ap.parse_args()


def build(device: torch.device):
    """transformers' Qwen2ForCausalLM with random weights, and our CausalLM sharing its tensors."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    s = SHAPE
    hf_cfg = Qwen2Config(
        vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["ffn"], num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], tie_word_embeddings=s["tied"],
        rope_parameters={"rope_type": "default", "rope_theta": s["rope_theta"]}, max_position_embeddings=32768,
        rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=None, pad_token_id=0,
    )
    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(hf_cfg).eval().to(device)
    head_dim = s["hidden"] // s["heads"]
    # Text-only M-RoPE is plain 1-D RoPE, so the Qwen2.5-VL decoder computes exactly Qwen2's function.
    cfg = TextConfig(
        arch="qwen2_5_vl", vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["ffn"],
        num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
        rms_norm_eps=1e-6, rope_theta=s["rope_theta"], mrope_section=[head_dim // 8, 3 * head_dim // 16,
        3 * head_dim // 16], attention_bias=True, tie_word_embeddings=s["tied"],
    )
    with torch.device("meta"):
        ours = CausalLM(cfg)
    ours.load_state_dict(hf.state_dict(), strict=True, assign=True)
    ours.lm_head.weight = ours.model.embed_tokens.weight
    return hf, ours.eval()


def weight_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def run_engine(lm: CausalLM, prompts: torch.Tensor) -> tuple[float, float, list[list[int]]]:
    """(time to first token s, decode s for the other NEW-1 steps, tokens) for one batch."""
    b = prompts.shape[0]
    per_block = PagedKVCache.bytes_per_block(SHAPE["layers"], SHAPE["kv_heads"], SHAPE["hidden"] // SHAPE["heads"],
                                             BLOCK, lm.lm_head.weight.dtype)
    blocks = -(-(PROMPT + NEW - 1) // BLOCK)
    eng = Engine(lm, kv_cache_bytes=b * blocks * per_block, block_size=BLOCK, max_batch_size=b)
    for i, p in enumerate(prompts.tolist()):
        eng.add_request(i, p, max_new_tokens=NEW, eos_token_ids=[])
    tokens: list[list[int]] = [[] for _ in range(b)]
    sync(lm.lm_head.weight.device)
    t0 = time.perf_counter()
    steps = 0
    while eng.has_unfinished():
        for out in eng.step():
            tokens[out.request_id] += out.token_ids
        sync(lm.lm_head.weight.device)
        steps += 1
        if steps == 1:
            t1 = time.perf_counter()
    t2 = time.perf_counter()
    assert steps == NEW and all(len(t) == NEW for t in tokens), (steps, [len(t) for t in tokens])
    return t1 - t0, t2 - t1, tokens


def run_hf(hf, prompts: torch.Tensor, new: int, cache: str) -> tuple[float, list[list[int]]]:
    kw = {"cache_implementation": "static"} if cache == "static" else {}
    sync(prompts.device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new, min_new_tokens=new,
                          do_sample=False, pad_token_id=0, **kw)
    sync(prompts.device)
    return time.perf_counter() - t0, out[:, PROMPT:].tolist()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_of(fn, repeats: int):
    results = [fn() for _ in range(repeats)]
    keys = [r[0] if isinstance(r, tuple) else r for r in results]
    return results[keys.index(statistics.median_low(keys))]


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    machine = machine_info(device)
    peaks = measure_peaks(device, warmup=2, repeats=5)
    hf32, ours32 = build(device)
    kv_per_token = 2 * SHAPE["layers"] * SHAPE["kv_heads"] * (SHAPE["hidden"] // SHAPE["heads"])
    # Decode step s (0-based, after the first token) attends over PROMPT + s + 1 cached tokens.
    mean_ctx = statistics.mean(PROMPT + s + 1 for s in range(NEW - 1))
    rows = []
    gen = torch.Generator().manual_seed(0)
    for name in args.dtypes.split(","):
        dtype = DTYPES[name]
        hf, ours = (hf32, ours32) if dtype == torch.float32 else build_cast(hf32, ours32, dtype)
        elem = torch.empty((), dtype=dtype).element_size()
        wbytes = weight_bytes(ours)
        warm = torch.randint(100, SHAPE["vocab"], (1, PROMPT), generator=gen).to(device)
        run_engine(ours, warm)  # first-call costs (allocator, thread pools) out of the timings
        hf_cache = None if args.hf_cache == "none" else args.hf_cache
        for batch in (int(b) for b in args.batches.split(",")):
            prompts = torch.randint(100, SHAPE["vocab"], (batch, PROMPT), generator=gen).to(device)
            ttft, decode, tokens = median_of(lambda: run_engine(ours, prompts), args.repeats)
            step_s = decode / (NEW - 1)
            nbytes = wbytes + batch * mean_ctx * kv_per_token * elem
            row = dict(dtype=name, batch=batch, ttft_ms=1e3 * ttft, decode_ms_per_step=1e3 * step_s,
                       decode_tok_s=batch / step_s, gb_s=nbytes / step_s / 1e9,
                       frac_memcpy_peak=nbytes / step_s / 1e9 / peaks["memcpy_gb_per_s"])
            if hf_cache is not None:
                if hf_cache == "auto":
                    times = {c: run_hf(hf, prompts, NEW, c)[0] for c in ("dynamic", "static")}
                    hf_cache = min(times, key=times.get)
                    print(f"# transformers {name} batch {batch}: generate({NEW}) dynamic {times['dynamic']:.2f} s, "
                          f"static {times['static']:.2f} s -> {hf_cache}", flush=True)
                hf_first = median_of(lambda: run_hf(hf, prompts, 1, hf_cache)[0], args.repeats)
                hf_total, hf_tokens = median_of(lambda: run_hf(hf, prompts, NEW, hf_cache), args.repeats)
                hf_step = (hf_total - hf_first) / (NEW - 1)
                row.update(hf_cache=hf_cache, hf_ttft_ms=1e3 * hf_first, hf_decode_tok_s=batch / hf_step,
                           ttft_speedup=hf_first / ttft, decode_speedup=hf_step / step_s,
                           same_tokens=sum(a == b for a, b in zip(tokens, hf_tokens)))
            rows.append(row)
            print_row(row, header=len(rows) == 1, peaks=peaks, machine=machine)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bench": "decode", "machine": machine, "peaks": peaks,
                       "config": {**SHAPE, "prompt": PROMPT, "new_tokens": NEW, "block_size": BLOCK,
                                  "weight_bytes_fp32": weight_bytes(ours32)},
                       "results": rows}, f, indent=1)
        print(f"# wrote {args.json}")


def build_cast(hf32, ours32, dtype):
    """Copies of both models in dtype that again share one set of tensors."""
    import copy

    hf = copy.deepcopy(hf32).to(dtype)
    with torch.device("meta"):
        ours = CausalLM(ours32.text_cfg)
    ours.load_state_dict(hf.state_dict(), strict=True, assign=True)
    ours.lm_head.weight = ours.model.embed_tokens.weight
    return hf, ours.eval()


def print_row(row: dict, header: bool, peaks: dict, machine: dict) -> None:
    if header:
        print(f"# decode on {machine['gpu'] or machine['cpu']} ({machine['cores']} cores, torch {machine['torch']}, "
              f"{machine['torch_threads']} threads); memcpy peak {peaks['memcpy_gb_per_s']:.1f} GB/s; "
              f"bench LLM {SHAPE}, prompt {PROMPT}, new {NEW}")
        print(f"{'dtype':<5} {'batch':>5} {'TTFT ms':>9} {'ms/step':>8} {'tok/s':>7} {'GB/s':>6} {'%peak':>6} | "
              f"{'HF cache':<8} {'HF TTFT':>8} {'HF tok/s':>8} {'TTFT x':>7} {'decode x':>8} {'same':>4}")
    line = (f"{row['dtype']:<5} {row['batch']:>5} {row['ttft_ms']:>9.1f} {row['decode_ms_per_step']:>8.1f} "
            f"{row['decode_tok_s']:>7.2f} {row['gb_s']:>6.2f} {100 * row['frac_memcpy_peak']:>5.0f}% |")
    if "hf_cache" in row:
        line += (f" {row['hf_cache']:<8} {row['hf_ttft_ms']:>8.1f} {row['hf_decode_tok_s']:>8.2f} "
                 f"{row['ttft_speedup']:>6.2f}x {row['decode_speedup']:>7.2f}x {row['same_tokens']:>2}/{row['batch']}")
    print(line, flush=True)


if __name__ == "__main__":
    main()
