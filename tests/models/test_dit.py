"""NextDiT vs diffusers' LuminaNextDiT2DModel preceded by PixArtAlphaTextProjection, same weights."""

import pytest
import torch
from diffusers.models.embeddings import PixArtAlphaTextProjection, get_2d_rotary_pos_embed_lumina
from diffusers.models.transformers.lumina_nextdit2d import LuminaNextDiT2DModel

from blip3o_fast.models.config import DiTConfig
from blip3o_fast.models.dit import NextDiT
from blip3o_fast.ops import lumina_2d_cos_sin


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


class DiffusersDiT(torch.nn.Module):
    """The reference: BLIP3-o's caption projection, then diffusers' Lumina-Next DiT."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.caption_projection = PixArtAlphaTextProjection(cfg.caption_dim, cfg.hidden_size, act_fn="gelu_tanh")
        self.dit = LuminaNextDiT2DModel(
            sample_size=cfg.sample_size, patch_size=cfg.patch_size, in_channels=cfg.in_channels,
            hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
            num_kv_heads=cfg.num_kv_heads, multiple_of=cfg.multiple_of, ffn_dim_multiplier=cfg.ffn_dim_multiplier,
            norm_eps=cfg.norm_eps, learn_sigma=False, qk_norm=True, cross_attention_dim=cfg.hidden_size,
        )
        self.rope = get_2d_rotary_pos_embed_lumina(cfg.head_dim, 384, 384)

    def forward(self, x, timestep, context, mask=None):
        if mask is None:
            mask = torch.ones(context.shape[:2], dtype=torch.long)
        return self.dit(
            x, timestep, self.caption_projection(context), mask, self.rope, cross_attention_kwargs={}, return_dict=False
        )[0]

    def state_dict_for_ours(self) -> dict[str, torch.Tensor]:
        sd = {f"caption_projection.{k}": v for k, v in self.caption_projection.state_dict().items()}
        sd.update({k: v for k, v in self.dit.state_dict().items() if k != "pad_token"})
        return sd


def make_pair(cfg: DiTConfig, seed: int = 0) -> tuple[DiffusersDiT, NextDiT]:
    torch.manual_seed(seed)
    ref = DiffusersDiT(cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith(".gate") or "norm" in name:
                # Gates init to 0 and norms to 1/0: randomize so every path is exercised.
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
    ours = NextDiT(cfg).eval()
    ours.load_state_dict(ref.state_dict_for_ours(), strict=True)
    return ref, ours


def tiny_cfg(**kw) -> DiTConfig:
    base = dict(hidden_size=128, num_layers=2, num_attention_heads=2, num_kv_heads=2, multiple_of=32,
                in_channels=32, sample_size=8, patch_size=1, caption_dim=48)
    base.update(kw)
    return DiTConfig(**base)


@pytest.mark.parametrize(
    "cfg",
    [tiny_cfg(), tiny_cfg(hidden_size=256, num_attention_heads=4, num_kv_heads=2)],
    ids=["mha", "gqa"],
)
def test_dit_matches_diffusers(cfg):
    ref, ours = make_pair(cfg)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, cfg.in_channels, 8, 8, generator=g)
    t = torch.tensor([1000.0, 512.3, 7.0])
    ctx = torch.randn(3, 64, cfg.caption_dim, generator=g)
    with torch.no_grad():
        want = ref(x, t, ctx)
        got = ours(x, t, ctx)
    assert got.shape == want.shape == x.shape
    assert rel_err(got, want) < 1e-4


def test_dit_context_mask_matches_diffusers():
    cfg = tiny_cfg()
    ref, ours = make_pair(cfg, seed=3)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, cfg.in_channels, 8, 8, generator=g)
    t = torch.tensor([900.0, 100.0])
    ctx = torch.randn(2, 10, cfg.caption_dim, generator=g)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad():
        want = ref(x, t, ctx, mask)
        got = ours(x, t, ctx, mask)
    assert rel_err(got, want) < 1e-4


def test_precomputed_condition_equals_forward_and_is_batch_independent():
    cfg = tiny_cfg()
    _, ours = make_pair(cfg)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, cfg.in_channels, 8, 8, generator=g)
    ctx = torch.randn(2, 64, cfg.caption_dim, generator=g)
    t = torch.tensor([300.0, 600.0])
    with torch.no_grad():
        cond = ours.precompute_condition(ctx)
        both = ours.forward_with_condition(x, t, cond)
        # forward() leaves norm_k to the attention op (the training path): same values.
        assert rel_err(ours(x, t, ctx), both) < 1e-6
        # adaLN terms precomputed for a whole schedule (one row per step) give the same step.
        mods = ours.modulations(torch.tensor([[1000.0, 1000.0], [300.0, 600.0], [0.0, 5.0]]), cond)
        assert rel_err(ours.forward_with_condition(x, t, cond, mods[1]), both) < 1e-5
        one = ours(x[1:], t[1:], ctx[1:])
    assert rel_err(both[1:], one) < 1e-5


def test_state_dict_has_the_published_names_and_no_rope_table():
    cfg = tiny_cfg()
    ours = NextDiT(cfg)
    with torch.no_grad():
        ours(torch.zeros(1, cfg.in_channels, 8, 8), torch.tensor([5.0]), torch.zeros(1, 4, cfg.caption_dim))
    keys = set(ours.state_dict())
    for k in [
        "caption_projection.linear_1.weight", "caption_projection.linear_2.bias", "patch_embedder.proj.weight",
        "time_caption_embed.timestep_embedder.linear_1.weight", "time_caption_embed.timestep_embedder.linear_2.bias",
        "time_caption_embed.caption_embedder.0.weight", "time_caption_embed.caption_embedder.1.weight",
        "layers.1.gate", "layers.1.attn1.to_q.weight", "layers.1.attn1.norm_k.bias", "layers.1.attn2.to_out.0.weight",
        "layers.1.feed_forward.linear_3.weight", "layers.1.norm1.linear.weight", "layers.1.norm1.norm.weight",
        "layers.1.ffn_norm1.weight", "layers.1.norm2.weight", "layers.1.ffn_norm2.weight",
        "layers.1.norm1_context.weight", "norm_out.linear_1.weight", "norm_out.linear_2.bias",
    ]:
        assert k in keys, k
    assert not any("rope" in k or "freqs" in k for k in keys)
    assert "layers.0.attn1.to_out.0.weight" not in keys


@pytest.mark.parametrize("h,w", [(8, 8), (5, 7)])
def test_lumina_rope_table_equals_diffusers_corner(h, w):
    # Same angles; torch.polar and cos/sin may round the last bit differently.
    cis = get_2d_rotary_pos_embed_lumina(64, 384, 384)[:h, :w].flatten(0, 1)
    cos, sin = lumina_2d_cos_sin(h, w, 64)
    torch.testing.assert_close(cos[0], cis.real, rtol=0, atol=1.2e-7)
    torch.testing.assert_close(sin[0], cis.imag, rtol=0, atol=1.2e-7)


def test_bad_inputs_name_the_problem():
    cfg = tiny_cfg()
    ours = NextDiT(cfg)
    ctx = torch.zeros(1, 4, cfg.caption_dim)
    with pytest.raises(ValueError, match="context must be"):
        ours(torch.zeros(1, cfg.in_channels, 8, 8), torch.tensor([1.0]), torch.zeros(1, 4, 7))
    with pytest.raises(ValueError, match="input must be"):
        ours(torch.zeros(1, 3, 8, 8), torch.tensor([1.0]), ctx)
    with pytest.raises(ValueError, match="batch"):
        ours.forward_with_condition(torch.zeros(2, cfg.in_channels, 8, 8), torch.tensor([1.0]), ours.precompute_condition(ctx))


def test_backward_matches_autograd_through_diffusers():
    # Two layers, so layer 0's FFN epilogue also builds layer 1's adaLN input; forward() leaves the
    # cross-attention norm_k to the attention op (the training path), so its backward is covered too.
    cfg = tiny_cfg(hidden_size=64, num_layers=2, num_attention_heads=4, num_kv_heads=2, in_channels=16)
    ref, ours = make_pair(cfg, seed=6)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, cfg.in_channels, 8, 8, generator=g)
    ctx = torch.randn(2, 12, cfg.caption_dim, generator=g)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, 9:] = 0
    t = torch.tensor([700.0, 40.0])
    w = torch.randn(x.shape, generator=g)  # a loss that weighs every output differently

    names = ["layers.0.gate", "layers.0.attn1.norm_q.weight", "layers.0.attn1.norm_k.bias",
             "layers.0.attn2.norm_k.weight", "layers.0.attn2.to_k.weight", "layers.0.norm1.linear.weight",
             "layers.0.norm2.weight", "layers.0.ffn_norm1.weight", "layers.1.norm1.norm.weight",
             "layers.1.feed_forward.linear_1.weight", "caption_projection.linear_1.weight"]

    def grads(model, params):
        xi, ci = x.clone().requires_grad_(), ctx.clone().requires_grad_()
        loss = (model(xi, t, ci, mask) * w).sum()
        return torch.autograd.grad(loss, [xi, ci, *params])

    ref_params = dict(ref.dit.named_parameters())
    ref_params.update({f"caption_projection.{k}": p for k, p in ref.caption_projection.named_parameters()})
    want = grads(ref, [ref_params[n] for n in names])
    got = grads(ours, [dict(ours.named_parameters())[n] for n in names])
    for name, a, b in zip(["x", "context", *names], got, want):
        assert rel_err(a, b) < 1e-4, name
