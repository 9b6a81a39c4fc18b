"""Synthetic data for the data-layer tests: tiny PNG images whose pixels encode an index, captions, LLaVA
conversations, feat.npy arrays, WebDataset shards and JSON files written into a test's tmp folder."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
from PIL import Image

from blip3o_fast.data.samples import GENERATION_PREFIX
from blip3o_fast.data.webdataset import write_shard


def image(index: int, size: int = 6) -> Image.Image:
    """An RGB image whose every pixel is (index % 251, index // 251 % 251, 77): decodable back to ``index``."""
    return Image.new("RGB", (size, size), (index % 251, index // 251 % 251, 77))


def index_of(img: Image.Image) -> int:
    r, g, _ = img.getpixel((0, 0))
    return r + 251 * g


def png(index: int) -> bytes:
    buf = io.BytesIO()
    image(index).save(buf, format="PNG")
    return buf.getvalue()


def truncated_png(seed: int) -> bytes:
    """A PNG cut in the middle of its pixel data: Image.open succeeds, load() fails."""
    noise = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="PNG")
    data = buf.getvalue()
    return data[: len(data) // 2]


def generation_turns(caption: str, source_images: int = 0) -> list[dict]:
    return [{"from": "human", "value": "<image>\n" * source_images + GENERATION_PREFIX + caption},
            {"from": "gpt", "value": "<image>"}]


def understanding_turns(question: str, answer: str, images: int = 1) -> list[dict]:
    return [{"from": "human", "value": "<image>\n" * images + question}, {"from": "gpt", "value": answer}]


def t2i_sample(key: str, index: int) -> dict:
    return {"__key__": key, "png": png(index), "txt": f"caption {key}"}


def write_t2i_shards(folder, num_shards: int, per_shard: int) -> tuple[list[str], list[str]]:
    """Shards shard-000.tar ... of text-to-image samples; returns (paths, all keys in writing order)."""
    paths, keys = [], []
    for s in range(num_shards):
        samples = [t2i_sample(f"s{s}k{i}", s * per_shard + i) for i in range(per_shard)]
        path = os.path.join(folder, f"shard-{s:03d}.tar")
        write_shard(path, samples)
        paths.append(path)
        keys += [x["__key__"] for x in samples]
    return paths, keys


def truncate_tar_inside(path: str, member: str, keep: int = 10) -> None:
    """Cut the tar ``keep`` bytes into the payload of ``member``: the members before it stay intact."""
    with tarfile.open(path) as tar:
        cut = tar.getmember(member).offset_data + keep
    with open(path, "rb") as f:
        data = f.read()[:cut]
    with open(path, "wb") as f:
        f.write(data)


def write_json(path, records) -> None:
    with open(path, "w") as f:
        json.dump(records, f)


def write_jsonl(path, lines) -> None:
    """``lines``: records (dumped as json) or raw strings (written as they are, e.g. broken json)."""
    with open(path, "w") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")


def save_png(folder, name: str, index: int) -> str:
    path = os.path.join(folder, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image(index).save(path)
    return name


def feat(index: int, shape=(4, 3)) -> np.ndarray:
    return np.full(shape, float(index), dtype=np.float16)
