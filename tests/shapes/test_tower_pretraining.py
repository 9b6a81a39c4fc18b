"""Vision tower pretraining (shapes.tower_pretraining): cell labels agree with the scene, training lowers the loss."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from blip3o_fast.models.config import BLIP3oConfig
from blip3o_fast.models.image_processing import QwenImageProcessor
from blip3o_fast.models.qwen_vision import QwenVisionTower
from blip3o_fast.shapes import world
from blip3o_fast.shapes.tower_pretraining import cell_labels, cell_regions, pretrain_tower, tower_losses, TowerHeads
from blip3o_fast.shapes.world import COLOURS, POSITIONS, SHAPES, ObjectGroup, PlacedObject, Scene, Spec


def _one_square(x: float, y: float, size: float = 16.0) -> Scene:
    spec = Spec((ObjectGroup("square", "blue"),))
    return Scene(spec, "white", [PlacedObject("square", "blue", "left", x, y, size)])


def test_cell_labels_of_a_square_on_cell_boundaries():
    # A 16 px square centred at (12, 28) covers x 4..20, y 20..36: on an 8x8 grid of 8 px cells, columns 0-2
    # (half of column 0, all of 1, half of 2) and rows 2-4 (half, all, half).
    lab = cell_labels(_one_square(12, 28), 8, 8)
    owner = lab.owner.reshape(8, 8)
    assert sorted(map(tuple, np.argwhere(owner == 0).tolist())) == [(r, c) for r in (2, 3, 4) for c in (0, 1, 2)]
    blue = list(COLOURS).index("blue")
    assert (lab.colour[lab.owner == 0] == blue).all() and (lab.colour[lab.owner == -1] == len(COLOURS)).all()
    square = SHAPES.index("square")
    assert (lab.shape[lab.owner == 0] == square).all() and (lab.shape[lab.owner == -1] == len(SHAPES)).all()
    region = lab.region.reshape(8, 8)
    assert POSITIONS[region[4, 0]] == "left" and POSITIONS[region[4, 7]] == "right"
    assert POSITIONS[region[0, 4]] == "top" and POSITIONS[region[7, 3]] == "bottom"
    assert POSITIONS[region[3, 4]] == "centre"


def test_an_objects_cells_carry_its_position_across_region_borders():
    # The left one of two squares at the top (world slot u = -PAIR_OFFSET): cell (2, 2)'s centre (20, 20) lies
    # in the left region, but the cell belongs to the square, so it is labelled "top".
    scene = Scene(Spec((ObjectGroup("square", "red", 2, "top"),)), "white",
                  [PlacedObject("square", "red", "top", 21.8, 12.8, 14.0)])
    lab, centres = cell_labels(scene, 8, 8), cell_regions(8, 8, 64, 64)
    owned = lab.owner == 0
    assert owned[2 * 8 + 2] and POSITIONS[centres[2 * 8 + 2]] == "left"
    assert (lab.region[owned] == POSITIONS.index("top")).all()
    assert (lab.region[~owned] == centres[~owned]).all()


def test_cell_labels_ignore_slivers_and_reject_uneven_grids():
    # Centred on a cell corner, an 8 px square covers a quarter of each of four cells (>= 0.15 each)...
    assert (cell_labels(_one_square(32, 32, 8), 8, 8).owner == 0).sum() == 4
    # ...a 4 px one a sixteenth: no cell belongs to it.
    assert (cell_labels(_one_square(32, 32, 4), 8, 8).owner == -1).all()
    with pytest.raises(ValueError, match="does not split into a 7x7 grid"):
        cell_labels(_one_square(32, 32), 7, 7)


def _tiny_tower() -> tuple[QwenVisionTower, QwenImageProcessor]:
    torch.manual_seed(0)
    cfg = dataclasses.replace(BLIP3oConfig.tiny().vision, out_hidden_size=32)
    return QwenVisionTower(cfg), QwenImageProcessor(min_pixels=112 * 112)


def test_tower_pretraining_lowers_the_loss():
    tower, processor = _tiny_tower()
    samples = list(world.generate(24, seed=5))
    images, scenes = [Image.fromarray(s.image) for s in samples], [s.scene for s in samples]
    heads = TowerHeads(32)
    with torch.no_grad():
        _, accuracy = tower_losses(tower, heads, processor, images, scenes)
    assert set(accuracy) == {"shape", "cell_shape", "colour", "region"}
    losses = pretrain_tower(tower, processor, images, scenes, steps=40, batch_size=8, lr=3e-3, log=lambda _: None)
    assert len(losses) == 40 and np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    # The same seed trains to the same weights.
    again, _ = _tiny_tower()
    pretrain_tower(again, processor, images, scenes, steps=40, batch_size=8, lr=3e-3, log=lambda _: None)
    assert all(torch.equal(a, b) for a, b in zip(tower.state_dict().values(), again.state_dict().values()))


def test_tower_pretraining_rejects_mismatched_inputs():
    tower, processor = _tiny_tower()
    sample = next(world.generate(1, seed=5))
    with pytest.raises(ValueError, match="as many scenes as images"):
        pretrain_tower(tower, processor, [Image.fromarray(sample.image)] * 2, [sample.scene], steps=1)
