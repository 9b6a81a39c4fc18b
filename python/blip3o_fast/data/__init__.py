"""Training data: WebDataset shards and JSON conversation files as resumable, shardable sample streams."""

from blip3o_fast.data.conversations import ConversationDataset
from blip3o_fast.data.loader import ResumableLoader
from blip3o_fast.data.mixing import Mixture
from blip3o_fast.data.samples import GENERATION, TASKS, UNDERSTANDING, GenerationSample, Sample, UnderstandingSample
from blip3o_fast.data.stats import DataStats
from blip3o_fast.data.stream import ResumableDataset, ShardedDataset
from blip3o_fast.data.webdataset import WebDataset, write_shard

__all__ = [
    "GENERATION",
    "TASKS",
    "UNDERSTANDING",
    "ConversationDataset",
    "DataStats",
    "GenerationSample",
    "Mixture",
    "ResumableDataset",
    "ResumableLoader",
    "Sample",
    "ShardedDataset",
    "UnderstandingSample",
    "WebDataset",
    "write_shard",
]
