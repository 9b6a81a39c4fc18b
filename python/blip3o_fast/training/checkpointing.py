"""Training checkpoints: the model in the published layout plus everything a resume needs.

  <output_dir>/checkpoint-<step>/
    model/               BLIP3o.save_pretrained (config.json, safetensors, tokenizer, ...): loadable as is
    heads.safetensors    trained modules outside the published layout (the CLIP + MSE projection)
    trainer_state.pt     optimizer state (keyed by parameter name), step, every data stream's
                         position, data skip counts, RNG state, the config
    COMPLETE             written last: a checkpoint without it is ignored (interrupted while saving)

Weights and optimizer state are gathered in full (unsharded) on rank 0 through
torch.distributed.checkpoint.state_dict, the same for a plain module, DDP and FSDP2, so a
checkpoint resumes under any of them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from blip3o_fast.checkpoint.safetensors_io import read_weights

NETWORK_PREFIX = "network."
HEADS_FILE = "heads.safetensors"
STATE_FILE = "trainer_state.pt"
MARKER = "COMPLETE"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def _options(distributed: bool) -> StateDictOptions:
    return StateDictOptions(full_state_dict=True, cpu_offload=distributed)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    done = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name)) and (p / MARKER).is_file()]
    return max(done)[1] if done else None


def save_checkpoint(
    folder: Path, model, module: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
    distributed: bool,
) -> None:
    """Collective under torch.distributed (every rank calls it); rank 0 writes."""
    weights = get_model_state_dict(module, options=_options(distributed))
    optim = get_optimizer_state_dict(module, optimizer, options=_options(distributed))
    if distributed and dist.get_rank() != 0:
        return
    folder.mkdir(parents=True, exist_ok=True)
    network = {k[len(NETWORK_PREFIX):]: v for k, v in weights.items() if k.startswith(NETWORK_PREFIX)}
    heads = {k: v.contiguous() for k, v in weights.items() if not k.startswith(NETWORK_PREFIX)}
    model.save_pretrained(folder / "model", state_dict=network)
    if heads:
        save_file(heads, str(folder / HEADS_FILE))
    torch.save({**state, "optimizer": optim}, folder / STATE_FILE)
    (folder / MARKER).write_text("")


def load_checkpoint(
    folder: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer, tied_embeddings: bool, distributed: bool
) -> dict[str, Any]:
    """Weights and optimizer state into the (possibly wrapped or sharded) module; returns the rest."""
    if not (folder / MARKER).is_file():
        raise FileNotFoundError(f"{folder} is not a complete training checkpoint (no {MARKER} file)")
    weights = {NETWORK_PREFIX + k: v for k, v in read_weights(folder / "model").items()}
    if tied_embeddings:
        weights[NETWORK_PREFIX + "lm_head.weight"] = weights[NETWORK_PREFIX + "model.embed_tokens.weight"]
    if (folder / HEADS_FILE).is_file():
        weights.update(load_file(str(folder / HEADS_FILE)))
    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    set_model_state_dict(module, weights, options=StateDictOptions(full_state_dict=True))
    set_optimizer_state_dict(module, optimizer, state.pop("optimizer"), options=StateDictOptions(full_state_dict=True))
    return state
