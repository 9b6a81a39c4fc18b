"""The shapes dataset goes through the project's data layer and reads back as the world made it."""

import json

import numpy as np
import pytest

from blip3o_fast.cli import main
from blip3o_fast.data.conversations import ConversationDataset
from blip3o_fast.data.samples import GenerationSample, UnderstandingSample
from blip3o_fast.data.webdataset import WebDataset
from blip3o_fast.shapes import world
from blip3o_fast.shapes.understanding import HELDOUT_SEED
from blip3o_fast.shapes.writer import write_dataset


def _by_type(samples):
    gen = {s.key: s for s in samples if isinstance(s, GenerationSample)}
    und = {s.key: s for s in samples if isinstance(s, UnderstandingSample)}
    return gen, und


def test_written_splits_read_back(tmp_path):
    manifest = write_dataset(tmp_path, train=7, seed=2, heldout=3, shard_size=3)
    assert manifest["splits"]["train"]["shards"] == [f"train/shard-00000{i}.tar" for i in range(3)]
    expected = list(world.generate(7, seed=2, prefix="train-"))

    gen, und = _by_type(WebDataset(str(tmp_path / "train" / "shard-*.tar"), shuffle_shards=False))
    assert len(gen) == 7 and len(und) == 14
    for sample in expected:
        g, u, t = gen[f"{sample.key}_gen"], und[f"{sample.key}_qa"], und[f"{sample.key}_txt"]
        text_questions = world.caption_questions(sample.scene, sample.questions)
        assert t.images == []
        assert t.messages[0]["content"] == [{"type": "text", "text": f"{sample.caption}\n{text_questions[0][1]}"}]
        assert [m["content"][0]["text"] for m in t.messages if m["role"] == "assistant"] == \
            [a for _, _, a in text_questions]
        assert g.caption == sample.caption
        assert np.array_equal(np.asarray(g.image), sample.image)
        assert np.array_equal(np.asarray(u.images[0]), sample.image)
        assert u.messages[0]["content"] == [{"type": "image"}, {"type": "text", "text": sample.questions[0][1]}]
        answers = [m["content"][0]["text"] for m in u.messages if m["role"] == "assistant"]
        assert answers == [a for _, _, a in sample.questions]

    gen_json, und_json = _by_type(ConversationDataset(str(tmp_path / "train.json"), shuffle=False))
    assert len(gen_json) == 7 and len(und_json) == 14
    assert sorted(s.caption for s in gen_json.values()) == sorted(s.caption for s in expected)

    heldout = list(world.generate(3, seed=HELDOUT_SEED, prefix="heldout-"))
    gen, _ = _by_type(WebDataset(str(tmp_path / "heldout" / "shard-*.tar")))
    assert sorted(s.caption for s in gen.values()) == sorted(s.caption for s in heldout)
    scene = json.loads((tmp_path / "manifest.json").read_text())
    assert scene["splits"]["heldout"]["seed"] == HELDOUT_SEED


def test_same_seed_same_shard_bytes(tmp_path):
    write_dataset(tmp_path / "a", train=4, seed=5, heldout=0)
    write_dataset(tmp_path / "b", train=4, seed=5, heldout=0)
    write_dataset(tmp_path / "c", train=4, seed=6, heldout=0)
    shard = "train/shard-000000.tar"
    assert (tmp_path / "a" / shard).read_bytes() == (tmp_path / "b" / shard).read_bytes()
    assert (tmp_path / "a" / shard).read_bytes() != (tmp_path / "c" / shard).read_bytes()
    with pytest.raises(ValueError, match="own seed"):
        write_dataset(tmp_path / "d", train=2, seed=HELDOUT_SEED)


def test_shapes_data_command(tmp_path, capsys):
    assert main(["shapes-data", str(tmp_path), "--train", "3", "--heldout", "2", "--size", "48"]) == 0
    assert capsys.readouterr().out.strip().endswith("manifest.json")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["width"] == 48 and manifest["splits"]["heldout"]["scenes"] == 2
    gen, _ = _by_type(WebDataset(str(tmp_path / "train" / "shard-000000.tar")))
    assert next(iter(gen.values())).image.size == (48, 48)
