"""The training loop end to end on tiny models and tiny shards: every objective learns, a resumed
run continues the same loss curve, bad data is skipped and counted, the example configs run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from blip3o_fast.models.blip3o import BLIP3o
from training_data import (
    run,
    write_bad_shard,
    write_generation_shards,
    write_understanding_jsonl,
    write_understanding_shards,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
FAST = {"batch_size": 4, "micro_batch_size": 4, "log_every": 0}
CONSTANT = {"warmup_steps": 0, "schedule": "constant"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    for sub in ("gen", "feat", "und", "json"):
        (folder / sub).mkdir()
    return {
        "gen": write_generation_shards(folder / "gen", 2),
        "feat": write_generation_shards(folder / "feat", 2, feature_dim=32),
        "und": write_understanding_shards(folder / "und", 2),
        "json": write_understanding_jsonl(folder / "json", 2),
        "bad": write_bad_shard(folder),
    }


def _falls(losses: list[float], factor: float) -> bool:
    head, tail = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    return tail < factor * head


@pytest.mark.parametrize("method", ["clip_flow", "clip_mse", "vae_flow", "text", "multitask"])
def test_loss_falls(tmp_path, data, method):
    objective, model, optim = {}, {}, {"lr": 3e-3, **CONSTANT}
    dataset = {"generation": [data["gen"]]}
    if method == "clip_flow":
        objective = {"generation": "clip_flow", "condition_dropout": 0.0}
    elif method == "clip_mse":  # precomputed targets (feat.npy), the released trainable set
        objective = {"generation": "clip_mse", "targets": "precomputed"}
        dataset = {"generation": [data["feat"]]}
        optim["lr"] = 1e-2
    elif method == "vae_flow":  # the tiny pixel decoder's VAE: 64 px -> 4 x 8 x 8 latents
        objective = {"generation": "vae_flow", "vae": "decoder", "vae_resolution": 64, "condition_dropout": 0.0}
        model = {"dit_overrides": {"in_channels": 4, "sample_size": 8}}
    elif method == "text":  # JSONL conversations with image files
        objective = {"generation": "none", "text": True}
        model = {"trainable": "full"}
        dataset = {"understanding": [data["json"]]}
        optim["lr"] = 1e-3
    else:
        objective = {"generation": "clip_flow", "text": True, "condition_dropout": 0.0}
        model = {"trainable": "full"}
        dataset = {"generation": [data["gen"]], "understanding": [data["und"]]}
        optim["lr"] = 1e-3
    result = run(tmp_path, model=model, objective=objective, data=dataset, optim=optim,
                 train={**FAST, "max_steps": 20})
    losses = [r["loss"] for r in result.history]
    assert len(losses) == 20
    assert _falls(losses, 0.7), losses
    if method == "multitask":
        assert _falls([r["gen_loss"] for r in result.history], 0.8)
        assert _falls([r["text_loss"] for r in result.history], 0.7)
        # Ratio 1:1 mixing: most batches hold both kinds, the rest one kind (then a zero-weight filler runs the other).
        assert sum(r["gen_samples"] for r in result.history) > 0.3 * 80
        assert sum(r["gen_samples"] > 0 and r["text_tokens"] > 0 for r in result.history) >= 10


def test_resume_continues_the_same_loss_curve(tmp_path, data):
    common = dict(model={"trainable": "full"},
                  objective={"generation": "clip_flow", "text": True},
                  data={"generation": [data["gen"]], "understanding": [data["und"]], "shuffle_buffer": 3},
                  optim={"lr": 1e-3, "warmup_steps": 2})
    train = {**FAST, "max_steps": 6, "micro_batch_size": 2}
    whole = run(tmp_path / "whole", **common, train={**train, "save_every": 3})
    checkpoint = tmp_path / "whole" / "checkpoint-00000003"
    assert (checkpoint / "COMPLETE").is_file()
    # A new process-like run that starts from the step-3 checkpoint: weights, AdamW state, data positions.
    rest = run(tmp_path / "rest", **common, train={**train, "resume": str(checkpoint)})
    assert [r["step"] for r in rest.history] == [4, 5, 6]
    for a, b in zip(whole.history[3:], rest.history):
        for key in ("loss", "gen_loss", "text_loss", "grad_norm"):
            assert abs(a[key] - b[key]) <= 1e-6 * max(1.0, abs(a[key])), (key, a[key], b[key])
    # The checkpoint's model folder is the published layout: it loads as a model.
    loaded = BLIP3o.from_pretrained(tmp_path / "rest" / "checkpoint-00000006" / "model")
    assert loaded.network.dit is not None


def test_bad_samples_are_skipped_and_counted(tmp_path, data, capfd):
    result = run(tmp_path, data={"generation": [data["bad"]], "shuffle_buffer": 0},
                 train={**FAST, "max_steps": 2, "batch_size": 2, "micro_batch_size": 2, "log_every": 1})
    assert len(result.history) == 2
    counts = result.data_stats.counts
    # Two steps of two samples read the shard's two good samples twice: each defect is met twice.
    for reason, key in [("corrupt_image", "corrupt"), ("missing_caption", "nocaption"), ("missing_image", "noimage")]:
        assert counts.get(reason) == 2, counts
        assert result.data_stats.examples[reason][0].endswith(f"bad-0.tar:{key}")
    assert result.data_stats.yielded == 4
    out = capfd.readouterr().out
    assert "skipped: corrupt_image" in out and "missing_caption" in out
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]


@pytest.mark.parametrize("name", ["t2i_pretrain", "instruction_tuning", "understanding", "multitask"])
def test_example_configs_run(tmp_path, data, name):
    """Each shipped config on the tiny model with the data paths overridden (bf16 + FSDP2 as configured)."""
    dataset = {"generation": [data["gen"]], "understanding": [data["und"]]}
    result = run(tmp_path, str(CONFIGS / f"{name}.toml"), model={"source": "tiny:qwen2_5_vl"},
                 objective={"eva": "tiny"}, data=dataset,
                 train={"max_steps": 2, "batch_size": 4, "micro_batch_size": 2, "parallel": "fsdp", "save_every": 0,
                        "log_every": 1})
    assert len(result.history) == 2
    assert all(r["loss"] == r["loss"] and r["loss"] > 0 for r in result.history)
    assert (tmp_path / "checkpoint-00000002" / "model" / "config.json").is_file()
