"""Two processes under torchrun (gloo) train exactly like one process with the same global batch:
DDP and FSDP2 (fully_shard), multitask with a trained backbone, gradient accumulation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from blip3o_fast.checkpoint.safetensors_io import read_weights

from training_data import run, settings, write_generation_shards, write_understanding_shards

SECTIONS = lambda data: dict(  # noqa: E731
    model={"source": "tiny:qwen2_5_vl", "trainable": "full"},
    objective={"generation": "clip_flow", "text": True},
    data={"generation": [data["gen"]], "understanding": [data["und"]], "streams": 2, "shuffle_buffer": 3},
    optim={"lr": 1e-3, "warmup_steps": 1},
    train={"max_steps": 3, "batch_size": 8, "micro_batch_size": 2, "log_every": 0},
)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    return {"gen": write_generation_shards(folder, 2), "und": write_understanding_shards(folder, 2)}


@pytest.fixture(scope="module")
def single(tmp_path_factory, data):
    """The reference: one process reading both data streams."""
    return run(tmp_path_factory.mktemp("single"), **SECTIONS(data))


def _torchrun(out: Path, data, parallel: str) -> list[dict]:
    sections = SECTIONS(data)
    sections["train"] = {**sections["train"], "parallel": parallel, "output_dir": str(out), "resume": "none"}
    config = out / "config.toml"  # everything comes from --set
    config.write_text("")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "blip3o_fast.cli", "train", str(config)]
    for item in settings(**sections):
        cmd += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Its own session, so that a hung run is killed with its workers (killing torchrun alone orphans them).
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun ({parallel}) did not finish in 300 s:\n{stdout[-2000:]}\n{stderr[-2000:]}")
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path, data, single, parallel):
    multi = _torchrun(tmp_path, data, parallel)
    assert [r["step"] for r in multi] == [1, 2, 3]
    for a, b in zip(single.history, multi):
        assert a["gen_samples"] == b["gen_samples"] and a["text_tokens"] == b["text_tokens"]
        for key in ("loss", "gen_loss", "text_loss", "grad_norm"):
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (parallel, key, a[key], b[key])

    # The checkpoint gathered from the two processes (DDP replicas or FSDP2 shards) holds the weights
    # the single process ended with.
    ours = read_weights(Path(single.last_checkpoint) / "model")
    theirs = read_weights(tmp_path / "checkpoint-00000003" / "model")
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.allclose(ours[name], theirs[name], rtol=1e-4, atol=1e-6), name
