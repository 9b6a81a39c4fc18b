"""Our Qwen2.5-VL backbone (text decoder with 3-D M-RoPE, vision tower, generation) vs transformers'
Qwen2_5_VLForConditionalGeneration on tiny random weights, with and without images."""

import pytest
import torch

from blip3o_fast.engine.text_generation import expand_image_tokens, generate_tokens
from blip3o_fast.models.mrope import decode_positions, rope_index
from blip3o_fast.checkpoint.state_dict import normalize_keys
from twin_models import EOS, IMAGES, IMG, PAD, PROC, VE, VS, qwen_twins, rel_err

transformers = pytest.importorskip("transformers")

TEXT_PROMPTS = [[5, 17, 200, 33, 9], [44, 3, 19, 301, 8, 250, 61, 90, 12, 77, 3]]


@pytest.fixture(scope="module")
def models():
    return qwen_twins()


def image_prompt(n_images: int) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """Text, then each image as <vision_start><image_pad><vision_end> followed by more text; expanded."""
    ids = [5, 17, 200]
    for k in range(n_images):
        ids += [VS, IMG, VE, 30 + k, 41]
    ids += [9, 33]
    pixel_values, grid = PROC(IMAGES[:n_images])
    return expand_image_tokens(ids, grid, IMG), pixel_values, grid


def test_state_dict_names_are_the_4_51_layout(models):
    hf, ours = models
    assert set(ours.state_dict()) == set(normalize_keys(hf.state_dict()))
    assert "visual.patch_embed.proj.weight" in ours.state_dict()
    assert ours.visual.patch_embed.proj.weight.shape == (32, 3, 2, 14, 14)


def test_vision_tower_matches_transformers(models):
    hf, ours = models
    for n in (1, 2):
        pixel_values, grid = PROC(IMAGES[:n])
        with torch.no_grad():
            ref = hf.model.visual(pixel_values, grid_thw=grid).pooler_output
            out = ours.visual(pixel_values, grid)
        assert out.shape == (int(grid.prod(-1).sum()) // 4, 64)
        assert rel_err(out, ref) < 1e-4


@pytest.mark.parametrize("n_images", [1, 2])
def test_rope_index_matches_transformers(models, n_images):
    hf, _ = models
    ids, _, grid = image_prompt(n_images)
    pad = 3
    input_ids = torch.tensor([[PAD] * pad + ids, ids + [11, 12, 13]])
    mask = torch.ones_like(input_ids)
    mask[0, :pad] = 0
    types = (input_ids == IMG).int()
    pos, deltas = rope_index(input_ids, mask, torch.cat([grid, grid]), IMG, VS, 2)
    ref, ref_deltas = hf.model.get_rope_index(
        input_ids, types, image_grid_thw=torch.cat([grid, grid]), attention_mask=mask
    )
    assert torch.equal(pos[:, mask.bool()], ref[:, mask.bool()])
    # transformers 5 counts the delta over real tokens and continues from the mask's cumsum; ours counts
    # over the padded row and continues from the cache index: the same next position either way.
    assert torch.equal(deltas + input_ids.shape[1], ref_deltas.view(-1) + mask.sum(-1))
    nxt = decode_positions(input_ids.shape[1], 1, deltas, three_d=True)[:, :, 0]
    assert torch.equal(nxt, pos.amax(dim=(0, 2))[None].expand(3, -1) + 1)


def test_text_only_logits_match_transformers(models):
    hf, ours = models
    for p in TEXT_PROMPTS:
        ids = torch.tensor([p])
        with torch.no_grad():
            assert rel_err(ours(ids), hf(ids).logits) < 1e-4


@pytest.mark.parametrize("n_images", [1, 2])
def test_image_logits_match_transformers(models, n_images):
    hf, ours = models
    ids, pixel_values, grid = image_prompt(n_images)
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        ref = hf(input_ids, pixel_values=pixel_values, image_grid_thw=grid,
                 mm_token_type_ids=(input_ids == IMG).int()).logits
        out = ours(input_ids, pixel_values=pixel_values, image_grid_thw=grid, image_token_id=IMG,
                   vision_start_token_id=VS)
        flat = ours(input_ids, pixel_values=pixel_values, image_grid_thw=grid, image_token_id=IMG,
                    position_ids=torch.arange(len(ids))[None])
    assert rel_err(out, ref) < 1e-4
    assert rel_err(flat, ref) > 1e-3  # the 3-D positions matter: 1-D ones give other logits


def _hf_greedy(hf, ids, **kw):
    input_ids = torch.tensor([ids])
    out = hf.generate(input_ids, max_new_tokens=32, do_sample=False, eos_token_id=EOS, pad_token_id=PAD,
                      mm_token_type_ids=(input_ids == IMG).int(), **kw)[0, len(ids):].tolist()
    return out[:out.index(EOS)] if EOS in out else out


def test_greedy_tokens_match_transformers_generate(models):
    hf, ours = models
    requests = [(TEXT_PROMPTS[0], []), (TEXT_PROMPTS[1], []), *[image_prompt(n)[:1] + (IMAGES[:n],) for n in (1, 2)]]
    prompts = [r[0] for r in requests]
    images = [r[1] for r in requests]
    got = generate_tokens(ours, prompts, images, processor=PROC, image_token_id=IMG, vision_start_token_id=VS,
                          max_new_tokens=32, eos_token_ids=[EOS], pad_token_id=PAD)
    for (ids, imgs), tokens in zip(requests, got):
        kw = {}
        if imgs:
            kw["pixel_values"], kw["image_grid_thw"] = PROC(imgs)
        assert tokens == _hf_greedy(hf, ids, **kw)
    # Batched (ragged, mixed text and image prompts) equals one request at a time.
    for p, imgs, tokens in zip(prompts, images, got):
        alone = generate_tokens(ours, [p], [imgs], processor=PROC, image_token_id=IMG, vision_start_token_id=VS,
                                max_new_tokens=32, eos_token_ids=[EOS], pad_token_id=PAD)
        assert alone[0] == tokens


def test_unexpanded_image_pads_are_expanded(models):
    _, ours = models
    expanded, _, _ = image_prompt(2)
    short = [5, 17, 200, VS, IMG, VE, 30, 41, VS, IMG, VE, 31, 41, 9, 33]
    kw = dict(processor=PROC, image_token_id=IMG, vision_start_token_id=VS, max_new_tokens=4, eos_token_ids=[EOS],
              pad_token_id=PAD)
    assert generate_tokens(ours, [short], [IMAGES], **kw) == generate_tokens(ours, [expanded], [IMAGES], **kw)


def test_image_token_count_mismatch_raises(models):
    _, ours = models
    ids, pixel_values, grid = image_prompt(1)
    first = ids.index(IMG)
    short = torch.tensor([ids[:first] + ids[first + 2:]])  # two image tokens missing
    with pytest.raises(ValueError, match="image tokens"):
        ours.embed(short, pixel_values, grid, IMG)
    with pytest.raises(ValueError, match="image tokens"):
        ours(short, pixel_values=pixel_values, image_grid_thw=grid, image_token_id=IMG, vision_start_token_id=VS)
    with pytest.raises(ValueError, match="no pixel_values"):
        ours.embed(torch.tensor([ids]), image_token_id=IMG)
    with pytest.raises(ValueError, match="image_grid_thw has 2 rows"):
        rope_index(torch.tensor([ids]), None, torch.cat([grid, grid]), IMG, VS, 2)
    with pytest.raises(ValueError, match="2 image tokens but 1 images"):
        expand_image_tokens([IMG, 5, IMG], grid, IMG)
