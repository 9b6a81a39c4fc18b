"""QwenImageProcessor vs transformers' PIL Qwen2-VL image processor: same patches, same grids."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from blip3o_fast.models.image_processing import QwenImageProcessor, smart_resize

transformers = pytest.importorskip("transformers")


def noise(width, height, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}.get(mode)
    shape = (height, width, channels) if channels else (height, width)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode if mode != "P" else "L").convert(mode)


def reference(images, **kw):
    proc = transformers.Qwen2VLImageProcessorPil(**kw)
    out = proc(images, return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


CASES = [
    [noise(168, 112)],  # already a multiple of 28
    [noise(301, 97, seed=1), noise(50, 70, seed=2)],  # rounding, then the min_pixels floor
    [noise(1500, 1000, seed=3)],  # over max_pixels (small max below)
    [noise(90, 60, "RGBA", seed=4), noise(64, 64, "L", seed=5), noise(80, 40, "P", seed=6)],
]


@pytest.mark.parametrize("images", CASES)
def test_matches_transformers(images):
    kw = dict(min_pixels=56 * 56, max_pixels=28 * 28 * 300)
    pv, grid = QwenImageProcessor(**kw)(images)
    ref_pv, ref_grid = reference(images, **kw)
    assert pv.dtype == torch.float32 and grid.dtype == torch.long
    assert torch.equal(grid, ref_grid)
    assert pv.shape == ref_pv.shape
    assert (pv - ref_pv).abs().max().item() < 1e-6


def test_defaults_match_transformers():
    ours, ref = QwenImageProcessor(), transformers.Qwen2VLImageProcessorPil()
    assert (ours.min_pixels, ours.max_pixels) == (ref.size["shortest_edge"], ref.size["longest_edge"])
    assert (ours.patch_size, ours.merge_size, ours.temporal_patch_size) == (14, 2, 2)
    assert ours.image_mean == tuple(ref.image_mean) and ours.image_std == tuple(ref.image_std)
    image = noise(640, 480, seed=7)
    pv, grid = ours(image)
    ref_pv, ref_grid = reference([image])
    assert torch.equal(grid, ref_grid) and (pv - ref_pv).abs().max().item() < 1e-6
    assert ours.num_image_tokens(image) == int(grid.prod()) // 4


def test_smart_resize_bounds():
    h, w = smart_resize(1000, 3000, 28, 56 * 56, 28 * 28 * 100)
    assert h % 28 == 0 and w % 28 == 0 and h * w <= 28 * 28 * 100
    h, w = smart_resize(10, 20, 28, 56 * 56, 28 * 28 * 100)
    assert h * w >= 56 * 56
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 3000, 28, 56 * 56, 28 * 28 * 100)


def test_save_and_load_round_trip(tmp_path):
    proc = QwenImageProcessor(min_pixels=128 * 28 * 28, max_pixels=256 * 28 * 28)
    proc.save_pretrained(tmp_path)
    again = QwenImageProcessor.from_pretrained(tmp_path)
    assert again.to_dict() == proc.to_dict()
    # transformers reads our file with the same limits.
    ref = transformers.Qwen2VLImageProcessorPil.from_pretrained(tmp_path)
    assert (ref.size["shortest_edge"], ref.size["longest_edge"]) == (128 * 28 * 28, 256 * 28 * 28)


def test_reads_published_and_transformers_configs(tmp_path):
    published = {  # the Qwen2.5-VL-*-Instruct preprocessor_config.json layout
        "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(published))
    proc = QwenImageProcessor.from_pretrained(tmp_path)
    assert (proc.min_pixels, proc.max_pixels) == (3136, 12845056)
    transformers.Qwen2VLImageProcessorPil(size={"shortest_edge": 4 * 784, "longest_edge": 64 * 784}).save_pretrained(
        tmp_path / "hf"
    )
    proc = QwenImageProcessor.from_pretrained(tmp_path / "hf")
    assert (proc.min_pixels, proc.max_pixels) == (4 * 784, 64 * 784)
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        QwenImageProcessor.from_pretrained(tmp_path / "missing")


def test_bad_images_raise_clear_errors(tmp_path):
    proc = QwenImageProcessor()
    with pytest.raises(TypeError, match="PIL"):
        proc([np.zeros((56, 56, 3), dtype=np.uint8)])
    with pytest.raises(TypeError, match="PIL"):
        proc("cat.png")
    path = tmp_path / "broken.png"
    buf = tmp_path / "ok.png"
    noise(64, 64).save(buf)
    path.write_bytes(buf.read_bytes()[:200])  # truncated: PIL opens the header, decoding fails later
    with pytest.raises(ValueError, match="image 1 could not be read"):
        proc([noise(64, 64), Image.open(path)])
