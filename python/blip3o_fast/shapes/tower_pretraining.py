"""Vision tower pretraining on the shapes world's scene records: the tiny model's stand-in for the pretrained
vision encoder a real BLIP3-o starts from (Qwen2.5-VL's ViT), run before the backbone stage.

The tower's merged tokens form a grid of cells over the image (8 x 8 for a 64 x 64 image at the recipe's
min_pixels). Four linear heads, dropped afterwards, read them:
  shape    the MEAN of an object's cells' tokens -> the object's shape. The language model reads an object as
           an attention average of its tokens; trained through the language model alone, the tower's
           object-mean tokens told shape apart at 0.62 (linear probe) and the model named one object's shape
           at chance. This head makes the average carry it (held-out 0.90 after 400 steps, in a probe).
  colour   every cell -> the colour of the object covering most of it, or the background class.
  cell shape  every cell -> that object's shape, or the background class. A question names its object ("the
           red circle", "how many circles"): the lookup finds the object's cells by what each cell carries, so
           each must carry its object's shape too, not only their mean.
  region   every cell -> the named position of the object it belongs to, or, on the background, the named
           region of its own centre (left / right / top / bottom / centre). An object's cells all answer "where
           is it" alike, even those whose centres lie across a region border. The tower has relative RoPE only,
           so it must learn absolute place from the image's border; with it in the tokens the language model's
           text RoPE can be slow (rope_theta 1e6) and every lookup into the image reads content at any
           distance from the question.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from blip3o_fast.shapes.world import COLOURS, POSITIONS, SHAPES, Scene, position_of, shape_mask

MIN_COVER = 0.15  # a cell belongs to the object covering most of it when that object covers this much of it


@dataclass
class CellLabels:
    owner: np.ndarray  # (cells,) index of the object the cell belongs to, -1 for the background
    colour: np.ndarray  # (cells,) index into COLOURS; len(COLOURS) for the background
    shape: np.ndarray  # (cells,) index into SHAPES; len(SHAPES) for the background
    region: np.ndarray  # (cells,) index into POSITIONS: the owner's named position, else the cell centre's region


@lru_cache(maxsize=8)
def cell_regions(rows: int, cols: int, width: int, height: int) -> np.ndarray:
    """(cells,) index into POSITIONS of each cell centre's region: the same for every scene of one size, so it
    is computed once per grid, not per scene and step."""
    ch, cw = height / rows, width / cols
    region = np.array([POSITIONS.index(position_of(cw * (k % cols) + cw / 2, ch * (k // cols) + ch / 2, width, height))
                       for k in range(rows * cols)])
    region.flags.writeable = False  # shared by every CellLabels of the grid
    return region


def cell_labels(scene: Scene, rows: int, cols: int) -> CellLabels:
    """Labels of a rows x cols grid of cells over the scene's image (row-major, as the tower's tokens)."""
    if scene.height % rows or scene.width % cols:
        raise ValueError(f"a {scene.width}x{scene.height} image does not split into a {cols}x{rows} grid of cells")
    ch, cw = scene.height // rows, scene.width // cols
    cover = np.stack([
        shape_mask(o.shape, o.x, o.y, o.size, scene.width, scene.height).reshape(rows, ch, cols, cw).mean((1, 3))
        for o in scene.objects
    ]).reshape(len(scene.objects), rows * cols)
    owner = np.where(cover.max(0) >= MIN_COVER, cover.argmax(0), -1)
    # owner -1 (the background) picks each table's last entry, the background class.
    colour_ids = np.array([list(COLOURS).index(o.colour) for o in scene.objects] + [len(COLOURS)])
    shape_ids = np.array([SHAPES.index(o.shape) for o in scene.objects] + [len(SHAPES)])
    region = cell_regions(rows, cols, scene.width, scene.height).copy()
    owned = owner >= 0
    region[owned] = np.array([POSITIONS.index(o.position) for o in scene.objects])[owner[owned]]
    return CellLabels(owner, colour_ids[owner], shape_ids[owner], region)


class TowerHeads(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.shape = nn.Linear(width, len(SHAPES))
        self.colour = nn.Linear(width, len(COLOURS) + 1)
        self.cell_shape = nn.Linear(width, len(SHAPES) + 1)
        self.region = nn.Linear(width, len(POSITIONS))


def tower_losses(tower: nn.Module, heads: TowerHeads, processor, images: Sequence[Image.Image],
                 scenes: Sequence[Scene]) -> tuple[torch.Tensor, dict[str, float]]:
    """The summed loss of the heads on one batch, and each head's accuracy."""
    pixel_values, grid = processor(list(images))
    merge = tower.cfg.spatial_merge_size
    rows, cols = int(grid[0, 1]) // merge, int(grid[0, 2]) // merge
    if (grid[:, 1:] != grid[:1, 1:]).any():
        raise ValueError(f"tower pretraining needs one image size, got grids {grid.tolist()}")
    tokens = tower(pixel_values, grid).view(len(images), rows * cols, -1)
    labels = [cell_labels(scene, rows, cols) for scene in scenes]
    objects, shapes = [], []
    for i, (scene, lab) in enumerate(zip(scenes, labels)):
        for j, obj in enumerate(scene.objects):
            cells = torch.from_numpy(lab.owner == j)
            if cells.any():
                objects.append(tokens[i][cells].mean(0))
                shapes.append(SHAPES.index(obj.shape))
    colour = torch.from_numpy(np.stack([lab.colour for lab in labels])).view(-1)
    cell_shape = torch.from_numpy(np.stack([lab.shape for lab in labels])).view(-1)
    region = torch.from_numpy(np.stack([lab.region for lab in labels])).view(-1)
    flat = tokens.reshape(-1, tokens.shape[-1])
    logits = {"colour": heads.colour(flat), "cell_shape": heads.cell_shape(flat), "region": heads.region(flat)}
    targets = {"colour": colour, "cell_shape": cell_shape, "region": region}
    if objects:
        logits["shape"], targets["shape"] = heads.shape(torch.stack(objects)), torch.tensor(shapes)
    loss = sum(F.cross_entropy(logits[k], targets[k]) for k in logits)
    accuracy = {k: (logits[k].argmax(-1) == targets[k]).float().mean().item() for k in logits}
    return loss, accuracy


def pretrain_tower(tower: nn.Module, processor, images: Sequence[Image.Image], scenes: Sequence[Scene],
                   steps: int, batch_size: int = 32, lr: float = 1e-3, seed: int = 0,
                   log: Callable[[str], None] = print, log_every: int = 100) -> list[float]:
    """Trains `tower` in place on (image, scene) pairs (batches drawn without replacement within a batch);
    returns the loss of every step."""
    if len(images) != len(scenes) or not images:
        raise ValueError(f"need as many scenes as images (at least one), got {len(images)} images, {len(scenes)} scenes")
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():  # the heads' draw leaves the caller's global generator as it was
        torch.manual_seed(seed)
        heads = TowerHeads(tower.cfg.out_hidden_size)
    optimiser = torch.optim.AdamW(list(tower.parameters()) + list(heads.parameters()), lr=lr)
    tower.train()
    losses = []
    for step in range(1, steps + 1):
        pick = torch.randperm(len(images), generator=generator)[:batch_size].tolist()
        loss, accuracy = tower_losses(tower, heads, processor, [images[i] for i in pick], [scenes[i] for i in pick])
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
        if step % log_every == 0 or step == steps:
            log(f"tower step {step}/{steps}  loss {loss.item():.4f}  "
                + "  ".join(f"{k} {v:.3f}" for k, v in sorted(accuracy.items())))
    tower.eval()
    return losses
