"""EVA-CLIP target tower vs a plain functional re-implementation of EVA's code path, on EVA's own
checkpoint names (separate q_bias / v_bias, no k bias); published-name loading; the 8 x 8 pooling;
the release's preprocessing."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from blip3o_fast.checkpoint.safetensors_io import CheckpointError, write_weights
from blip3o_fast.models.eva_clip import BLIP3O_PREFIX, EVAVisionConfig, EVAVisionTower, preprocess

CFG = EVAVisionConfig.tiny()


def eva_state(cfg, seed=0):
    """Random weights named as EVA-CLIP / Emu2 store them (q_bias and v_bias, qkv without bias)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    w, p = cfg.width, cfg.patch_size
    state = {
        "patch_embed.proj.weight": rnd(w, 3, p, p, scale=0.05), "patch_embed.proj.bias": rnd(w),
        "cls_token": rnd(1, 1, w), "pos_embed": rnd(1, cfg.grid**2 + 1, w),
    }
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        state.update({
            b + "norm1.weight": 1 + rnd(w), b + "norm1.bias": rnd(w),
            b + "attn.qkv.weight": rnd(3 * w, w), b + "attn.q_bias": rnd(w), b + "attn.v_bias": rnd(w),
            b + "attn.proj.weight": rnd(w, w), b + "attn.proj.bias": rnd(w),
            b + "norm2.weight": 1 + rnd(w), b + "norm2.bias": rnd(w),
            b + "mlp.fc1.weight": rnd(cfg.mlp_dim, w), b + "mlp.fc1.bias": rnd(cfg.mlp_dim),
            b + "mlp.fc2.weight": rnd(w, cfg.mlp_dim), b + "mlp.fc2.bias": rnd(w),
        })
    return state


def layer_norm(x, weight, bias, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def reference_forward(state, cfg, pixels):
    """EVA's Attention / Mlp / Block (postnorm) / forward_features, written out with plain ops."""
    x = torch.nn.functional.conv2d(pixels, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"],
                                   stride=cfg.patch_size)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([state["cls_token"].expand(x.shape[0], -1, -1), x], 1) + state["pos_embed"]
    b, n, w = x.shape
    h, d = cfg.num_heads, w // cfg.num_heads
    for i in range(cfg.depth):
        s = {k[len(f"blocks.{i}."):]: v for k, v in state.items() if k.startswith(f"blocks.{i}.")}
        qkv_bias = torch.cat([s["attn.q_bias"], torch.zeros_like(s["attn.v_bias"]), s["attn.v_bias"]])
        qkv = (x @ s["attn.qkv.weight"].T + qkv_bias).reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * d**-0.5, qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)).softmax(-1)
        a = (attn @ v).transpose(1, 2).reshape(b, n, w) @ s["attn.proj.weight"].T + s["attn.proj.bias"]
        x = x + layer_norm(a, s["norm1.weight"], s["norm1.bias"], cfg.layer_norm_eps)
        hid = x @ s["mlp.fc1.weight"].T + s["mlp.fc1.bias"]
        hid = 0.5 * hid * (1 + torch.erf(hid / math.sqrt(2)))
        m = hid @ s["mlp.fc2.weight"].T + s["mlp.fc2.bias"]
        x = x + layer_norm(m, s["norm2.weight"], s["norm2.bias"], cfg.layer_norm_eps)
    return x[:, 1:]


def reference_pool(features, cfg):
    """Token r * 8 + c = mean of the k x k patch block at pooled row r, column c."""
    k, g = cfg.pool_kernel, cfg.grid
    grid = features.reshape(features.shape[0], g, g, -1)
    out = torch.empty(features.shape[0], cfg.target_grid**2, features.shape[-1])
    for r in range(cfg.target_grid):
        for c in range(cfg.target_grid):
            out[:, r * cfg.target_grid + c] = grid[:, r * k:(r + 1) * k, c * k:(c + 1) * k].mean((1, 2))
    return out


def pixels(batch, cfg=CFG, seed=1):
    return torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(seed))


def test_matches_reference_fp32():
    state = eva_state(CFG)
    tower = EVAVisionTower.from_state_dict(dict(state), CFG)
    x = pixels(3)
    ref = reference_forward(state, CFG, x)
    out = tower(x)
    assert out.shape == (3, CFG.grid**2, CFG.width)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    targets = tower.encode_targets(x)
    assert targets.shape == (3, 64, CFG.width)
    torch.testing.assert_close(targets, reference_pool(ref, CFG), rtol=1e-5, atol=1e-5)


def test_bf16_close_to_fp32():
    state = eva_state(CFG)
    x = pixels(2)
    ref = reference_forward(state, CFG, x)
    tower = EVAVisionTower.from_state_dict(dict(state), CFG, dtype=torch.bfloat16)
    out = tower(x)
    assert out.dtype == torch.bfloat16 and tower.pos_embed.dtype == torch.bfloat16
    err = (out.float() - ref).abs().max().item()
    assert err < 0.1 * ref.abs().max().item(), err


def test_pool_is_row_major_8x8():
    cfg = EVAVisionConfig(image_size=112, patch_size=7, width=8, depth=1, num_heads=2, mlp_dim=16)  # 16x16 -> 8x8
    tower = EVAVisionTower(cfg)
    # A feature map whose value says where it came from: channel 0 = patch row, channel 1 = patch column.
    rows, cols = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    feats = torch.zeros(1, 256, 8)
    feats[0, :, 0], feats[0, :, 1] = rows.flatten(), cols.flatten()
    tower.forward = lambda _: feats
    out = tower.encode_targets(torch.zeros(1, 3, 112, 112))
    assert out.shape == (1, 64, 8)
    for token in (0, 1, 7, 8, 63):
        r, c = divmod(token, 8)
        assert out[0, token, 0].item() == 2 * r + 0.5 and out[0, token, 1].item() == 2 * c + 0.5


def published_keys(cfg):
    keys = {"patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "pos_embed"}
    for i in range(cfg.depth):
        for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            keys |= {f"blocks.{i}.{m}.weight", f"blocks.{i}.{m}.bias"}
    return keys


def test_names_are_the_published_ones():
    tower = EVAVisionTower(CFG)
    assert set(tower.state_dict()) == published_keys(CFG)
    assert tower.state_dict()["blocks.0.attn.qkv.bias"].shape == (3 * CFG.width,)


def test_released_config_shapes():
    with torch.device("meta"):
        full = EVAVisionTower(EVAVisionConfig())
    sd = full.state_dict()
    assert sd["pos_embed"].shape == (1, 1025, 1792) and sd["patch_embed.proj.weight"].shape == (1792, 3, 14, 14)
    assert sd["blocks.63.mlp.fc1.weight"].shape == (15360, 1792) and "blocks.64.norm1.weight" not in sd
    assert full.config.pool_kernel == 4
    assert abs(sum(p.numel() for p in full.parameters()) / 1e9 - 4.35) < 0.05


def test_blip3o_shards_round_trip(tmp_path):
    src = EVAVisionTower.from_state_dict(eva_state(CFG), CFG)
    state = {BLIP3O_PREFIX + k: v for k, v in src.state_dict().items()}
    state["model.layers.0.mlp.up_proj.weight"] = torch.randn(4, 4)  # the rest of a BLIP3o checkpoint
    state["model.dit.model.patch_embedder.proj.weight"] = torch.randn(4, 4)
    write_weights(state, tmp_path, max_shard_bytes=20_000)  # several shards with an index
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    loaded = EVAVisionTower.from_pretrained(tmp_path, CFG)
    x = pixels(2)
    torch.testing.assert_close(loaded(x), src(x), rtol=0, atol=0)
    assert not loaded.pos_embed.requires_grad and not loaded.training


def test_bin_checkpoint_with_eva_bias_names(tmp_path):
    state = eva_state(CFG)
    path = tmp_path / "pytorch_model.bin"
    torch.save(state, path)
    direct = EVAVisionTower.from_state_dict(dict(state), CFG)
    x = pixels(1)
    legacy = tmp_path / "legacy.pt"  # torch's pre-1.6 format: no mmap
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    for where in (path, tmp_path, legacy):  # the file, the folder holding it, an old-format file
        torch.testing.assert_close(EVAVisionTower.from_pretrained(where, CFG)(x), direct(x), rtol=0, atol=0)
    folded = direct.state_dict()["blocks.1.attn.qkv.bias"]
    assert torch.equal(folded[CFG.width:2 * CFG.width], torch.zeros(CFG.width))
    assert torch.equal(folded[:CFG.width], state["blocks.1.attn.q_bias"])


def test_config_from_weights():
    state = EVAVisionTower(CFG).state_dict()
    assert EVAVisionConfig.from_weights(state, head_width=CFG.width // CFG.num_heads) == CFG
    with pytest.raises(CheckpointError, match="head_width"):
        EVAVisionConfig.from_weights(state)  # 32 is not a multiple of EVA-E's 112


def test_missing_and_mismatched_keys_error(tmp_path):
    state = EVAVisionTower(CFG).state_dict()
    del state["blocks.1.mlp.fc2.bias"]
    state["blocks.0.norm1.weight"] = torch.ones(CFG.width + 1)
    state["head.weight"] = torch.ones(2, 2)
    with pytest.raises(CheckpointError) as err:
        EVAVisionTower.from_state_dict(state, CFG, source="my.bin")
    msg = str(err.value)
    for name in ("my.bin", "blocks.1.mlp.fc2.bias", "head.weight", "blocks.0.norm1.weight"):
        assert name in msg
    with pytest.raises(FileNotFoundError):
        EVAVisionTower.from_pretrained(tmp_path / "nope.bin", CFG)
    (tmp_path / "bad.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.bin"):
        EVAVisionTower.from_pretrained(tmp_path / "bad.bin", CFG)


def test_bad_pixel_shape():
    with pytest.raises(ValueError, match=r"\(B, 3, 224, 224\)"):
        EVAVisionTower(CFG)(torch.zeros(1, 3, 112, 112))


def normalized(arr):
    mean = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)[:, None, None]
    std = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)[:, None, None]
    return (arr.transpose(2, 0, 1).astype(np.float32) / 255 - mean) / std


def noise_image(w, h, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 4 if mode == "RGBA" else 3), dtype=np.uint8), mode=mode)


@pytest.mark.parametrize("h,top", [(224, 0), (259, 18), (257, 16)])  # (h - 224) / 2 = 17.5 -> 18, 16.5 -> 16
def test_preprocess_center_crop_without_resize(h, top):
    img = noise_image(224, h)
    out = preprocess(img, 224)
    assert out.shape == (1, 3, 224, 224) and out.dtype == torch.float32
    expected = normalized(np.asarray(img)[top:top + 224])
    np.testing.assert_allclose(out[0].numpy(), expected, rtol=0, atol=1e-6)


def test_preprocess_resizes_shortest_side_bicubic():
    img, tall = noise_image(150, 100, seed=1), noise_image(100, 151, seed=2)
    out = preprocess([img, tall], 224)
    wide = np.asarray(img.resize((336, 224), Image.Resampling.BICUBIC))  # int(224 * 150 / 100)
    high = np.asarray(tall.resize((224, 338), Image.Resampling.BICUBIC))  # int(224 * 151 / 100)
    np.testing.assert_allclose(out[0].numpy(), normalized(wide[:, 56:280]), rtol=0, atol=1e-6)
    np.testing.assert_allclose(out[1].numpy(), normalized(high[57:281]), rtol=0, atol=1e-6)


def test_preprocess_modes_and_errors():
    rgba = noise_image(224, 224, "RGBA", seed=3)
    np.testing.assert_allclose(preprocess(rgba, 224)[0].numpy(), normalized(np.asarray(rgba)[..., :3]), atol=1e-6)
    assert preprocess(Image.new("L", (300, 224), 7), 224).shape == (1, 3, 224, 224)
    with pytest.raises(TypeError):
        preprocess(np.zeros((4, 4, 3)), 224)
