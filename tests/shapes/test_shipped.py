"""The shipped tiny-shapes checkpoint: found by name, published layout, loads and runs every task, and
the README's main job (blip3o-fast demo) runs on it. No quality assertions: those are the eval's job."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from blip3o_fast import BLIP3o
from blip3o_fast.weights import SHIPPED, shipped_folder


@pytest.fixture(scope="module")
def model() -> BLIP3o:
    return BLIP3o.from_pretrained("tiny-shapes")


def test_shipped_folder_is_the_published_layout():
    folder = shipped_folder("tiny-shapes")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json",
                 "preprocessor_config.json", "diffusion-decoder/feature_flow_decoder.json",
                 "diffusion-decoder/feature_flow_decoder.safetensors"):
        assert (folder / name).is_file(), name
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size < 32 * 2**20  # fp32, 25 MB: most of it the DiT (256 wide x 4 layers)
    assert shipped_folder("not-shipped") is None
    assert SHIPPED == ("tiny-shapes",)


def test_unknown_name_names_the_shipped_ones():
    with pytest.raises(FileNotFoundError, match="shipped checkpoints: tiny-shapes"):
        BLIP3o.from_pretrained("tiny-shapez")


def test_loads_by_name_and_runs_every_task(model):
    images = model.generate_image(["a red circle", "two blue squares on the left"], num_steps=4, seed=[0, 1])
    assert [im.size for im in images] == [(64, 64)] * 2
    features = model.generate_image_features(["a red circle"], num_steps=4, seed=0)
    assert tuple(features.shape) == (1, 64, model.config.dit.in_channels)
    answers = model.generate_text(["What colour is the background?", "How many objects are there?"],
                                  images=[[images[0]], [images[1]]], max_new_tokens=4)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert isinstance(model.generate_text(["a red circle"], max_new_tokens=4)[0], str)
    edited = model.edit_image([images[0]], ["make it blue"], num_steps=4, seed=0)
    assert edited[0].size == (64, 64)


def test_demo_runs_on_the_shipped_model(tmp_path, capsys):
    from blip3o_fast.cli import main

    out = tmp_path / "demo.png"
    argv = ["demo", "--steps", "4", "--prompt", "a red circle", "--prompt", "a blue square", "--out", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "loaded tiny-shapes" in text and "analyser reads" in text and "true:" in text
    for name in ("demo_0.png", "demo_1.png", "scene.png"):
        assert Image.open(Path(tmp_path) / name).size == (64, 64)
