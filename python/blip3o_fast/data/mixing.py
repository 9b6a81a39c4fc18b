"""Mix several sample streams by configured ratios (e.g. generation + understanding for multitask batches).

Each draw picks a source with probability proportional to its weight among the sources not yet exhausted, by a
generator seeded with (seed, DataLoader worker id), and yields that source's next sample. An exhausted source
drops out and the others are renormalized; the mixture ends when all are exhausted (use epochs=None sources for
an endless mixture). The position after each sample is the generator's state, which sources are still active,
and every source's own position, so a resumed mixture continues exactly like the uninterrupted one (with the
granularity of its sources, see stream.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from blip3o_fast.data.samples import Sample
from blip3o_fast.data.stream import ResumableDataset, worker_split


class Mixture(ResumableDataset):
    """sources: ResumableDatasets (a mapping name -> dataset, or a sequence); weights: same keys/order, any
    non-negative scale (a zero weight never draws). ``last_source`` is the name (or index) of the source the
    last sample came from, in this process."""

    def __init__(self, sources: Mapping[str, ResumableDataset] | Sequence[ResumableDataset],
                 weights: Mapping[str, float] | Sequence[float], *, seed: int = 0):
        super().__init__()
        if isinstance(sources, Mapping):
            self.names = list(sources)
            self.sources = [sources[n] for n in self.names]
            weights = [weights[n] for n in self.names] if isinstance(weights, Mapping) else list(weights)
        else:
            self.sources = list(sources)
            self.names = list(range(len(self.sources)))
            weights = list(weights)
        if len(weights) != len(self.sources) or not self.sources:
            raise ValueError(f"{len(self.sources)} sources but {len(weights)} weights")
        self.weights = np.asarray(weights, dtype=np.float64)
        if not np.all(np.isfinite(self.weights)) or np.any(self.weights < 0) or self.weights.sum() <= 0:
            raise ValueError(f"weights must be non-negative with a positive sum, got {weights}")
        self.seed = int(seed)
        self.last_source: Any = None

    def iterate(self, start: dict | None = None) -> Iterator[tuple[Sample, dict]]:
        worker, _ = worker_split()
        rng = np.random.default_rng([self.seed, worker])
        active = [bool(w > 0) for w in self.weights]
        positions: list[Any] = [None] * len(self.sources)
        if start is not None:
            rng.bit_generator.state = start["rng"]
            active, positions = list(start["active"]), list(start["sources"])
        streams = [src.iterate(pos) for src, pos in zip(self.sources, positions)]
        while any(active):
            weights = self.weights * np.asarray(active)
            i = int(np.searchsorted(np.cumsum(weights), rng.random() * weights.sum(), side="right"))
            i = min(i, len(weights) - 1)  # guards the float edge u*sum == cumsum[-1]
            try:
                sample, positions[i] = next(streams[i])
            except StopIteration:
                active[i] = False
                continue
            self.last_source = self.names[i]
            yield sample, {"rng": rng.bit_generator.state, "active": list(active), "sources": list(positions)}

    @property
    def stats(self):
        """The sources' DataStats summed (those that have one)."""
        from blip3o_fast.data.stats import DataStats

        return DataStats.sum(s.stats for s in self.sources if hasattr(s, "stats"))
