"""Reading and writing (sharded) safetensors weights, with errors that name the file at fault."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked: the message says which file or key."""


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """The safetensors files of a transformers-layout folder: the index's shards, or the single file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {folder}")
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from exc
        shards = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [str(s) for s in shards if not s.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists shards that are missing: {missing}")
        return shards
    single = folder / SINGLE_NAME
    if single.is_file():
        return [single]
    found = sorted(folder.glob("*.safetensors"))
    if found:
        return found
    raise FileNotFoundError(f"no {SINGLE_NAME} or {INDEX_NAME} in {folder}")


def read_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"corrupt or unreadable safetensors file {path}: {exc}") from exc


def read_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        state.update(read_file(path))
    return state


def write_weights(
    state: dict[str, torch.Tensor], folder: str | os.PathLike, max_shard_bytes: int = 2 * 1024**3
) -> None:
    """Write model.safetensors, or shards model-0000i-of-0000n.safetensors with an index when larger."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # safetensors refuses views and shared storage (tied weights): store independent contiguous copies.
    tensors = {k: v.detach().contiguous().clone().cpu() for k, v in state.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(tensors):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensors[key]
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(folder / SINGLE_NAME), metadata={"format": "pt"})
        return
    weight_map = {}
    total = 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        for key, t in shard.items():
            weight_map[key] = name
            total += t.numel() * t.element_size()
    (folder / INDEX_NAME).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
