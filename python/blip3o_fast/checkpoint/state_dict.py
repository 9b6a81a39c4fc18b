"""Key normalisation and strict loading of a state dict into our modules."""

from __future__ import annotations

import torch
from torch import nn

from blip3o_fast.checkpoint.safetensors_io import CheckpointError

# transformers 5 nests the Qwen2.5-VL text model and vision tower under model.*; the published
# BLIP3o checkpoints (transformers 4.51) use model.* for the text model and visual.* for the tower.
_RENAMES = (("model.language_model.", "model."), ("model.visual.", "visual."))

# Published shards also carry the frozen EVA-CLIP target encoder (spec 8); inference never uses it.
_IGNORED_PREFIXES = ("model.gen_vision_tower.",)
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def normalize_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if key.startswith(_IGNORED_PREFIXES) or key.endswith(_IGNORED_SUFFIXES):
            continue
        for old, new in _RENAMES:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    return out


def _listing(title: str, keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{title} ({len(keys)}): {shown}{more}"


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], source: str, optional: tuple[str, ...] = ()) -> None:
    """Copy `state` into `module`; any missing key (other than `optional`), unexpected key or shape
    mismatch raises one CheckpointError listing all of them."""
    expected = module.state_dict()
    missing = sorted(k for k in expected if k not in state and k not in optional)
    unexpected = sorted(k for k in state if k not in expected)
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in state
        if k in expected and state[k].shape != expected[k].shape
    )
    problems = [
        _listing(title, keys)
        for title, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched))
        if keys
    ]
    if problems:
        raise CheckpointError(f"cannot load {source}: " + "; ".join(problems))
    with torch.no_grad():
        for key, value in state.items():
            expected[key].copy_(value)
