"""Checkpoints that ship inside the package, loadable by name: BLIP3o.from_pretrained("tiny-shapes").

Each is a folder in the published layout (config.json, model.safetensors, tokenizer, diffusion-decoder/)
beside this file. tiny-shapes is the shapes-world model trained by `blip3o-fast train-shapes
configs/tiny_shapes.toml` (issue 7): the README's main job runs it.
"""

from __future__ import annotations

from pathlib import Path

SHIPPED = ("tiny-shapes",)


def shipped_folder(name: str) -> Path | None:
    """The folder of a shipped checkpoint, or None when `name` is not one."""
    if name not in SHIPPED:
        return None
    folder = Path(__file__).parent / name
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"the shipped checkpoint {name!r} is missing from this install ({folder})")
    return folder
