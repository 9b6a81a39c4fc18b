"""Tiny WebDataset shards and runs for the training tests: coloured squares with captions, and
questions about them, written with the data package's writer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from blip3o_fast.data import write_shard
from blip3o_fast.training.config import load_config
from blip3o_fast.training.trainer import train

COLOURS = {"red": (230, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 230), "yellow": (240, 220, 40)}


def square(colour: str, size: int = 64) -> Image.Image:
    a = np.full((size, size, 3), 255, np.uint8)
    a[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = COLOURS[colour]
    return Image.fromarray(a)


def write_generation_shards(folder: Path, shards: int = 2, feature_dim: int | None = None) -> str:
    """`shards` shards of the four colours (jpg + txt; plus feat.npy targets when feature_dim)."""
    features = {c: np.random.default_rng(i).standard_normal((64, feature_dim or 1)).astype(np.float32)
                for i, c in enumerate(COLOURS)}  # one target per colour: learnable from the caption
    for s in range(shards):
        samples = []
        for i, colour in enumerate(COLOURS):
            sample = {"__key__": f"gen{s}_{i}", "jpg": square(colour), "txt": f"a {colour} square"}
            if feature_dim:
                sample["feat.npy"] = features[colour]
            samples.append(sample)
        write_shard(folder / f"gen-{s}.tar", samples)
    return str(folder / "gen-*.tar")


def write_understanding_shards(folder: Path, shards: int = 2) -> str:
    for s in range(shards):
        samples = [
            {"__key__": f"und{s}_{i}", "jpg": square(colour),
             "json": {"conversations": [{"from": "human", "value": "<image>\nWhat colour is the shape?"},
                                        {"from": "gpt", "value": f"The shape is {colour}."}]}}
            for i, colour in enumerate(COLOURS)
        ]
        write_shard(folder / f"und-{s}.tar", samples)
    return str(folder / "und-*.tar")


def write_understanding_jsonl(folder: Path, files: int = 2) -> str:
    """The same questions as LLaVA-style JSONL records whose images are files next to them."""
    import json

    for colour in COLOURS:
        square(colour).save(folder / f"{colour}.png")
    for f in range(files):
        lines = [json.dumps({"image": f"{colour}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the shape?"},
            {"from": "gpt", "value": f"The shape is {colour}."}]}) for colour in COLOURS]
        (folder / f"conv-{f}.jsonl").write_text("\n".join(lines) + "\n")
    return str(folder / "conv-*.jsonl")


def write_bad_shard(folder: Path) -> str:
    """Good samples plus one of each defect: undecodable jpg, no caption, no image."""
    samples = [
        {"__key__": "good0", "jpg": square("red"), "txt": "a red square"},
        {"__key__": "corrupt", "jpg": b"\xff\xd8\xff\xe0 not really a jpeg", "txt": "broken"},
        {"__key__": "nocaption", "jpg": square("blue")},
        {"__key__": "noimage", "txt": "a caption without its image"},
        {"__key__": "good1", "jpg": square("green"), "txt": "a green square"},
    ]
    write_shard(folder / "bad-0.tar", samples)
    return str(folder / "bad-0.tar")


def settings(**sections: dict) -> list[str]:
    """--set overrides from {section: {key: value}} (values as TOML literals via repr-compatible types)."""
    out = []
    for section, values in sections.items():
        for key, value in values.items():
            out.append(f"{section}.{key}={_toml(value)}")
    return out


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    return repr(value)


def run(out: Path, config: str | None = None, **sections: dict):
    """One in-process run; `sections` override the config (train.output_dir and resume default here)."""
    sections.setdefault("train", {})
    sections["train"] = {"output_dir": str(out), "resume": "none", "parallel": "none", **sections["train"]}
    return train(load_config(config, settings(**sections)))
