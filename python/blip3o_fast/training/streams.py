"""The trainer's sample streams: a fixed number S of deterministic streams, split over the ranks.

Stream s reads its own share of the shards (the data readers' split with rank=s, world_size=S; a
generation and an understanding reader mixed by ratio when both are configured). Sample j of every
global batch comes from stream j % S, and rank r reads the streams s with s % world_size == r, so the
global batch of a step is the same whatever the number of processes: one process with S = 2
streams and two processes with one stream each train on identical batches. Samples the encoder
rejects (too long, unreadable image, no target) are skipped and counted, like the readers' own skips.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from blip3o_fast.data import ConversationDataset, DataStats, Mixture, WebDataset
from blip3o_fast.data.samples import GENERATION, UNDERSTANDING, InvalidSample, Sample
from blip3o_fast.training.config import DataSection

JSON_SUFFIXES = (".json", ".jsonl")


def _reader(paths: list[str], task: str, data: DataSection, stream: int, streams: int, decode_target_image: bool):
    common = dict(tasks=(task,), shuffle_buffer=data.shuffle_buffer, seed=data.seed, epochs=None,
                  rank=stream, world_size=streams)
    if all(p.endswith(JSON_SUFFIXES) for p in paths):
        return ConversationDataset(paths, **common)
    return WebDataset(paths, decode_target_image=decode_target_image, **common)


class SampleStream:
    """One stream: samples -> encoded items, endless (readers loop over epochs), resumable."""

    def __init__(self, data: DataSection, stream: int, streams: int, encode: Callable[[Sample], Any],
                 use_generation: bool, use_understanding: bool, decode_target_image: bool):
        self.index = stream
        readers = {}
        if use_generation:
            readers[GENERATION] = _reader(data.generation, GENERATION, data, stream, streams, decode_target_image)
        if use_understanding:
            readers[UNDERSTANDING] = _reader(data.understanding, UNDERSTANDING, data, stream, streams, False)
        if len(readers) == 1:
            self.dataset = next(iter(readers.values()))
        else:
            weights = {GENERATION: data.generation_ratio, UNDERSTANDING: data.understanding_ratio}
            self.dataset = Mixture(readers, weights, seed=data.seed + 1009 * stream)
        self.encode = encode
        self.encode_stats = DataStats()  # skips of the encoder (the readers count their own)
        self._iter: Iterator[Sample] | None = None

    def take(self, n: int) -> list[Any]:
        if self._iter is None:
            self._iter = iter(self.dataset)
        out = []
        while len(out) < n:
            try:
                sample = next(self._iter)
            except StopIteration:
                raise RuntimeError(
                    f"data stream {self.index} yielded no usable sample in a whole epoch: every stream needs at "
                    "least one shard (or JSON record) with valid samples; use more shards or fewer data streams"
                ) from None
            try:
                out.append(self.encode(sample))
            except InvalidSample as bad:
                self.encode_stats.skip(bad.reason, sample.key, bad.detail)
        return out

    @property
    def stats(self) -> DataStats:
        return DataStats.sum([self.dataset.stats, self.encode_stats])

    def state_dict(self) -> dict:
        return {"dataset": self.dataset.state_dict(), "encode_stats": self.encode_stats.to_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state["dataset"])
        self.encode_stats = DataStats()
        self._iter = None


def global_batch(streams: dict[int, SampleStream], batch_size: int, num_streams: int) -> list[Any]:
    """This rank's part of the next global batch, in global order: sample j comes from stream
    j % num_streams, for the streams this rank owns."""
    counts = {s: sum(1 for j in range(batch_size) if j % num_streams == s) for s in streams}
    taken = {s: iter(stream.take(counts[s])) for s, stream in streams.items()}
    return [next(taken[j % num_streams]) for j in range(batch_size) if j % num_streams in streams]
