"""A DataLoader over a ResumableDataset that knows, with worker processes too, where every worker is.

Each batch is collated inside its worker together with that worker's position after the batch's last sample
and a snapshot of the worker's DataStats; the loader keeps the latest of both per worker. So ``state_dict()``
after consuming a batch describes exactly what the training loop has seen (prefetched batches excluded), and
``stats`` sums the skips of all workers. Across ranks, save one state per rank and all-reduce the stats
(``loader.stats.all_reduce()``).

Order. The loader hands out batches in its own fixed order: workers in turn (0, 1, ..., W-1, 0, ...), skipping
those whose stream has ended; the state records whose turn is next. (torch's DataLoader always starts a new
iterator with worker 0 and its order near the end of the workers' streams depends on prefetching; a
resumed run would otherwise differ in the interleaving.) Batches arriving out of turn wait in a per-worker
queue, which stays about one round deep.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from torch.utils.data import DataLoader, IterableDataset

from blip3o_fast.data.stats import DataStats
from blip3o_fast.data.stream import ResumableDataset, worker_split


def _own_stats(dataset: ResumableDataset) -> list[DataStats]:
    """The DataStats objects a dataset counts into (a mixture's are its sources')."""
    if hasattr(dataset, "sources"):
        return [s for src in dataset.sources for s in _own_stats(src)]
    return [dataset.stats] if isinstance(getattr(dataset, "stats", None), DataStats) else []


def _reset_stats(dataset: ResumableDataset) -> None:
    if hasattr(dataset, "sources"):
        for src in dataset.sources:
            _reset_stats(src)
    elif isinstance(getattr(dataset, "stats", None), DataStats):
        dataset.stats = DataStats()


_END = "end of stream"  # a last item per worker, so that skips after its last sample (or a worker with no
# sample at all) still reach the loader's stats; it never reaches the training loop


class _WithPositions(IterableDataset):
    """Yields (worker id, sample, position after it), starting each worker where the dataset says, then _END."""

    def __init__(self, dataset: ResumableDataset):
        super().__init__()
        self.dataset = dataset

    def __iter__(self):
        worker, _ = worker_split()
        _reset_stats(self.dataset)  # each pass counts afresh; the loader accumulates passes
        for sample, position in self.dataset.iterate(self.dataset.start_position(worker)):
            yield worker, sample, position
        yield worker, _END, None


class _Batch(NamedTuple):
    batch: Any  # the collated samples (None when there are none)
    size: int
    worker: int
    position: Any  # the worker's position after the batch's last sample
    ended: bool  # the worker's stream ended with this batch
    stats: dict  # the worker's DataStats so far


class _CollateWithPositions:
    """Runs in the worker: collates the real samples and tags them with what the loader needs."""

    def __init__(self, collate_fn: Callable[[list], Any], dataset: ResumableDataset):
        self.collate_fn = collate_fn
        self.dataset = dataset

    def __call__(self, items: list) -> tuple:
        real = [item for item in items if item[1] is not _END]
        stats = DataStats.sum(_own_stats(self.dataset)).to_dict()
        ended = items[-1][1] is _END
        if not real:
            return _Batch(None, 0, items[-1][0], None, ended, stats)
        return _Batch(self.collate_fn([sample for _, sample, _ in real]), len(real), real[-1][0], real[-1][2],
                      ended, stats)


def _as_list(samples: list) -> list:
    return samples


class ResumableLoader:
    """Batches of ``dataset`` through a torch DataLoader (``collate_fn`` gets a list of samples; default: the
    list itself), with ``state_dict()`` / ``load_state_dict()`` exact at batch granularity for any num_workers
    (the state resumes only with the same rank, world_size and num_workers; 0 and 1 are interchangeable).
    Batches never mix workers; each worker's last batch may be short unless ``drop_last``. Extra keyword
    arguments go to DataLoader (pin_memory, prefetch_factor, ...)."""

    def __init__(self, dataset: ResumableDataset, batch_size: int, *, collate_fn: Callable[[list], Any] | None = None,
                 num_workers: int = 0, drop_last: bool = False, **dataloader_kwargs):
        self.dataset = dataset
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.drop_last = drop_last
        if dataloader_kwargs.get("persistent_workers"):
            # persistent workers keep the dataset copy of their first pass: a loaded state would not reach them
            raise ValueError("ResumableLoader does not support persistent_workers")
        self._loader = DataLoader(_WithPositions(dataset), batch_size=batch_size, num_workers=num_workers,
                                  collate_fn=_CollateWithPositions(collate_fn or _as_list, dataset),
                                  **dataloader_kwargs)
        self._positions: dict[int, Any] = dict(dataset.state_dict()["positions"])
        self._stats_done = DataStats()  # finished passes
        self._stats_now: dict[int, dict] = {}  # latest snapshot per worker of the running pass
        self._turn, self._ended = 0, set()  # whose batch is next; workers whose stream ended
        self._resume_turn: tuple[int, set] = (0, set())  # where the next pass starts its turns

    def __iter__(self) -> Iterator[Any]:
        """One pass, from where the dataset's state says each worker starts."""
        self._positions = dict(self.dataset.state_dict()["positions"])
        self._stats_done = self.stats
        self._stats_now = {}
        self._turn, self._ended = self._resume_turn
        self._resume_turn = (0, set())
        workers = max(self.num_workers, 1)
        queues: list[deque] = [deque() for _ in range(workers)]
        for arrived in self._loader:
            queues[arrived.worker].append(arrived)
            while len(self._ended) < workers:
                if self._turn in self._ended:
                    self._turn = (self._turn + 1) % workers
                    continue
                if not queues[self._turn]:
                    break  # wait for this worker's next batch
                out = queues[self._turn].popleft()
                self._stats_now[out.worker] = out.stats
                if out.ended:
                    self._ended.add(out.worker)
                if out.size == 0 or (self.drop_last and out.size < self.batch_size):
                    continue  # only the end-of-stream marker, or a short last batch: the same worker's turn
                self._positions[out.worker] = out.position
                self._turn = (self._turn + 1) % workers
                yield out.batch

    @property
    def stats(self) -> DataStats:
        """Skips (and samples yielded) over all workers and passes of this loader, in this process."""
        return DataStats.sum([self._stats_done, *self._stats_now.values()])

    def state_dict(self) -> dict:
        return {"positions": dict(self._positions), "default": self.dataset.state_dict()["default"],
                "turn": self._turn, "ended": sorted(self._ended), "num_workers": self.num_workers}

    def load_state_dict(self, state: dict) -> None:
        if state["num_workers"] != self.num_workers and max(state["num_workers"], 1) != max(self.num_workers, 1):
            raise ValueError(f"loader state was saved with num_workers={state['num_workers']}, "
                             f"this loader has {self.num_workers}")
        self.dataset.load_state_dict(state)
        self._positions = dict(self.dataset.state_dict()["positions"])
        self._turn, self._ended = int(state["turn"]), set(state["ended"])
        self._resume_turn = (self._turn, set(self._ended))
