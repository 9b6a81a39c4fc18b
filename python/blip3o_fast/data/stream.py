"""What every reader shares: splitting across ranks and DataLoader workers, epochs, the shuffle buffer, skipping
bad records, and a resumable position.

A reader is a list of *units* (a tar shard, or one JSON record) that each give zero or more *records*; a record
is a lazy handle (no payload read yet) that ``_decode`` turns into a sample or rejects with InvalidSample.

Order. Epoch ``e`` permutes the units with a generator seeded by (seed, e), the same on every rank and worker;
stream ``slot = rank * num_workers + worker`` of ``world_size * num_workers`` takes every slot-th unit of that
order, so one epoch reads every unit exactly once over all streams (a stream may get none when there are more
streams than units). A stream's records then pass a shuffle buffer seeded by (seed, e, slot).

Position. A stream's position is (epoch, records taken out of the shuffle buffer in that epoch), counting
records that were then skipped as bad or filtered by task. Resuming replays that epoch's unit order and buffer
without decoding anything (tar members are skipped by their headers, payloads are never read) and continues
with exactly the records the uninterrupted run would have given next. Positions are kept per DataLoader
worker: ``state_dict()`` is exact for what this process iterated itself (num_workers=0); with worker processes
the main process never sees the workers' positions, so use ``ResumableLoader`` (loader.py), which carries each
worker's position back with its batches. A state resumes only under the split (rank, world_size, num_workers)
it was saved with; num_workers 0 and 1 are the same split. Skip counts (DataStats) belong to the process that
met them and are not part of the position; unit-level problems met while replaying are counted again.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from blip3o_fast.data.samples import TASKS, InvalidSample, Sample
from blip3o_fast.data.stats import DataStats


class OpenFiles:
    """A few files kept open for reads at offsets (a shuffle buffer spans several shards); never pickled open,
    so a dataset holding one can go to DataLoader workers."""

    def __init__(self, max_open: int = 4):
        self.max_open = max_open
        self._handles: OrderedDict[str, Any] = OrderedDict()

    def read(self, path: str, offset: int, size: int) -> bytes:
        handle = self._handles.get(path)
        if handle is None:
            handle = self._handles[path] = open(path, "rb")
            if len(self._handles) > self.max_open:
                self._handles.popitem(last=False)[1].close()
        self._handles.move_to_end(path)
        handle.seek(offset)
        return handle.read(size)

    def close(self) -> None:
        while self._handles:
            self._handles.popitem()[1].close()

    def __getstate__(self):
        return {"max_open": self.max_open, "_handles": OrderedDict()}


def worker_split() -> tuple[int, int]:
    """(worker id, number of workers) of the current DataLoader worker; (0, 1) in the main process."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class ResumableDataset(IterableDataset):
    """An iterable of samples that can report, per worker, where it is and start again from there.

    Subclasses implement ``iterate(start)``, yielding (sample, position after it); ``start`` is a position that
    an earlier ``iterate`` yielded, or None for the beginning.
    """

    def __init__(self):
        super().__init__()
        self._start: dict[int, Any] = {}
        self._default_start: Any = None  # for workers without an entry in _start
        self._positions: dict[int, Any] = {}

    def iterate(self, start: Any = None) -> Iterator[tuple[Sample, Any]]:
        raise NotImplementedError

    def start_position(self, worker: int) -> Any:
        """Where the next iteration of DataLoader worker ``worker`` starts (None: the beginning)."""
        return self._start.get(worker, self._default_start)

    def __iter__(self) -> Iterator[Sample]:
        worker, _ = worker_split()
        for sample, position in self.iterate(self.start_position(worker)):
            self._positions[worker] = position
            yield sample

    def state_dict(self) -> dict:
        """Positions (per worker id) after the last sample this process yielded, or as loaded."""
        return {"positions": dict(self._positions), "default": self._default_start}

    def load_state_dict(self, state: dict) -> None:
        """The next iteration of each worker starts where ``state`` says that worker was."""
        self._start = {int(k): v for k, v in state["positions"].items()}
        self._default_start = state.get("default")
        self._positions = dict(self._start)


class ShardedDataset(ResumableDataset):
    """Base of the WebDataset and JSON readers (see the module doc for order and positions).

    tasks: which sample kinds to yield (others are dropped before their images are decoded).
    shuffle_buffer: size of the sample shuffle buffer (0 or 1: no sample shuffle); shuffle_units: permute
    the units each epoch. epochs: passes over the data, None for endless. rank/world_size: default to
    torch.distributed's when it is initialized, else 0/1. stats: the DataStats this reader counts skips into.
    """

    def __init__(self, *, tasks=TASKS, shuffle_buffer: int = 0, shuffle_units: bool = True, seed: int = 0,
                 epochs: int | None = 1, rank: int | None = None, world_size: int | None = None):
        super().__init__()
        tasks = (tasks,) if isinstance(tasks, str) else tuple(tasks)
        unknown = set(tasks) - set(TASKS)
        if unknown:
            raise ValueError(f"unknown tasks {sorted(unknown)}; known: {TASKS}")
        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.tasks = tasks
        self.shuffle_buffer = int(shuffle_buffer)
        self.shuffle_units = shuffle_units
        self.seed = int(seed)
        self.epochs = epochs
        self.rank = rank
        self.world_size = world_size
        self.stats = DataStats()

    # --- what a reader provides -------------------------------------------------------------------------
    def _num_units(self) -> int:
        raise NotImplementedError

    def _records(self, unit: int) -> Iterator[Any]:
        """Lazy records of unit ``unit``; must not raise on bad data (count it in self.stats instead)."""
        raise NotImplementedError

    def _decode(self, record: Any) -> Sample | None:
        """The sample of ``record`` (None when its task is filtered out); raises InvalidSample on bad data."""
        raise NotImplementedError

    def _epoch_started(self, slot: int) -> None:
        """Hook at the start of every epoch of a stream (e.g. to count file-level errors once, in slot 0)."""

    def _close(self) -> None:
        """Release what iteration opened (file handles)."""

    # --- the shared machinery -----------------------------------------------------------------------------
    def _rank_world(self) -> tuple[int, int]:
        if self.rank is not None or self.world_size is not None:
            return int(self.rank or 0), int(self.world_size or 1)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def set_epoch(self, epoch: int) -> None:
        """Start the next iteration of every worker at the beginning of ``epoch`` (for loops that make a new
        DataLoader iterator per epoch); ``epochs`` still bounds the last epoch read."""
        self._start, self._positions = {}, {}
        self._default_start = {"epoch": int(epoch), "consumed": 0}

    def unit_order(self, epoch: int) -> np.ndarray:
        """The global order of the units in ``epoch`` (identical on every rank and worker)."""
        n = self._num_units()
        if not self.shuffle_units:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def _shuffled(self, records: Iterator[Any], rng: np.random.Generator) -> Iterator[Any]:
        if self.shuffle_buffer <= 1:
            yield from records
            return
        buffer: list = []
        for record in records:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(record)
                continue
            i = int(rng.integers(len(buffer)))
            buffer[i], record = record, buffer[i]
            yield record
        while buffer:
            i = int(rng.integers(len(buffer)))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            yield buffer.pop()

    def iterate(self, start: dict | None = None) -> Iterator[tuple[Sample, dict]]:
        worker, num_workers = worker_split()
        rank, world = self._rank_world()
        split = [rank, world, num_workers]
        slot, num_slots = rank * num_workers + worker, world * num_workers
        if start is not None and start.get("split", split) != split:
            raise ValueError(f"resume state was saved with (rank, world_size, num_workers)={start['split']}, "
                             f"but this run has {split}: the shard split would differ")
        epoch = int(start["epoch"]) if start else 0
        skip = int(start["consumed"]) if start else 0
        try:
            while self.epochs is None or epoch < self.epochs:
                self._epoch_started(slot)
                mine = self.unit_order(epoch)[slot::num_slots]
                records = (r for unit in mine for r in self._records(int(unit)))
                taken = yielded = 0
                for record in self._shuffled(records, np.random.default_rng([self.seed, epoch, slot])):
                    taken += 1
                    if taken <= skip:
                        continue
                    try:
                        sample = self._decode(record)
                    except InvalidSample as bad:
                        self.stats.skip(bad.reason, self._record_key(record), bad.detail)
                        continue
                    if sample is None:
                        continue
                    self.stats.yielded += 1
                    yielded += 1
                    yield sample, {"epoch": epoch, "consumed": taken, "split": split}
                if yielded == 0 and skip == 0 and self.epochs is None:
                    return  # an endless stream with nothing usable would spin forever
                epoch, skip = epoch + 1, 0
        finally:
            self._close()

    def _record_key(self, record: Any) -> str:
        return str(record)
