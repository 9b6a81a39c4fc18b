"""WebDataset tar shards: our own streaming reader (tarfile, no `webdataset` package) and a small writer.

Members are grouped into samples by key, webdataset style: the member path up to the first dot of its basename
is the key, the rest the extension; a sample's members are adjacent in the tar. Extensions read:
  jpg|jpeg|png|webp     the sample's image (the target of a generation sample)
  src.<img>, src<N>.<img> extra input images (editing / image-conditioned generation, multi-image questions);
                        in placeholder order they come first (src, src0, src1, ...), then the main image
  txt                   caption
  json                  {"caption": ...}, or a LLaVA conversation {"conversations": [...]} (or transformers
                        {"messages": [...]}) -> a generation sample when the last gpt turn is exactly "<image>",
                        else an understanding sample (see samples.py); other json (metadata) is ignored
  feat.npy              precomputed target (CLIP features (64, D) or VAE latents (C, h, w)), float32
Other members are ignored. Shards must be uncompressed tars (seekable: payloads are read only when a sample is
decoded, which is what makes resuming cheap).
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from blip3o_fast.data import stats as reasons
from blip3o_fast.data.samples import (
    GENERATION, TASKS, UNDERSTANDING, GenerationSample, InvalidSample, Sample, is_generation, messages_from_llava,
    normalize_messages, sample_from_messages,
)
from blip3o_fast.data.stream import OpenFiles, ShardedDataset

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TARGET_EXT = "feat.npy"
_SOURCE_EXT = re.compile(r"^src(\d*)\.(jpg|jpeg|png|webp)$")


def expand_braces(pattern: str) -> list[str]:
    """'shard-{000..002}.tar' -> shard-000.tar, shard-001.tar, shard-002.tar (zero padding kept);
    '{a,b}' alternatives; several groups expand as a product, left to right."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end():]
    span = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if span:
        lo, hi = span.groups()
        width = len(lo) if lo.startswith("0") else 0
        choices = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        choices = body.split(",")
    return [p for c in choices for p in expand_braces(head + c + tail)]


def resolve_shards(shards: str | Sequence[str]) -> list[str]:
    """Shard paths from a path, a brace pattern, a glob, or a list of those (globs sorted; order kept)."""
    patterns = [shards] if isinstance(shards, (str, os.PathLike)) else list(shards)
    paths: list[str] = []
    for pattern in patterns:
        for p in expand_braces(os.fspath(pattern)):
            paths.extend(sorted(glob.glob(p)) if glob.has_magic(p) else [p])
    return paths


def split_member_name(name: str) -> tuple[str, str]:
    """'dir/000123.feat.npy' -> ('dir/000123', 'feat.npy'); no dot -> (name, '')."""
    dirname, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    return (os.path.join(dirname, stem) if dirname else stem), ext.lower() if dot else ""


def decode_image(data: bytes, key: str) -> Image.Image:
    """Fully decoded RGB image; any decoding failure (truncation included, hence load()) -> corrupt_image."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return img.convert("RGB")
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError)
        raise InvalidSample(reasons.CORRUPT_IMAGE, f"{key}: {e}") from None


def decode_target(data: bytes, key: str) -> torch.Tensor:
    """feat.npy payload -> float32 tensor of rank 2 (tokens, D) or 3 (C, h, w)."""
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:
        raise InvalidSample(reasons.BAD_TARGET, f"{key}: {e}") from None
    if array.ndim not in (2, 3) or not np.issubdtype(array.dtype, np.number):
        raise InvalidSample(reasons.BAD_TARGET, f"{key}: array {array.dtype} {array.shape}")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def parse_json_text(data: bytes | str, key: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidSample(reasons.BAD_JSON, f"{key}: {e}") from None


def conversation_of(obj: Any, key: str) -> list[dict] | None:
    """Normalized messages of a json object that holds a conversation; None when it holds none."""
    if not isinstance(obj, dict):
        raise InvalidSample(reasons.BAD_CONVERSATION, f"{key}: json is a {type(obj).__name__}, not an object")
    if "conversations" in obj:
        return messages_from_llava(obj["conversations"])
    if "messages" in obj:
        return normalize_messages(obj["messages"])
    return None


@dataclass
class TarRecord:
    """One sample's members in a shard: extension -> (payload offset, size); nothing read yet."""

    shard: str
    key: str
    members: dict[str, tuple[int, int]]


class WebDataset(ShardedDataset):
    """Streaming reader of WebDataset tar shards (module doc: member conventions; stream.py: order, split,
    resume). Yields GenerationSample / UnderstandingSample; skips bad data into ``self.stats``.

    decode_target_image: also decode the image of a generation sample that has precomputed features
    (False saves the decode when the trainer only needs ``target``).
    """

    def __init__(self, shards: str | Sequence[str], *, tasks=TASKS, shuffle_buffer: int = 0,
                 shuffle_shards: bool = True, seed: int = 0, epochs: int | None = 1, rank: int | None = None,
                 world_size: int | None = None, decode_target_image: bool = True):
        super().__init__(tasks=tasks, shuffle_buffer=shuffle_buffer, shuffle_units=shuffle_shards, seed=seed,
                         epochs=epochs, rank=rank, world_size=world_size)
        self.shards = resolve_shards(shards)
        if not self.shards:
            raise ValueError(f"no shards match {shards!r}")
        self.decode_target_image = decode_target_image
        self._files = OpenFiles()

    def _num_units(self) -> int:
        return len(self.shards)

    def _records(self, unit: int) -> Iterator[TarRecord]:
        """Scan the shard's headers (payloads are seeked over, not read) and group members by key. A shard
        that cannot be opened, is corrupt or truncated: what came before is kept, the rest skipped once."""
        path = self.shards[unit]
        key, members = None, {}
        try:
            size = os.path.getsize(path)
            with tarfile.open(path, mode="r:") as tar:
                while (info := tar.next()) is not None:
                    member_key, ext = split_member_name(info.name)
                    if not info.isfile() or os.path.basename(member_key).startswith(".") or not ext:
                        continue
                    if member_key != key or ext in members:
                        if members:
                            yield TarRecord(path, key, members)
                        key, members = member_key, {}
                    if info.offset_data + info.size > size:
                        raise tarfile.ReadError(f"member {info.name} runs past the end of the file")
                    members[ext] = (info.offset_data, info.size)
            if members:
                yield TarRecord(path, key, members)
        except (OSError, tarfile.TarError, EOFError) as e:
            self.stats.skip(reasons.BAD_SHARD, path, str(e))

    def _read(self, record: TarRecord, ext: str) -> bytes:
        return self._files.read(record.shard, *record.members[ext])

    def _close(self) -> None:
        self._files.close()

    def _record_key(self, record: TarRecord) -> str:
        return f"{record.shard}:{record.key}"

    def _decode(self, record: TarRecord) -> Sample | None:
        key = record.key
        try:
            return self._decode_members(record, key)
        except OSError as e:  # the shard vanished or became unreadable after it was scanned
            raise InvalidSample(reasons.BAD_SHARD, f"{record.shard}: {e}") from None

    def _decode_members(self, record: TarRecord, key: str) -> Sample | None:
        members = record.members
        caption, messages = "", None
        if "json" in members:
            obj = parse_json_text(self._read(record, "json"), key)
            messages = conversation_of(obj, key)
            if messages is None and isinstance(obj.get("caption"), str):
                caption = obj["caption"]
        if "txt" in members:
            caption = self._read(record, "txt").decode("utf-8", errors="replace") or caption
        task = GENERATION if messages is None or is_generation(messages) else UNDERSTANDING
        if task not in self.tasks:
            return None

        wants_target = task == GENERATION and TARGET_EXT in members
        target = decode_target(self._read(record, TARGET_EXT), key) if wants_target else None
        main_ext = next((e for e in IMAGE_EXTS if e in members), None)
        sources = sorted((int(m.group(1) or -1), ext) for ext in members if (m := _SOURCE_EXT.match(ext)))
        if messages is None:
            caption = caption.strip()
            if not caption:
                raise InvalidSample(reasons.MISSING_CAPTION, key)
            if main_ext is None and target is None:
                raise InvalidSample(reasons.MISSING_IMAGE, key)
        skip_main = task == GENERATION and target is not None and not self.decode_target_image
        source_images = [decode_image(self._read(record, ext), key) for _, ext in sources]
        image = None if main_ext is None or skip_main else decode_image(self._read(record, main_ext), key)
        if messages is None:
            return GenerationSample(key, caption, image, target, source_images)
        return sample_from_messages(key, messages, source_images + ([image] if image is not None else []), target)


def _encode_member(ext: str, value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, Image.Image):
        fmt = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext.rsplit(".", 1)[-1]]
        buf = io.BytesIO()
        value.save(buf, format=fmt)
        return buf.getvalue()
    if isinstance(value, (np.ndarray, torch.Tensor)):
        buf = io.BytesIO()
        np.save(buf, value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value)
        return buf.getvalue()
    if isinstance(value, (dict, list)):
        return json.dumps(value).encode("utf-8")
    raise TypeError(f"member {ext!r}: cannot encode a {type(value).__name__}")


def write_shard(path: str | os.PathLike, samples: Iterable[dict[str, Any]]) -> int:
    """Write a WebDataset tar: each sample is {"__key__": key, ext: value}, value bytes, str (utf-8), a PIL
    image (encoded by the extension), a numpy array / tensor (.npy), or a dict/list (json). Members keep the
    dict's order. Written to a temporary name and renamed, so readers never see half a shard. Returns the
    number of samples written."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    count = 0
    with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for sample in samples:
            key = str(sample["__key__"])
            for ext, value in sample.items():
                if ext == "__key__":
                    continue
                data = _encode_member(ext, value)
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
            count += 1
    os.replace(tmp, path)
    return count
