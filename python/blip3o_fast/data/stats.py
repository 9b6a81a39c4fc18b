"""Counts of what a reader skipped and why, mergeable across DataLoader workers and ranks.

Readers never raise on bad data: a sample (or the rest of a shard) that cannot be read is skipped and counted
here by reason, with a few example keys, and the first skip of each reason is logged as a warning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

logger = logging.getLogger("blip3o_fast.data")

# The reasons the readers use.
CORRUPT_IMAGE = "corrupt_image"  # undecodable or truncated image bytes
MISSING_CAPTION = "missing_caption"  # generation sample without (non-empty) caption
MISSING_IMAGE = "missing_image"  # generation sample with neither a target image nor precomputed features
MISSING_FILE = "missing_file"  # an image path of a JSON record that does not exist / cannot be opened
BAD_SHARD = "bad_shard"  # unreadable or corrupt tar: the rest of the shard is skipped
BAD_FILE = "bad_file"  # unreadable or unparsable JSON/JSONL file: the whole file is skipped
BAD_JSON = "bad_json"  # unparsable json member or JSONL line
BAD_TARGET = "bad_target"  # unreadable feat.npy
BAD_CONVERSATION = "bad_conversation"  # json that is neither a caption nor a valid conversation
IMAGE_COUNT_MISMATCH = "image_count_mismatch"  # placeholders and images disagree

MAX_EXAMPLES = 5


@dataclass
class DataStats:
    """Skips per reason (``counts``), up to MAX_EXAMPLES example keys per reason, and samples yielded."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    yielded: int = 0

    def skip(self, reason: str, key: str, detail: str = "") -> None:
        first = reason not in self.counts
        self.counts[reason] = self.counts.get(reason, 0) + 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < MAX_EXAMPLES:
            examples.append(key)
        if first:
            logger.warning("data: skipping %s (%s)%s; further skips of this kind are only counted",
                           key, reason, f": {detail}" if detail else "")

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())

    def merge(self, other: DataStats) -> DataStats:
        """Add ``other`` into self (in place) and return self."""
        for reason, n in other.counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + n
            examples = self.examples.setdefault(reason, [])
            examples.extend(other.examples.get(reason, [])[: MAX_EXAMPLES - len(examples)])
        self.yielded += other.yielded
        return self

    def __add__(self, other: DataStats) -> DataStats:
        return DataStats.from_dict(self.to_dict()).merge(other)

    def to_dict(self) -> dict:
        return {"counts": dict(self.counts), "examples": {k: list(v) for k, v in self.examples.items()},
                "yielded": self.yielded}

    @classmethod
    def from_dict(cls, d: dict) -> DataStats:
        return cls(dict(d.get("counts", {})), {k: list(v) for k, v in d.get("examples", {}).items()},
                   int(d.get("yielded", 0)))

    @classmethod
    def sum(cls, stats) -> DataStats:
        """Merge an iterable of DataStats or their ``to_dict()`` forms (e.g. one per worker or rank)."""
        total = cls()
        for s in stats:
            total.merge(s if isinstance(s, DataStats) else cls.from_dict(s))
        return total

    def all_reduce(self, group=None) -> DataStats:
        """The sum over all ranks of torch.distributed (self alone when it is not initialized); not in place."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return DataStats.from_dict(self.to_dict())
        gathered: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, self.to_dict(), group=group)
        return DataStats.sum(gathered)
