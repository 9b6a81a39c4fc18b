"""Qwen2.5-VL 3-D M-RoPE positions (time, height, width) for prompts with images.

Text tokens count up on all three axes. An image's merged tokens (between <|vision_start|> and
<|vision_end|>) take grid positions (t, row, col) offset by the position reached so far, and the text
after it continues from the largest position used + 1. Left padding is skipped: the first real token
of every row has position 0.

Decoding continues with `rope_deltas`: the token at padded index i (prompt and cache share one index
space) has position i + rope_deltas[b] on all three axes, as in transformers 4.51.
"""

from __future__ import annotations

import torch


def rope_index(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    image_grid_thw: torch.Tensor | None,
    image_token_id: int | None,
    vision_start_token_id: int | None,
    spatial_merge_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids (B, T) -> position_ids (3, B, T) long, rope_deltas (B,) long.

    An image starts right after a vision-start token that is followed by an image token; its
    t * (h/m) * (w/m) image tokens must follow. Images take image_grid_thw rows in batch order."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, T), got {tuple(input_ids.shape)}")
    b, t = input_ids.shape
    device = input_ids.device
    input_ids = input_ids.cpu()  # a per-token walk: done on the host, moved back once
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.cpu().bool()
    grids = [] if image_grid_thw is None else torch.as_tensor(image_grid_thw).view(-1, 3).tolist()
    if grids and (image_token_id is None or vision_start_token_id is None):
        raise ValueError("image_grid_thw was given: image_token_id and vision_start_token_id are needed too")
    m = spatial_merge_size
    positions = torch.ones(3, b, t, dtype=torch.long)
    deltas = torch.zeros(b, dtype=torch.long)
    next_grid = 0
    for row in range(b):
        ids = input_ids[row][mask[row]].tolist()
        pieces: list[torch.Tensor] = []
        pos, i = 0, 0  # next free position, index into ids
        while i < len(ids):
            j = i
            while j < len(ids) and not (
                grids and ids[j] == vision_start_token_id and j + 1 < len(ids) and ids[j + 1] == image_token_id
            ):
                j += 1
            if j < len(ids):
                j += 1  # the vision-start token itself is text
            pieces.append(torch.arange(pos, pos + j - i).expand(3, -1))
            pos += j - i
            if j >= len(ids):
                break
            if next_grid >= len(grids):
                raise ValueError(f"the prompts hold more images than image_grid_thw's {len(grids)} rows")
            gt, gh, gw = grids[next_grid]
            next_grid += 1
            lh, lw = gh // m, gw // m
            n = gt * lh * lw
            if ids[j:j + n] != [image_token_id] * n:
                raise ValueError(
                    f"image {next_grid - 1} with grid {(gt, gh, gw)} needs {n} image tokens after its vision-start "
                    f"token, found {sum(1 for x in ids[j:j + n] if x == image_token_id)} in a row"
                )
            grid = torch.stack(torch.meshgrid(torch.arange(gt), torch.arange(lh), torch.arange(lw), indexing="ij"))
            pieces.append(grid.reshape(3, -1) + pos)
            pos += max(gt, lh, lw)
            i = j + n
        if pieces:
            row_pos = torch.cat(pieces, dim=1)
            positions[:, row, mask[row]] = row_pos
            deltas[row] = row_pos.max() + 1 - t
        else:
            deltas[row] = -t
    if next_grid != len(grids):
        raise ValueError(f"image_grid_thw has {len(grids)} rows but the prompts hold {next_grid} images")
    return positions.to(device), deltas.to(device)


def text_positions(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D positions (B, T) that skip left padding, and rope_deltas (B,) in the same convention."""
    mask = attention_mask.long()
    pos = mask.cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 1), mask.sum(-1) - mask.shape[1]


def decode_positions(start: int, length: int, rope_deltas: torch.Tensor, *, three_d: bool) -> torch.Tensor:
    """Positions of the tokens at padded indices start..start+length-1: (3, B, length) or (B, length)."""
    pos = torch.arange(start, start + length, device=rope_deltas.device)[None, :] + rope_deltas[:, None]
    return pos[None].expand(3, -1, -1) if three_d else pos
