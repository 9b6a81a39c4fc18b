"""GPU static report: compile every GPU kernel for sm_80 and sm_90 with no GPU present and report
registers, spills, stack and shared memory per kernel and production config.

Triton kernels in kernels/ are compiled with triton.compile(ASTSource(...), target=GPUTarget(...))
at the block sizes and warp counts their launchers pick for the production shapes below, then the
ptxas bundled with Triton reports resources (-v). The sm_90 PTX is also scanned for wgmma, TMA
(cp.async.bulk) and 16-byte vector loads (ld.global.v4). CUDA sources in csrc/cuda/ are compiled
with nvcc -Xptxas -v. Exit status 1 on any compile error or any spill.

    python benchmarks/gpu_static_report.py [--json out.json] [--jobs 2]
"""

from __future__ import annotations

import os

# Compiling for a GPU target needs the real JIT, not the CPU interpreter; set before triton loads.
os.environ.pop("TRITON_INTERPRET", None)
# Triton 3.9's launch-time default, made explicit so it does not warn once per worker.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import argparse  # noqa: E402
import concurrent.futures as cf  # noqa: E402
import glob  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = (80, 90)

# Production shapes (DESIGN.md): LLM hidden 2048 (3B) / 3584 (7B) over 8192 rows; DiT hidden 1792;
# RoPE head_dim 64 / 128 with 14-28 heads; the 7B MLP's 18944-wide activation.
ROWS = 8192
LLM_N = (2048, 3584)
DIT_N = 1792
ROPE = ((28, 128), (14, 64))  # (heads, head_dim)
SWIGLU_N = ROWS * 18944
DTYPES = ("fp32", "bf16")
SMS = 132  # H100 SXM; sizes the scratch the backward reductions sum over


@dataclass
class Config:
    module: str
    kernel: str
    label: str
    signature: dict
    constexprs: dict
    num_warps: int
    divisible: list = field(default_factory=list)  # args the runtime would specialise as 16-divisible
    options: dict = field(default_factory=dict)  # extra compile options the launcher passes (enable_fp_fusion)


@dataclass
class Result:
    kernel: str
    label: str
    target: str
    num_warps: int = 0
    registers: int = -1
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    shared: int = 0
    wgmma: bool = False
    tma: bool = False
    v4_loads: bool = False
    error: str = ""


def _sig(names_types: dict, constexprs: dict) -> dict:
    sig = dict(names_types)
    sig.update({k: "constexpr" for k in constexprs})
    return sig


# DiT attention (kernels/dit_attention.py): head dims 64 and 128, the DiT's 64 tokens and a 4096-token
# case, self-attention (k LayerNorm + RoPE) everywhere, cross-attention (mask, gate, residual) at 64 tokens.
DIT_ATTN_HEADS = 28
DIT_ATTN_D = (64, 128)
DIT_ATTN_T = (64, 4096)


def _dit_attention_configs() -> list[Config]:
    import torch

    from blip3o_fast.kernels import dit_attention as da
    from blip3o_fast.kernels import rms_norm as rn

    ptrs = ("q_ptr", "k_ptr", "v_ptr", "qw_ptr", "qb_ptr", "kw_ptr", "kb_ptr", "cos_ptr", "sin_ptr", "qstat_ptr",
            "kstat_ptr", "kmask_ptr", "gate_ptr")
    out: list[Config] = []
    for dt in DTYPES:
        p = f"*{dt}"
        tdt = torch.float32 if dt == "fp32" else torch.bfloat16
        types = {n: p for n in ptrs}
        types.update(cos_ptr="*fp32", sin_ptr="*fp32", qstat_ptr="*fp32", kstat_ptr="*fp32", kmask_ptr="*u8")
        for d in DIT_ATTN_D:
            for t in DIT_ATTN_T:
                for cross in ((False, True) if t == 64 else (False,)):
                    flags = {"K_NORM": not cross, "ROPE_K": not cross, "HAS_MASK": cross, "HAS_GATE": cross}
                    label = f"{dt} D={d} T={t} {'cross' if cross else 'self'}"
                    div = [*ptrs, "Tq", "Tk"]
                    bm, bn, warps = da.attention_blocks("fwd", t, t, d, tdt)
                    ce = {"D": d, "BLOCK_M": bm, "BLOCK_N": bn, **flags, "HAS_RES": cross, "WRITE_O": True,
                          "UPCAST": False, "F32_OPERANDS": False}
                    sig = {**types, "res_ptr": p, "out_ptr": p, "lse_ptr": "*fp32", "o_ptr": p, "Tq": "i32",
                           "Tk": "i32", "Hq": "i32", "Hkv": "i32", "GROUP": "i32", "qk_scale": "fp32"}
                    out.append(Config("dit_attention", "dit_attention_fwd_kernel", label, _sig(sig, ce), ce, warps,
                                      div + ["res_ptr", "out_ptr", "lse_ptr", "o_ptr"]))
                    # backward: q, k arrive prepared (normalised, rotated) by dit_attention_prep_kernel
                    bwd = {"qs_ptr": p, "kn_ptr": p, "v_ptr": p, "cos_ptr": "*fp32", "sin_ptr": "*fp32",
                           "kmask_ptr": "*u8", "gate_ptr": p, "dout_ptr": p, "lse_ptr": "*fp32", "delta_ptr": "*fp32"}
                    bdiv = [*bwd, "Tq", "Tk"]
                    bflags = {"HAS_MASK": cross, "HAS_GATE": cross, "UPCAST": False}
                    bm, bn, warps = da.attention_blocks("dq", t, t, d, tdt)
                    ce = {"D": d, "BLOCK_M": bm, "BLOCK_N": bn, **bflags}
                    sig = {**bwd, "gq_ptr": "*fp32", "Tq": "i32", "Tk": "i32", "Hq": "i32", "Hkv": "i32",
                           "GROUP": "i32", "sm_scale": "fp32"}
                    out.append(Config("dit_attention", "dit_attention_bwd_dq_kernel", label, _sig(sig, ce), ce, warps,
                                      bdiv + ["gq_ptr"]))
                    bm, bn, warps = da.attention_blocks("dkdv", t, t, d, tdt)
                    ce = {"D": d, "BLOCK_M": bm, "BLOCK_N": bn, "ROPE_K": not cross, **bflags}
                    sig = {**bwd, "gk_ptr": "*fp32" if not cross else p, "dv_ptr": p, "Tq": "i32", "Tk": "i32",
                           "Hq": "i32", "Hkv": "i32", "GROUP": "i32"}
                    out.append(Config("dit_attention", "dit_attention_bwd_dkdv_kernel", label, _sig(sig, ce), ce,
                                      warps, bdiv + ["gk_ptr", "dv_ptr"]))
            n = DIT_ATTN_HEADS * d
            bm, bn = rn.row_blocks(n)
            ce = {"BLOCK_M": bm, "BLOCK_N": bn}
            out.append(Config("dit_attention", "dit_attention_stats_kernel", f"{dt} N={n}", _sig(
                {"x_ptr": p, "stat_ptr": "*fp32", "rows": "i32", "N": "i32", "eps": "fp32"}, ce), ce,
                rn.num_warps_for(bm * bn), ["x_ptr", "stat_ptr", "rows", "N"]))
            out.append(Config("dit_attention", "dit_attention_ln_bwd_kernel", f"{dt} N={n}", _sig(
                {"gy_ptr": "*fp32", "x_ptr": p, "stat_ptr": "*fp32", "w_ptr": p, "dx_ptr": p, "dw_part_ptr": "*fp32",
                 "db_part_ptr": "*fp32", "rows": "i32", "N": "i32"}, ce), ce, rn.num_warps_for(bm * bn),
                ["gy_ptr", "x_ptr", "stat_ptr", "w_ptr", "dx_ptr", "dw_part_ptr", "db_part_ptr", "rows", "N"]))
            bt = da.pre_block_t(max(DIT_ATTN_T), d)
            ce = {"D": d, "BLOCK_T": bt, "HAS_GATE": True}
            out.append(Config("dit_attention", "dit_attention_bwd_pre_kernel", f"{dt} D={d}", _sig(
                {"dout_ptr": p, "o_ptr": p, "gate_ptr": p, "delta_ptr": "*fp32", "dgate_ptr": "*fp32", "B": "i32",
                 "Tq": "i32", "Hq": "i32"}, ce), ce, 4, ["dout_ptr", "o_ptr", "gate_ptr", "delta_ptr", "Tq"]))
            bt = da.prep_block_t(1 << 20, d)
            ce = {"D": d, "BLOCK_T": bt, "NORM": True, "ROPE": True}
            out.append(Config("dit_attention", "dit_attention_prep_kernel", f"{dt} D={d}", _sig(
                {"x_ptr": p, "stat_ptr": "*fp32", "w_ptr": p, "b_ptr": p, "cos_ptr": "*fp32", "sin_ptr": "*fp32",
                 "out_ptr": p, "tokens": "i32", "H": "i32", "scale": "fp32"}, ce), ce, rn.num_warps_for(bt * d),
                ["x_ptr", "stat_ptr", "w_ptr", "b_ptr", "cos_ptr", "sin_ptr", "out_ptr", "tokens"]))
    return out


def triton_configs() -> list[Config]:
    """Configs built from the launchers' own block/warp choices, so the report sees what runs."""
    from blip3o_fast.kernels import rms_norm as rn
    from blip3o_fast.kernels import rope as rp
    from blip3o_fast.kernels import swiglu as sw

    out: list[Config] = []
    for dt in DTYPES:
        p = f"*{dt}"
        for n in LLM_N:
            bm, bn = rn.row_blocks(n)
            out += _norm_configs(dt, n, {"BLOCK_M": bm, "BLOCK_N": bn}, f"{dt} N={n}", residual=False)
        bm, bn = rn.row_blocks(DIT_N)
        warps = rn.num_warps_for(bm * bn)
        ce = {"BLOCK_M": bm, "BLOCK_N": bn}
        out.append(Config("rms_norm_modulate", "rms_norm_modulate_fwd_kernel", f"{dt} N={DIT_N}", _sig(
            {"x_ptr": p, "w_ptr": p, "scale_ptr": p, "out_ptr": p, "rstd_ptr": "*fp32", "rows": "i32", "T": "i32",
             "N": "i32", "eps": "fp32"}, ce), ce, warps,
            ["x_ptr", "w_ptr", "scale_ptr", "out_ptr", "rstd_ptr", "rows", "T", "N"]))
        out.append(Config("rms_norm_modulate", "rms_norm_modulate_bwd_kernel", f"{dt} N={DIT_N}", _sig(
            {"dy_ptr": p, "x_ptr": p, "w_ptr": p, "scale_ptr": p, "rstd_ptr": "*fp32", "dx_ptr": p,
             "dw_part_ptr": "*fp32", "ds_part_ptr": "*fp32", "T": "i32", "N": "i32"}, ce), ce, warps,
            ["dy_ptr", "x_ptr", "w_ptr", "scale_ptr", "rstd_ptr", "dx_ptr", "dw_part_ptr", "ds_part_ptr", "T", "N"]))
        for heads, d in ROPE:
            br, bh = rp.rope_blocks(d)
            for inter in (False, True):
                for inverse in (False, True):
                    ce = {"BLOCK_R": br, "BLOCK_HALF": bh, "INTERLEAVED": inter, "INVERSE": inverse}
                    label = f"{dt} H={heads} D={d} {'inter' if inter else 'half'}{' inv' if inverse else ''}"
                    out.append(Config("rope", "rope_apply_kernel", label, _sig(
                        {"x_ptr": p, "cos_ptr": "*fp32", "sin_ptr": "*fp32", "out_ptr": p, "rows": "i32",
                         "H": "i32", "D": "i32"}, ce), ce, rn.num_warps_for(2 * br * bh),
                        ["x_ptr", "cos_ptr", "sin_ptr", "out_ptr", "rows", "D"]))
        block = sw.swiglu_block(SWIGLU_N)
        ce = {"BLOCK": block}
        out.append(Config("swiglu", "swiglu_fwd_kernel", f"{dt} n={SWIGLU_N}", _sig(
            {"gate_ptr": p, "up_ptr": p, "out_ptr": p, "n": "i32"}, ce), ce, rn.num_warps_for(block),
            ["gate_ptr", "up_ptr", "out_ptr", "n"]))
        out.append(Config("swiglu", "swiglu_bwd_kernel", f"{dt} n={SWIGLU_N}", _sig(
            {"dy_ptr": p, "gate_ptr": p, "up_ptr": p, "dgate_ptr": p, "dup_ptr": p, "n": "i32"}, ce), ce,
            rn.num_warps_for(block), ["dy_ptr", "gate_ptr", "up_ptr", "dgate_ptr", "dup_ptr", "n"]))
    # The deterministic reduction behind every backward's dweight/dscale (fp32 partials).
    for n, parts in ((LLM_N[-1], 2 * SMS), (DIT_N, 2 * SMS)):
        bp, bn = rn.partial_blocks(parts, n)
        ce = {"BLOCK_P": bp, "BLOCK_N": bn}
        out.append(Config("rms_norm", "sum_partials_kernel", f"fp32 P={parts} N={n}", _sig(
            {"part_ptr": "*fp32", "out_ptr": "*fp32", "P": "i32", "N": "i32"}, ce), ce, rn.num_warps_for(bp * bn),
            ["part_ptr", "out_ptr", "N"]))
    out += _dit_attention_configs()
    out += _gated_residual_norm_configs() + _flow_step_configs()
    out += _varlen_prefill_attention_configs() + _rope_kv_cache_write_configs()
    out += _paged_decode_attention_configs()
    out += _linear_cross_entropy_configs()
    out += _residual_rms_norm_configs() + _sample_tokens_configs()
    out += _decode_linear_configs()
    return out


# AR engine prefill (kernels/varlen_prefill_attention.py): Qwen2.5 heads of 64 (0.5B, 14/2) and 128 (3B/7B),
# prompts up to 64 tokens and longer ones (the launcher's two tile sizes).
VARLEN_HEAD_DIMS = (64, 128)
VARLEN_MAX_SEQLEN = (64, 2048)


def _varlen_prefill_attention_configs() -> list[Config]:
    import torch

    from blip3o_fast.kernels import varlen_prefill_attention as vpa

    out: list[Config] = []
    for dt in DTYPES:
        p = f"*{dt}"
        for d in VARLEN_HEAD_DIMS:
            for max_len in VARLEN_MAX_SEQLEN:
                bm, bn, warps = vpa.prefill_blocks(d, torch.float32 if dt == "fp32" else torch.bfloat16, max_len)
                ce = {"D": d, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_S": vpa.seq_block(32), "UPCAST": False,
                      "F32_OPERANDS": False}
                sig = {"q_ptr": p, "k_ptr": p, "v_ptr": p, "cu_ptr": "*i32", "out_ptr": p, "S": "i32", "N": "i32",
                       "H": "i32", "KVH": "i32", "GROUP": "i32", "qk_scale": "fp32"}
                out.append(Config("varlen_prefill_attention", "varlen_prefill_attention_fwd_kernel",
                                  f"{dt} D={d} max_len={max_len}", _sig(sig, ce), ce, warps,
                                  ["q_ptr", "k_ptr", "v_ptr", "cu_ptr", "out_ptr"]))
    return out


# RoPE + KV-cache write (kernels/rope_kv_cache_write.py): Qwen2.5 0.5B (14/2, D 64), 3B (16/2, D 128) and
# 7B (28/4, D 128); one program per token, so T = 1 .. 8192 share one config.
ROPE_KV_HEADS = ((14, 2, 64), (16, 2, 128), (28, 4, 128))  # (heads, kv heads, head_dim)


def _rope_kv_cache_write_configs() -> list[Config]:
    from blip3o_fast.kernels import rope_kv_cache_write as rkw

    out: list[Config] = []
    for dt in DTYPES:
        p = f"*{dt}"
        for heads, kv_heads, d in ROPE_KV_HEADS:
            bhalf, bh, bkvh, warps = rkw.rope_kv_cache_write_blocks(heads, kv_heads, d)
            ce = {"HALF": d // 2, "BLOCK_HALF": bhalf, "BLOCK_H": bh, "BLOCK_KVH": bkvh}
            ptrs = ["q_ptr", "k_ptr", "v_ptr", "kc_ptr", "vc_ptr", "qo_ptr", "ko_ptr"]
            sig = {k: p for k in ptrs} | {"cos_ptr": "*fp32", "sin_ptr": "*fp32", "slot_ptr": "*i64",
                                          "num_slots": "i64", "H": "i32", "KVH": "i32"}
            out.append(Config("rope_kv_cache_write", "rope_kv_cache_write_kernel",
                              f"{dt} H={heads}/{kv_heads} D={d} T=1..8192", _sig(sig, ce), ce, warps,
                              ptrs + ["cos_ptr", "sin_ptr", "slot_ptr"]))
    return out


def _gated_residual_norm_configs() -> list[Config]:
    """The DiT block epilogue at the DiT (1792) and 7B (3584) widths; the launchers' tiles are the same
    for the CFG batch's 128 rows and for 8192."""
    from blip3o_fast.kernels import gated_residual_norm as grn
    from blip3o_fast.kernels import rms_norm as rn

    out: list[Config] = []
    for dt in DTYPES:
        p = f"*{dt}"
        for n in (DIT_N, LLM_N[-1]):
            for has_next in (True, False):
                bm, bn = grn.fwd_blocks(n, ROWS)
                assert (bm, bn) == grn.fwd_blocks(n, 128)
                ce = {"HAS_NEXT": has_next, "BLOCK_M": bm, "BLOCK_N": bn}
                label = f"{dt} N={n} rows=128,{ROWS}{' next' if has_next else ''}"
                ptrs = ["x_ptr", "y_ptr", "wy_ptr", "gate_ptr", "wn_ptr", "sn_ptr", "xo_ptr", "h_ptr"]
                sig = {k: p for k in ptrs} | {"ry_ptr": "*fp32", "rx_ptr": "*fp32", "rows": "i32", "T": "i32",
                                              "N": "i32", "eps": "fp32"}
                out.append(Config("gated_residual_norm", "gated_residual_norm_fwd_kernel", label, _sig(sig, ce), ce,
                                  rn.num_warps_for(bm * bn), ptrs + ["ry_ptr", "rx_ptr", "rows", "T", "N"]))
                ptrs = ["dxo_ptr", "dh_ptr", "x_ptr", "y_ptr", "wy_ptr", "gate_ptr", "wn_ptr", "sn_ptr", "dx_ptr",
                        "dy_ptr"]
                parts = ["dwy_part_ptr", "dg_part_ptr", "dwn_part_ptr", "dsn_part_ptr"]
                sig = ({k: p for k in ptrs} | {"ry_ptr": "*fp32", "rx_ptr": "*fp32"} | {k: "*fp32" for k in parts}
                       | {"T": "i32", "N": "i32"})
                out.append(Config("gated_residual_norm", "gated_residual_norm_bwd_kernel", label, _sig(sig, ce), ce,
                                  rn.num_warps_for(bm * bn), ptrs + ["ry_ptr", "rx_ptr"] + parts + ["T", "N"]))
    return out


def _flow_step_configs() -> list[Config]:
    """The sampler update over B = 1..16 requests of 64 x 1792 latents (the block does not depend on B):
    fp32 latents with bf16 / fp32 velocities in each solver form, and the exact step in bf16 / fp32."""
    from blip3o_fast.kernels import flow_step as fs
    from blip3o_fast.kernels import rms_norm as rn

    block = fs.flow_block(64 * DIT_N)
    warps = rn.num_warps_for(block)
    label = f"B=1..16 N={64 * DIT_N}"
    out: list[Config] = []
    forms = {"euler": (False, False), "heun-p": (False, True), "heun-c": (True, False), "multistep": (True, True)}
    for xd, vd in (("fp32", "bf16"), ("fp32", "fp32"), ("bf16", "bf16")):
        for name, (prev, save) in forms.items():
            if xd == "bf16" and name != "euler":
                continue
            ce = {"GUIDED": True, "HAS_PREV": prev, "HAS_SAVE": save, "BLOCK": block}
            sig = {"x_ptr": f"*{xd}", "v_ptr": f"*{vd}", "out_ptr": f"*{xd}", "vp_ptr": "*fp32", "vs_ptr": "*fp32",
                   "total": "i32", "dt": "fp32", "g": "fp32", "c_prev": "fp32"}
            out.append(Config("flow_step", "flow_step_kernel", f"x{xd} v{vd} {name} {label}", _sig(sig, ce), ce, warps,
                              ["x_ptr", "v_ptr", "out_ptr", "vp_ptr", "vs_ptr", "total"]))
    for dt in DTYPES:
        ce = {"GUIDED": True, "BLOCK": block}
        sig = {"x_ptr": f"*{dt}", "v_ptr": f"*{dt}", "out_ptr": f"*{dt}", "total": "i32", "dt": "fp32", "g": "fp32"}
        out.append(Config("flow_step", "flow_step_exact_kernel", f"{dt} exact {label}", _sig(sig, ce), ce, warps,
                          ["x_ptr", "v_ptr", "out_ptr", "total"]))
    return out


# Paged decode attention (kernels/paged_decode_attention.py): the AR backbones' attention shapes,
# (query heads, kv heads, head dim), with the engine's 16-token blocks.
PAGED_DECODE_MODELS = {
    "Qwen2.5-0.5B": (14, 2, 64),
    "Qwen2.5-VL-3B": (16, 2, 128),
    "Qwen2.5-VL-7B": (28, 4, 128),
    "LLaMA-3-8B": (32, 8, 128),
}
PAGED_DECODE_BLOCK = 16


def _paged_decode_attention_configs() -> list[Config]:
    """The split kernel per model and dtype, split-K on (its epilogue writes partials; the one-split
    epilogue is a plain store), and the combine kernel per head dim at the most splits."""
    import torch

    from blip3o_fast.kernels import paged_decode_attention as pda
    from blip3o_fast.ops.paged_decode_attention import MAX_SPLITS

    out: list[Config] = []
    for dt in DTYPES:
        p = f"*{dt}"
        tdt = torch.float32 if dt == "fp32" else torch.bfloat16
        for name, (heads, kv_heads, d) in PAGED_DECODE_MODELS.items():
            block_n, warps = pda.split_blocks(d, tdt)
            ce = {"D": d, "BLOCK_G": pda.group_rows(heads // kv_heads), "BLOCK_N": block_n, "SPLIT": True,
                  "UPCAST": False}
            sig = {"q_ptr": p, "k_ptr": p, "v_ptr": p, "table_ptr": "*i32", "len_ptr": "*i32", "out_ptr": p,
                   "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "H": "i32", "GROUP": "i32",
                   "max_blocks": "i32", "block_size": "i32", "stride_block": "i32", "stride_token": "i32",
                   "num_splits": "i32", "qk_scale": "fp32"}
            label = f"{dt} {name} H={heads}/{kv_heads} D={d} bs={PAGED_DECODE_BLOCK}"
            out.append(Config("paged_decode_attention", "paged_decode_attention_split_kernel", label, _sig(sig, ce),
                              ce, warps, ["q_ptr", "k_ptr", "v_ptr", "table_ptr", "len_ptr", "out_ptr",
                                          "part_out_ptr", "part_lse_ptr", "block_size", "stride_block",
                                          "stride_token"]))
        for d in sorted({d for _, _, d in PAGED_DECODE_MODELS.values()}):
            ce = {"D": d, "BLOCK_S": pda.combine_block(MAX_SPLITS)}
            sig = {"part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "out_ptr": p, "num_splits": "i32"}
            out.append(Config("paged_decode_attention", "paged_decode_attention_combine_kernel",
                              f"{dt} D={d} splits<={MAX_SPLITS}", _sig(sig, ce), ce, 4,
                              ["part_out_ptr", "part_lse_ptr", "out_ptr"]))
    return out


# Fused linear + cross-entropy (kernels/linear_cross_entropy.py): the lm_head of Qwen2.5 3B / 7B (H 2048 / 3584,
# V 151936) and LLaMA 3 (V 128256). The tiles do not depend on H, V or N (all runtime arguments; H and V are
# multiples of 16, which the runtime specialises on), so one config per kernel and dtype covers them all.
LCE_H = (2048, 3584)
LCE_V = (151936, 128256)


def _linear_cross_entropy_configs() -> list[Config]:
    import torch

    from blip3o_fast.kernels import linear_cross_entropy as lce

    label_shapes = f"H={','.join(map(str, LCE_H))} V={','.join(map(str, LCE_V))}"
    out: list[Config] = []
    for dt in DTYPES:
        p = f"*{dt}"
        tdt = torch.float32 if dt == "fp32" else torch.bfloat16
        bm, bv, bk, warps = lce.lce_blocks("fwd", tdt, ROWS, LCE_H[-1], LCE_V[0])
        ce = {"BLOCK_M": bm, "BLOCK_V": bv, "BLOCK_K": bk, "UPCAST": False}
        sig = {"h_ptr": p, "w_ptr": p, "t_ptr": "*i64", "pmax_ptr": "*fp32", "psum_ptr": "*fp32", "ppick_ptr": "*fp32",
               "N": "i32", "H": "i32", "V": "i32", "V_PER_SPLIT": "i32"}
        out.append(Config("linear_cross_entropy", "linear_cross_entropy_fwd_kernel", f"{dt} {label_shapes}",
                          _sig(sig, ce), ce, warps, ["h_ptr", "w_ptr", "t_ptr", "H", "V", "V_PER_SPLIT"]))
        for kind in ("dh", "dw"):
            kernel = f"linear_cross_entropy_bwd_{kind}_kernel"
            bm, bv, bk, warps = lce.lce_blocks(kind, tdt, ROWS, LCE_H[-1], LCE_V[0])
            ce = {"BLOCK_M": bm, "BLOCK_V": bv, "BLOCK_K": bk, "UPCAST": False, "F32_OPERANDS": False}
            sig = {"dl_ptr": "*fp32", "h_ptr": p, "w_ptr": p, "t_ptr": "*i64", "lse_ptr": "*fp32", "acc_ptr": "*fp32",
                   "N": "i32", "H": "i32", "V": "i32"}
            if kind == "dw":
                sig["V0"] = "i32"
            sig["ignore_index"] = "i32"
            out.append(Config("linear_cross_entropy", kernel, f"{dt} {label_shapes}", _sig(sig, ce), ce, warps,
                              ["dl_ptr", "h_ptr", "w_ptr", "t_ptr", "lse_ptr", "acc_ptr", "H", "V"]))
    block_n, block_s = lce.combine_blocks(ROWS, 2 * SMS)  # the most splits the forward launches
    ce = {"BLOCK_N": block_n, "BLOCK_S": block_s}
    sig = {"pmax_ptr": "*fp32", "psum_ptr": "*fp32", "ppick_ptr": "*fp32", "t_ptr": "*i64", "loss_ptr": "*fp32",
           "lse_ptr": "*fp32", "N": "i32", "V": "i32", "SPLITS": "i32", "ignore_index": "i32"}
    out.append(Config("linear_cross_entropy", "linear_cross_entropy_combine_kernel", f"fp32 splits<={2 * SMS}",
                      _sig(sig, ce), ce, 4, ["pmax_ptr", "psum_ptr", "ppick_ptr", "t_ptr", "loss_ptr", "lse_ptr"]))
    return out


def _residual_rms_norm_configs() -> list[Config]:
    """The decoder's residual add + RMSNorm at the 0.5B / 3B / 7B hidden sizes, for prefill (8192 rows) and
    decode (1 row: the launcher shrinks BLOCK_M to the rows; 256 rows take the prefill tile)."""
    from blip3o_fast.kernels import rms_norm as rn

    out: list[Config] = []
    for dt in DTYPES:
        for n in (896, *LLM_N):
            bm_full, bn = rn.row_blocks(n)
            for rows in sorted({ROWS, 1}):
                bm = min(bm_full, 1 << (rows - 1).bit_length())
                label = f"{dt} N={n} rows={rows}"
                configs = _norm_configs(dt, n, {"BLOCK_M": bm, "BLOCK_N": bn}, label, residual=True)
                out += configs if rows == ROWS else configs[:1]
    return out


def _norm_configs(dt: str, n: int, blocks: dict, label: str, residual: bool) -> list[Config]:
    """kernels/rms_norm.py's forward and backward at one tile, for ops.rms_norm (residual False: the residual
    pointers are placeholders) or ops.residual_rms_norm (HAS_RESIDUAL)."""
    from blip3o_fast.kernels import rms_norm as rn

    p = f"*{dt}"
    ce = {"HAS_RESIDUAL": residual, **blocks}
    warps = rn.num_warps_for(blocks["BLOCK_M"] * blocks["BLOCK_N"])
    label = f"{label}{' +residual' if residual else ''}"
    fwd = ["x_ptr", "r_ptr", "w_ptr", "out_ptr", "s_ptr"]
    bwd = ["dy_ptr", "dres_ptr", "x_ptr", "w_ptr", "dx_ptr"]
    return [
        Config("rms_norm", "rms_norm_fwd_kernel", label, _sig(
            {k: p for k in fwd} | {"rstd_ptr": "*fp32", "rows": "i32", "N": "i32", "eps": "fp32"}, ce), ce, warps,
            fwd + ["rstd_ptr", "rows", "N"]),
        Config("rms_norm", "rms_norm_bwd_kernel", label, _sig(
            {k: p for k in bwd} | {"rstd_ptr": "*fp32", "dw_part_ptr": "*fp32", "rows": "i32", "N": "i32"}, ce), ce,
            warps, bwd + ["rstd_ptr", "dw_part_ptr", "rows", "N"]),
    ]


def _sample_tokens_configs() -> list[Config]:
    """Token sampling over the Qwen2 vocabulary (one program per row: the batch does not change the kernel),
    launched as the launcher does, with FMA contraction off (bit-exact noise)."""
    from blip3o_fast.kernels import sample_tokens as stk

    vocab = 151936
    block = stk.sample_block(vocab)
    out: list[Config] = []
    for dt in DTYPES:
        ce = {"BLOCK": block}
        sig = {"l_ptr": f"*{dt}", "temp_ptr": "*fp32", "topk_ptr": "*i32", "topp_ptr": "*fp32", "seed_ptr": "*i64",
               "ctr_ptr": "*i64", "tok_ptr": "*i64", "lp_ptr": "*fp32", "V": "i32"}
        out.append(Config("sample_tokens", "sample_tokens_kernel", f"{dt} V={vocab}", _sig(sig, ce), ce, 8,
                          ["l_ptr", "temp_ptr", "topk_ptr", "topp_ptr", "seed_ptr", "ctr_ptr", "tok_ptr", "lp_ptr",
                           "V"], {"enable_fp_fusion": False}))
    return out


# Small-M linear (kernels/decode_linear.py): every weight of the AR backbones at decode, (N, K) pairs; the
# tiles depend only on the dtype and M (1: GEMV, 16: tl.dot), N and K are runtime arguments (multiples of 16,
# which the runtime specialises on), so one config per (dtype, M, split or not) covers every pair below.
DECODE_LINEAR_SHAPES = {
    "Qwen2.5-0.5B": ((896, 896), (4864, 896), (896, 4864), (151936, 896)),
    "Qwen2.5-VL-7B": ((3584, 3584), (18944, 3584), (3584, 18944), (152064, 3584)),
    "LLaMA-3-8B": ((4096, 4096), (14336, 4096), (4096, 14336), (128256, 4096)),
}
DECODE_LINEAR_M = (1, 16)


def _decode_linear_configs() -> list[Config]:
    """The main kernel per dtype and M, with the one-split epilogue (bias, rounding) and the split-K one
    (fp32 partials), and the split reduction per dtype."""
    from blip3o_fast.kernels import decode_linear as dl

    models = ",".join(DECODE_LINEAR_SHAPES)
    out: list[Config] = []
    for dt in DTYPES:
        p = f"*{dt}"
        for m in DECODE_LINEAR_M:
            bm, bn, bk, warps = dl.decode_blocks(m, 896)
            for split in (False, True):
                ce = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "HAS_BIAS": True, "SPLIT": split, "UPCAST": False}
                sig = {"x_ptr": p, "w_ptr": p, "b_ptr": p, "out_ptr": p, "part_ptr": "*fp32", "M": "i32", "N": "i32",
                       "K": "i32", "K_PER_SPLIT": "i32"}
                label = f"{dt} M={m} {'split-K' if split else 'one split'} {models}"
                out.append(Config("decode_linear", "decode_linear_kernel", label, _sig(sig, ce), ce, warps,
                                  ["x_ptr", "w_ptr", "b_ptr", "out_ptr", "part_ptr", "N", "K", "K_PER_SPLIT"]))
        ce = {"HAS_BIAS": True, "BLOCK": dl.REDUCE_BLOCK}
        sig = {"part_ptr": "*fp32", "b_ptr": p, "out_ptr": p, "M": "i32", "N": "i32", "SPLITS": "i32"}
        out.append(Config("decode_linear", "decode_linear_reduce_kernel", f"{dt} splits<={dl.MAX_SPLITS}",
                          _sig(sig, ce), ce, 4, ["part_ptr", "b_ptr", "out_ptr", "N"]))
    return out


def _ptxas_path(cc: int) -> str:
    """The ptxas Triton itself uses for this target: it bundles two, and only the newer one reads the
    PTX version Triton emits for sm_90."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(cc).path


def parse_ptxas(text: str) -> dict[str, dict]:
    """ptxas -v output -> {function: {registers, spill_stores, spill_loads, stack[, shared]}}."""
    found: dict[str, dict] = {}
    current = None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line) or re.search(r"Function properties for (\S+)", line)
        if m:
            current = found.setdefault(m.group(1), {"registers": -1, "spill_stores": 0, "spill_loads": 0, "stack": 0})
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current["stack"], current["spill_stores"], current["spill_loads"] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["registers"] = int(m.group(1))
        m = re.search(r"(\d+) bytes smem", line)
        if m:
            current["shared"] = int(m.group(1))
    return found


def ptx_features(ptx: str) -> dict[str, bool]:
    return {
        "wgmma": "wgmma" in ptx,
        "tma": "cp.async.bulk" in ptx,
        "v4_loads": bool(re.search(r"ld\.global(\.\w+)*\.v4", ptx)),
    }


def ptx_entries(ptx: str) -> dict[str, str]:
    """Split a PTX module into {entry name: its text} so features are reported per kernel."""
    parts = re.split(r"(?=^\.(?:visible\s+)?\.?entry\s)", ptx, flags=re.M)
    out = {}
    for part in parts:
        m = re.match(r"\.(?:visible\s+)?\.?entry\s+(\S+?)\s*\(", part)
        if m:
            out[m.group(1)] = part
    return out


def compile_triton(cfg: Config, cc: int) -> Result:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    res = Result(cfg.kernel, cfg.label, f"sm_{cc}", num_warps=cfg.num_warps)
    try:
        fn = getattr(importlib.import_module(f"blip3o_fast.kernels.{cfg.module}"), cfg.kernel)
        attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in cfg.divisible}
        src = ASTSource(fn=fn, signature=cfg.signature, constexprs=cfg.constexprs, attrs=attrs)
        k = triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": cfg.num_warps, **cfg.options})
        ptx = k.asm["ptx"]
        res.shared = int(k.metadata.shared)
        for key, value in ptx_features(ptx).items():
            setattr(res, key, value)
        arch = "sm_90a" if cc == 90 else f"sm_{cc}"
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "k.ptx")
            with open(path, "w") as f:
                f.write(ptx)
            run = subprocess.run([_ptxas_path(cc), "-v", "--gpu-name", arch, path, "-o", os.path.join(tmp, "k.cubin")],
                                 capture_output=True, text=True)
        if run.returncode:
            res.error = run.stderr.strip()[-400:]
            return res
        stats = parse_ptxas(run.stdout + run.stderr)
        if len(stats) != 1:
            res.error = f"expected one function in ptxas output, got {list(stats)}"
            return res
        for key, value in next(iter(stats.values())).items():
            setattr(res, key, value)
    except Exception as exc:  # a compile failure is a report line, not a crash
        res.error = f"{type(exc).__name__}: {exc}"[-400:]
    return res


def _short_name(demangled: str) -> str:
    """'void blip3o::cuda::ns::(anonymous namespace)::kern<__half>(...)' -> 'ns::kern<fp16>'."""
    name = demangled.removeprefix("void ")
    for long, short in (("blip3o::cuda::", ""), ("(anonymous namespace)::", ""), ("__nv_bfloat16", "bf16"),
                        ("__half", "fp16")):
        name = name.replace(long, short)
    if name.endswith(")"):
        depth = 0
        for i in range(len(name) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(name[i], 0)
            if depth == 0:
                return name[:i]
    return name


def _demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.split("\n")
    return {n: (_short_name(out[i]) if i < len(out) and out[i] else n) for i, n in enumerate(names)}


def compile_cuda(path: str, cc: int) -> list[Result]:
    rel = os.path.relpath(path, ROOT)
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return [Result(rel, "-", f"sm_{cc}", error="nvcc not found")]
    with tempfile.TemporaryDirectory() as tmp:
        # -keep leaves the PTX of this same compile in tmp, for the feature scan
        cmd = [nvcc, "-c", path, "-o", os.path.join(tmp, "k.o"), "-O3", "-std=c++17", "--expt-relaxed-constexpr",
               f"-gencode=arch=compute_{cc},code=sm_{cc}", "-Xptxas", "-v", "-keep", "-keep-dir", tmp,
               "-I", os.path.join(ROOT, "csrc", "include"), "-I", os.path.join(ROOT, "csrc"), "-DBLIP3O_WITH_CUDA=1"]
        run = subprocess.run(cmd, capture_output=True, text=True)
        entries: dict[str, str] = {}
        for ptx_path in glob.glob(os.path.join(tmp, "*.ptx")):
            with open(ptx_path) as f:
                entries.update(ptx_entries(f.read()))
    if run.returncode:
        return [Result(rel, "-", f"sm_{cc}", error=run.stderr.strip()[-600:])]
    stats = parse_ptxas(run.stdout + run.stderr)
    names = _demangle(list(stats))
    return [Result(names[fn], rel, f"sm_{cc}", **s, **ptx_features(entries.get(fn, ""))) for fn, s in stats.items()]


def _row(r: Result) -> str:
    if r.error:
        return f"{r.kernel:<44} {r.label:<30} {r.target:<6} ERROR {r.error.splitlines()[-1] if r.error else ''}"
    flags = ",".join(n for n, on in (("wgmma", r.wgmma), ("tma", r.tma), ("v4", r.v4_loads)) if on) or "-"
    return (f"{r.kernel:<44} {r.label:<30} {r.target:<6} {r.num_warps or '-':>5} {r.registers:>5} "
            f"{r.spill_stores:>6} {r.spill_loads:>6} {r.stack:>6} {r.shared:>7}  {flags}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args()
    sys.path.insert(0, ROOT)

    jobs = [(compile_triton, cfg, cc) for cfg in triton_configs() for cc in TARGETS]
    cu_files = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    jobs += [(compile_cuda, path, cc) for path in cu_files for cc in TARGETS]
    with cf.ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(fn, what, cc) for fn, what, cc in jobs]
        results: list[Result] = []
        for fut in futures:
            got = fut.result()
            results.extend(got if isinstance(got, list) else [got])

    print(f"{'kernel':<44} {'config':<30} {'target':<6} {'warps':>5} {'regs':>5} {'spillS':>6} {'spillL':>6} "
          f"{'stack':>6} {'smem':>7}  ptx features")
    for r in results:
        print(_row(r))
    if not cu_files:
        print("(no CUDA sources in csrc/cuda/)")
    errors = [r for r in results if r.error]
    spills = [r for r in results if not r.error and (r.spill_stores or r.spill_loads)]
    print(f"\n{len(results)} compiled kernels: {len(errors)} errors, {len(spills)} with spills")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)
    return 1 if errors or spills else 0


if __name__ == "__main__":
    sys.exit(main())
