"""Target precomputation: tiny shards (one corrupt image) -> shards with feat.npy that equal a direct encoder
call, read back by the data reader; skip counts, manifest, resume after an interruption, the CLI."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from blip3o_fast import cli
from blip3o_fast.data import WebDataset, write_shard
from blip3o_fast.data.samples import GENERATION_PREFIX
from blip3o_fast.models.eva_clip import preprocess
from blip3o_fast.training.precompute import MANIFEST, load_target_encoder, precompute

SIZES = [(230, 240), (300, 224), (224, 260), (250, 250), (400, 230), (226, 300), (240, 235)]


def png(w, h, seed):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def decoded(data):
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


@pytest.fixture
def shards(tmp_path):
    """Two shards: 7 good generation samples (txt, json caption, an edit with a source image), one truncated
    image, one understanding conversation (not a generation sample: left out)."""
    images = {f"k{i}": png(w, h, i) for i, (w, h) in enumerate(SIZES)}
    edit = {"conversations": [{"from": "human", "value": "<image>\n" + GENERATION_PREFIX + "make it blue"},
                              {"from": "gpt", "value": "<image>"}]}
    question = {"conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A."}]}
    first = [
        {"__key__": "k0", "png": images["k0"], "txt": "a red cube"},
        {"__key__": "bad", "png": png(230, 230, 99)[:-40], "txt": "truncated"},
        {"__key__": "k1", "png": images["k1"], "json": {"caption": "from json", "id": 1}},
        {"__key__": "k2", "png": images["k2"], "txt": "two"},
        {"__key__": "q", "png": png(224, 224, 50), "json": question},
    ]
    second = [
        {"__key__": "k3", "src.png": png(224, 224, 77), "png": images["k3"], "json": edit},
        {"__key__": "k4", "png": images["k4"], "txt": "four"},
        {"__key__": "k5", "png": images["k5"], "txt": "five"},
        {"__key__": "k6", "png": images["k6"], "txt": "six"},
    ]
    write_shard(tmp_path / "in-000.tar", first)
    write_shard(tmp_path / "in-001.tar", second)
    return str(tmp_path / "in-{000..001}.tar"), images


def read_back(folder, **kw):
    return list(WebDataset(str(folder / "shard-*.tar"), shuffle_shards=False, **kw))


def test_eva_targets_match_direct_encoder(tmp_path, shards):
    pattern, images = shards
    encoder = load_target_encoder("tiny-eva", seed=3)
    out = tmp_path / "out"
    manifest = precompute(pattern, out, encoder, batch_size=2, shard_size=3, log=lambda _: None)

    assert manifest["complete"] and manifest["count"] == 7
    assert [s["count"] for s in manifest["shards"]] == [3, 3, 1]
    assert manifest["target"] == {"member": "feat.npy", "shape": [64, 32], "dtype": "float32"}
    assert manifest["skipped"]["counts"] == {"corrupt_image": 1} and manifest["skipped"]["total"] == 1
    assert manifest["encoder"]["kind"] == "eva_clip" and manifest["encoder"]["seed"] == 3
    assert json.loads((out / MANIFEST).read_text()) == manifest

    samples = read_back(out)
    assert [s.key for s in samples] == [f"k{i}" for i in range(7)]
    tower = load_target_encoder("tiny-eva", seed=3).tower  # the same weights, rebuilt from the seed
    for s in samples:
        assert s.image is None and s.target.dtype == torch.float32 and s.target.shape == (64, 32)
        direct = tower.encode_targets(preprocess(decoded(images[s.key]), 224))[0]
        torch.testing.assert_close(s.target, direct, rtol=1e-5, atol=1e-5)
    by_key = {s.key: s for s in samples}
    assert by_key["k0"].caption == "a red cube" and by_key["k1"].caption == "from json"
    assert by_key["k3"].caption == "make it blue" and len(by_key["k3"].source_images) == 1  # the edit keeps its source


def test_keep_images_copies_bytes(tmp_path, shards):
    pattern, images = shards
    out = tmp_path / "kept"
    precompute(pattern, out, load_target_encoder("tiny-eva"), batch_size=4, shard_size=100, keep_images=True,
               log=lambda _: None)
    samples = read_back(out)
    assert len(samples) == 7
    for s in samples:
        assert np.array_equal(np.asarray(s.image), np.asarray(decoded(images[s.key]))) and s.target is not None


class Interrupted(RuntimeError):
    pass


class FailingAfter:
    """The tiny EVA encoder that stops the run at its n-th batch, and counts the images it encoded."""

    def __init__(self, n):
        self.inner, self.n, self.calls, self.encoded = load_target_encoder("tiny-eva"), n, 0, 0
        self.kind = self.inner.kind

    def describe(self):
        return self.inner.describe()

    def encode(self, images):
        self.calls += 1
        if self.calls == self.n:
            raise Interrupted()
        self.encoded += len(images)
        return self.inner.encode(images)


def test_resume_after_interruption(tmp_path, shards):
    pattern, _ = shards
    clean = precompute(pattern, tmp_path / "clean", load_target_encoder("tiny-eva"), batch_size=2, shard_size=3,
                       log=lambda _: None)
    out = tmp_path / "resumed"
    with pytest.raises(Interrupted):
        precompute(pattern, out, FailingAfter(4), batch_size=2, shard_size=3, log=lambda _: None)  # in shard 2
    partial = json.loads((out / MANIFEST).read_text())
    assert not partial["complete"] and [s["name"] for s in partial["shards"]] == ["shard-000000.tar"]

    again = FailingAfter(0)
    manifest = precompute(pattern, out, again, batch_size=2, shard_size=3, log=lambda _: None)
    assert again.encoded == 4  # only the samples after the first shard
    assert manifest["count"] == clean["count"] == 7 and manifest["shards"] == clean["shards"]
    assert manifest["skipped"] == clean["skipped"]  # the corrupt image (in shard 0's stretch) counted once
    for a, b in zip(read_back(tmp_path / "clean"), read_back(out)):
        assert a.key == b.key and torch.equal(a.target, b.target)
    done = FailingAfter(1)
    assert precompute(pattern, out, done, batch_size=2, shard_size=3, log=lambda _: None)["complete"]
    assert done.calls == 0  # complete: nothing read or encoded

    with pytest.raises(ValueError, match="shard_size"):
        precompute(pattern, out, load_target_encoder("tiny-eva"), batch_size=2, shard_size=4, log=lambda _: None)


def test_vae_latents(tmp_path, shards):
    diffusers = pytest.importorskip("diffusers")
    pattern, images = shards
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32,
        scaling_factor=0.5, shift_factor=0.1,
    )
    vae.save_pretrained(tmp_path / "decoder" / "vae")  # a pixel decoder's folder: the VAE in vae/
    encoder = load_target_encoder(str(tmp_path / "decoder"))
    assert encoder.kind == "vae"
    manifest = precompute(pattern, tmp_path / "lat", encoder, batch_size=3, shard_size=4, log=lambda _: None)
    assert manifest["target"]["shape"] == [4, 16, 16] and manifest["count"] == 7
    assert manifest["encoder"]["scaling_factor"] == 0.5 and manifest["encoder"]["image_size"] == 32
    vae.eval()
    for s in read_back(tmp_path / "lat"):
        pixels = encoder.online.preprocess(decoded(images[s.key]))[None]
        with torch.no_grad():
            direct = (vae.encode(pixels).latent_dist.mean - 0.1) * 0.5
        torch.testing.assert_close(s.target, direct[0], rtol=1e-5, atol=1e-5)


def test_cli_and_errors(tmp_path, shards, capsys):
    pattern, _ = shards
    out = tmp_path / "cli"
    rc = cli.main(["precompute", pattern, "--out", str(out), "--encoder", "tiny-eva", "--batch-size", "4",
                   "--shard-size", "5"])
    assert rc == 0 and str(out / MANIFEST) in capsys.readouterr().out
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["count"] == 7 and [s["count"] for s in manifest["shards"]] == [5, 2]
    assert cli.main(["precompute", pattern, "--out", str(tmp_path / "x"), "--encoder", str(tmp_path / "nope")]) == 2
    assert "encoder not found" in capsys.readouterr().err
    assert cli.main(["precompute", str(tmp_path / "none-*.tar"), "--out", str(tmp_path / "y")]) == 2
    assert "no shards" in capsys.readouterr().err
