"""JSON / JSONL conversation files (the LLaVA SFT layout) as a resumable, shardable sample stream.

A file is a .json list or a .jsonl file (one object a line) of records
  {"image": "rel/path.png" | ["a.png", "b.png"] (optional), "conversations": [{"from": "human"|"gpt", "value": ...}]}
  {"image": ..., "messages": [transformers chat messages]}
  {"image": "rel/path.png", "caption": "..."}                  (a caption pair: text-to-image)
with image paths relative to the file's folder. Conversations become samples as samples.py says (the last gpt
turn exactly "<image>": generation; else understanding). Each record is one unit of stream.py, so records are
permuted every epoch and split across ranks and workers one by one. Files are indexed when the dataset is made
(JSONL: line offsets only; records are parsed when read); a file that cannot be read or parsed is skipped whole
and counted once per epoch (by stream slot 0, so merged counts across workers and ranks are not multiplied).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence

import numpy as np

from blip3o_fast.data import stats as reasons
from blip3o_fast.data.samples import GENERATION, TASKS, UNDERSTANDING, GenerationSample, InvalidSample, Sample, \
    is_generation, sample_from_messages
from blip3o_fast.data.stream import OpenFiles, ShardedDataset
from blip3o_fast.data.webdataset import conversation_of, decode_image, parse_json_text, resolve_shards


class _JsonFile:
    """One indexed file: either the parsed list (.json) or the byte spans of its non-blank lines (.jsonl)."""

    def __init__(self, path: str):
        self.path = path
        self.folder = os.path.dirname(os.path.abspath(path))
        self.records: list | None = None
        self.spans: np.ndarray | None = None
        if path.endswith(".jsonl"):
            spans, start = [], 0
            with open(path, "rb") as f:
                for line in f:
                    if line.strip():
                        spans.append((start, len(line)))
                    start += len(line)
            self.spans = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
        else:
            with open(path, "rb") as f:
                records = json.loads(f.read())
            if not isinstance(records, list):
                raise ValueError(f"a .json file must hold a list of records, not a {type(records).__name__}")
            self.records = records

    def __len__(self) -> int:
        return len(self.records) if self.records is not None else len(self.spans)


class ConversationDataset(ShardedDataset):
    """Reader of JSON/JSONL conversation files (module doc: formats; stream.py: order, split, resume).

    paths: a file, a glob or brace pattern, or a list of those. With ``shuffle`` the records are permuted
    every epoch (no buffer needed; ``shuffle_buffer`` is still available).
    """

    def __init__(self, paths: str | Sequence[str], *, tasks=TASKS, shuffle: bool = True, shuffle_buffer: int = 0,
                 seed: int = 0, epochs: int | None = 1, rank: int | None = None, world_size: int | None = None):
        super().__init__(tasks=tasks, shuffle_buffer=shuffle_buffer, shuffle_units=shuffle, seed=seed,
                         epochs=epochs, rank=rank, world_size=world_size)
        self.paths = resolve_shards(paths)
        if not self.paths:
            raise ValueError(f"no files match {paths!r}")
        self.files: list[_JsonFile] = []
        self._file_errors: list[tuple[str, str]] = []
        for path in self.paths:
            try:
                self.files.append(_JsonFile(path))
            except (OSError, ValueError) as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
                self._file_errors.append((path, str(e)))
        self._ends = np.cumsum([len(f) for f in self.files], dtype=np.int64)
        self._lines = OpenFiles()

    def _num_units(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def _epoch_started(self, slot: int) -> None:
        if slot == 0:
            for path, error in self._file_errors:
                self.stats.skip(reasons.BAD_FILE, path, error)

    def _records(self, unit: int) -> Iterator[tuple[int, int]]:
        file_index = int(np.searchsorted(self._ends, unit, side="right"))
        start = int(self._ends[file_index - 1]) if file_index else 0
        yield file_index, unit - start

    def _record_key(self, record: tuple[int, int]) -> str:
        return f"{self.files[record[0]].path}:{record[1]}"

    def _close(self) -> None:
        self._lines.close()

    def _decode(self, record: tuple[int, int]) -> Sample | None:
        file = self.files[record[0]]
        key = self._record_key(record)
        if file.records is not None:
            obj = file.records[record[1]]
        else:
            try:
                line = self._lines.read(file.path, *map(int, file.spans[record[1]]))
            except OSError as e:  # the file vanished or became unreadable after it was indexed
                raise InvalidSample(reasons.BAD_FILE, f"{file.path}: {e}") from None
            obj = parse_json_text(line, key)
        messages = conversation_of(obj, key)
        if messages is None and not isinstance(obj.get("caption"), str):
            raise InvalidSample(reasons.BAD_CONVERSATION, f"{key}: no conversations, messages or caption")
        task = GENERATION if messages is None or is_generation(messages) else UNDERSTANDING
        if task not in self.tasks:
            return None
        image_paths = obj.get("image", [])
        image_paths = [image_paths] if isinstance(image_paths, str) else image_paths
        if not isinstance(image_paths, list) or not all(isinstance(p, str) for p in image_paths):
            raise InvalidSample(reasons.BAD_CONVERSATION, f"{key}: bad image field {str(image_paths)[:80]!r}")
        if messages is None:
            caption = obj["caption"].strip()
            if not caption:
                raise InvalidSample(reasons.MISSING_CAPTION, key)
            if len(image_paths) != 1:
                raise InvalidSample(reasons.MISSING_IMAGE if not image_paths else reasons.IMAGE_COUNT_MISMATCH, key)
            return GenerationSample(key, caption, self._load_image(file, image_paths[0], key))
        images = [self._load_image(file, p, key) for p in image_paths]
        return sample_from_messages(key, messages, images)

    @staticmethod
    def _load_image(file: _JsonFile, rel_path: str, key: str):
        path = os.path.join(file.folder, rel_path)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise InvalidSample(reasons.MISSING_FILE, f"{key}: {e}") from None
        return decode_image(data, f"{key}: {rel_path}")
