"""The tiny shapes recipe's model pieces: the target autoencoder, the feature -> pixel flow decoder, the
trainer's autoencoder targets, and the --quick recipe end to end into a checkpoint BLIP3o loads and runs."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from blip3o_fast.shapes.autoencoder import (
    AutoencoderConfig, ShapesAutoencoder, image_to_tensor, object_weights, tensor_to_images, train_autoencoder,
)
from blip3o_fast.shapes.pixel_diffusion import (
    FeatureDecoderConfig, FeatureFlowDecoder, flow_loss, is_feature_flow_decoder, train_pixel_decoder,
)
from blip3o_fast.shapes.world import generate

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "configs" / "tiny_shapes.toml"
SMALL_AE = AutoencoderConfig(dim=16, channels=8)


def shapes_images(n: int, seed: int = 3) -> torch.Tensor:
    return torch.stack([image_to_tensor(Image.fromarray(s.image)) for s in generate(n, seed)])


def test_autoencoder_shapes_and_layer_normed_tokens():
    torch.manual_seed(0)
    ae = ShapesAutoencoder(SMALL_AE)
    x = shapes_images(3)
    tokens = ae.encode(x)
    assert tokens.shape == (3, 64, 16)
    # every token normalised over its channels: the scale flow matching expects of its targets
    torch.testing.assert_close(tokens.mean(-1), torch.zeros(3, 64), atol=1e-5, rtol=0)
    torch.testing.assert_close(tokens.var(-1, unbiased=False), torch.ones(3, 64), atol=1e-3, rtol=0)
    assert ae.decode(tokens).shape == (3, 3, 64, 64)
    assert not torch.allclose(tokens[0], tokens[1])  # different images, different features


def test_autoencoder_optimisation_lowers_loss_and_round_trips(tmp_path):
    x = shapes_images(16)
    torch.manual_seed(0)
    before = F.mse_loss(ShapesAutoencoder(SMALL_AE)(x), x).item()
    ae, losses = train_autoencoder(x, SMALL_AE, steps=8, batch_size=8, lr=3e-3, seed=0, log=None)
    assert len(losses) == 8
    assert F.mse_loss(ae(x), x).item() < before
    again, again_losses = train_autoencoder(x, SMALL_AE, steps=8, batch_size=8, lr=3e-3, seed=0, log=None)
    assert again_losses == losses  # seeded: the same run twice
    ae.save_pretrained(tmp_path)
    loaded = ShapesAutoencoder.from_pretrained(tmp_path)
    assert loaded.cfg == SMALL_AE
    torch.testing.assert_close(loaded.encode(x), ae.encode(x), rtol=0, atol=0)


def test_object_weights_mark_objects_not_background():
    samples = list(generate(4, 11))
    x = torch.stack([image_to_tensor(Image.fromarray(s.image)) for s in samples])
    w = object_weights(x, 9.0)
    assert w.shape == (4, 1, 64, 64) and set(w.unique().tolist()) == {1.0, 10.0}
    for sample, weights in zip(samples, w[:, 0]):
        image = torch.from_numpy(sample.image.astype("float32"))
        background = image[0, 0]  # plain background: the corner is never covered (objects lie inside)
        far = (image - background).norm(dim=-1) > 60  # clearly object pixels (the analyser's threshold)
        assert bool((weights[far] == 10.0).all())
        assert float((weights == 10.0).float().mean()) < 0.5  # objects are a minority of the pixels
    torch.testing.assert_close(object_weights(x, 0.0), torch.ones(4, 1, 64, 64))


def test_initial_model_adapts_the_tiny_source(tmp_path):
    from blip3o_fast import BLIP3o
    from blip3o_fast.shapes.recipe import load_recipe, write_initial_model

    recipe = load_recipe(RECIPE)
    source = write_initial_model(recipe, tmp_path / "init")
    assert source == str(tmp_path / "init")
    model = BLIP3o.from_pretrained(source)
    assert model.image_processor.min_pixels == recipe["init"]["min_pixels"] == 224 * 224
    _, grid_thw = model.image_processor([Image.fromarray(next(generate(1, 0)).image)])
    merge = model.image_processor.merge_size ** 2
    assert int(grid_thw.prod()) // merge == 64  # 64x64 -> 224x224 -> 64 vision tokens (4 by default)
    std = float(model.network.model.embed_tokens.weight.detach().std())
    assert abs(std - recipe["init"]["embedding_std"]) < 0.005
    std = float(model.network.model.latent_queries.detach().std())
    assert abs(std - recipe["init"]["query_std"]) < 0.005
    for section, cfg in (("text", model.config.text), ("dit", model.config.dit)):
        for key, value in recipe["init"][section].items():
            assert getattr(cfg, key) == value, (section, key)
    assert model.config.vision.out_hidden_size == model.config.dit.caption_dim == recipe["init"]["text"]["hidden_size"]
    assert not model.config.text.tie_word_embeddings  # lm_head is a matrix of its own
    assert model.network.lm_head.weight.data_ptr() != model.network.model.embed_tokens.weight.data_ptr()
    # the shapes tokenizer: every word of a caption prompt is one token
    caption = "two purple triangles on the left"
    assert len(model.tokenizer(" " + caption, add_special_tokens=False)["input_ids"]) == len(caption.split())
    assert write_initial_model({**recipe, "init": {}}, tmp_path / "unused") == "tiny:qwen2_5_vl"
    assert not (tmp_path / "unused").exists()
    folder = {"backbone": {"model": {"source": "/some/checkpoint"}}, "init": recipe["init"]}
    assert write_initial_model(folder, tmp_path / "unused") == "/some/checkpoint"


def test_initial_config_rejects_bad_sizes():
    from blip3o_fast.shapes.recipe import initial_config

    with pytest.raises(ValueError, match="mrope_section"):
        initial_config("qwen2_5_vl", {"text": {"hidden_size": 96}}, 512)  # [2, 3, 3] no longer sums to 12
    with pytest.raises(ValueError, match=r"\[init\].*hidden_sise"):
        initial_config("qwen2_5_vl", {"dit": {"hidden_sise": 96}}, 512)
    with pytest.raises(ValueError, match="no vision tower"):
        initial_config("llama3", {"vision": {"depth": 3}}, 512)


def test_generation_stage_is_merged_over_the_backbone_stage():
    from blip3o_fast.shapes.recipe import load_recipe, trainer_stages

    recipe = load_recipe(RECIPE)
    (first, backbone), (second, generation) = trainer_stages(recipe)
    assert (first, second) == ("backbone", "generation")
    assert backbone is recipe["backbone"] and backbone["objective"]["generation"] == "none"
    assert generation["model"]["trainable"] == "released" and generation["objective"]["text"] is False
    assert generation["model"]["dit_overrides"] == recipe["generation"]["model"]["dit_overrides"]
    assert generation["model"]["source"] == backbone["model"]["source"]  # inherited, then replaced by run_recipe
    assert generation["optim"] == backbone["optim"]
    assert generation["train"]["batch_size"] == recipe["generation"]["train"]["batch_size"] != \
        backbone["train"]["batch_size"]
    assert generation["train"]["log_every"] == backbone["train"]["log_every"]  # a key only the backbone sets
    single = {k: v for k, v in recipe.items() if k != "generation"}
    assert [name for name, _ in trainer_stages(single)] == ["backbone"]


def test_latent_noise_makes_the_decoder_robust():
    """Same data, steps and seed: noise added to the tokens hurts the decoder trained on noisy tokens less."""
    x = shapes_images(16)
    degradation = {}
    for noise in (0.0, 0.5):
        ae, _ = train_autoencoder(x, SMALL_AE, steps=100, batch_size=8, lr=3e-3, latent_noise=noise, log=None)
        with torch.no_grad():
            z = ae.encode(x)
            noisy = z + 0.5 * torch.randn(z.shape, generator=torch.Generator().manual_seed(0))
            degradation[noise] = float(F.mse_loss(ae.decode(noisy), x) - F.mse_loss(ae.decode(z), x))
    assert 0 <= degradation[0.5] < 0.5 * degradation[0.0]


def test_image_tensor_round_trip_is_exact():
    images = [Image.fromarray(s.image) for s in generate(2, 5)]
    back = tensor_to_images(torch.stack([image_to_tensor(im) for im in images]))
    for a, b in zip(images, back):
        assert a.tobytes() == b.tobytes()


def _decoder(seed: int = 0) -> FeatureFlowDecoder:
    torch.manual_seed(seed)
    return FeatureFlowDecoder(FeatureDecoderConfig(autoencoder=asdict(SMALL_AE), channels=8)).eval()


def test_flow_decoder_sampler_shapes_and_determinism():
    dec = _decoder()
    feats = torch.randn(3, 64, 16)
    a = dec.sample(feats, num_steps=3, seeds=[1, 2, 3])
    assert a.shape == (3, 3, 64, 64) and float(a.abs().max()) <= 1.0
    torch.testing.assert_close(dec.sample(feats, num_steps=3, seeds=[1, 2, 3]), a, rtol=0, atol=0)
    # per-request seeds: a request's image does not depend on its batch
    torch.testing.assert_close(dec.sample(feats[1:2], num_steps=3, seeds=[2]), a[1:2], rtol=1e-5, atol=1e-5)
    assert not torch.equal(dec.sample(feats, num_steps=3, seeds=[4, 5, 6]), a)
    # CFG against negative features changes the result; 0 steps is the autoencoder decoder
    guided = dec.sample(feats, torch.zeros(1, 64, 16), num_steps=3, guidance_scale=3.0, seeds=[1, 2, 3])
    assert not torch.equal(guided, a)
    torch.testing.assert_close(dec.sample(feats, num_steps=0), dec.autoencoder.decode(feats).clamp(-1, 1))
    pil = dec.decode(feats, None, num_steps=2, seeds=[0, 1, 2])
    assert [im.size for im in pil] == [(64, 64)] * 3
    with pytest.raises(ValueError, match="one seed per request"):
        dec.sample(feats, num_steps=2, seeds=[0])


def test_flow_decoder_training_lowers_loss_and_round_trips(tmp_path):
    x = shapes_images(8)
    torch.manual_seed(0)
    ae = ShapesAutoencoder(SMALL_AE).eval()
    cfg = FeatureDecoderConfig(channels=8)
    fixed = torch.Generator().manual_seed(7)
    dec, losses = train_pixel_decoder(ae, x, cfg, steps=6, batch_size=8, lr=3e-3, seed=0, log=None)
    untrained = _decoder()
    untrained.autoencoder = ae
    after = flow_loss(dec, x, torch.Generator().manual_seed(7)).item()
    before = flow_loss(untrained, x, fixed).item()
    assert after < before
    dec.save_pretrained(tmp_path)
    assert is_feature_flow_decoder(tmp_path)
    loaded = FeatureFlowDecoder.from_pretrained(tmp_path)
    feats = ae.encode(x[:2])
    torch.testing.assert_close(loaded.sample(feats, num_steps=2, seeds=[0, 1]), dec.sample(feats, num_steps=2, seeds=[0, 1]))


def test_trainer_uses_autoencoder_targets(tmp_path):
    from blip3o_fast.training.config import TrainConfig
    from blip3o_fast.training.targets import AutoencoderTargets, EVATargets, feature_targets

    torch.manual_seed(0)
    ae = ShapesAutoencoder(SMALL_AE)
    ae.save_pretrained(tmp_path)
    assert TrainConfig().objective.autoencoder == ""
    assert isinstance(feature_targets("tiny", "", 0, "cpu"), EVATargets)
    targets = feature_targets("tiny", str(tmp_path), 0, "cpu")
    assert isinstance(targets, AutoencoderTargets) and targets.feature_dim == 16
    image = Image.fromarray(next(generate(1, 0)).image)
    pixels = targets.preprocess(image)[None]
    torch.testing.assert_close(targets(pixels, ["k"], 0, 0), ae.encode(pixels), rtol=0, atol=0)


def test_tower_stage_rejects_unknown_keys_and_a_source_it_did_not_write(tmp_path):
    from blip3o_fast.shapes.recipe import pretrain_initial_tower

    with pytest.raises(ValueError, match=r"\[tower\]: unknown keys \['stepz'\]"):
        pretrain_initial_tower(str(tmp_path), {"stepz": 10}, {})
    with pytest.raises(ValueError, match="the initial model"):
        pretrain_initial_tower("tiny:qwen2_5_vl", {"steps": 10}, {})


def test_recipe_rejects_unknown_sampler_keys_before_training(tmp_path):
    from blip3o_fast.shapes.recipe import run_recipe

    with pytest.raises(ValueError, match=r"\[sampler\]: unknown keys \['guidance'\]"):
        run_recipe(RECIPE, tmp_path, quick=True, overrides=["sampler.guidance=5.0"], log=lambda msg: None)
    assert not (tmp_path / "data").exists()


def test_quick_recipe_end_to_end(tmp_path):
    from blip3o_fast import BLIP3o
    from blip3o_fast.data import GENERATION, WebDataset
    from blip3o_fast.shapes.recipe import run_recipe, write_initial_model

    run = tmp_path / "run"
    report = run_recipe(RECIPE, run, quick=True, log=lambda msg: None)
    assert set(report["seconds"]) == {"data", "autoencoder", "precompute", "tower", "backbone", "generation",
                                      "pixel_decoder", "assemble", "reconstruction_scores"}
    # The generation stage's targets ([generation.objective] targets = "precomputed"): each training sample's
    # autoencoder tokens, with its caption.
    ae = ShapesAutoencoder.from_pretrained(run / "autoencoder")
    sample = next(iter(WebDataset(str(run / "data" / "train_targets" / "*.tar"), tasks=(GENERATION,),
                                  shuffle_shards=False, decode_target_image=False)))
    source = next(iter(WebDataset(str(run / "data" / "train" / "*.tar"), tasks=(GENERATION,), shuffle_shards=False)))
    assert sample.caption == source.caption
    torch.testing.assert_close(sample.target, ae.encode(image_to_tensor(source.image)[None])[0])
    # [tower] pretrained the initial model's vision tower in place: it differs from a freshly written one.
    fresh = BLIP3o.from_pretrained(write_initial_model(report["recipe"], tmp_path / "fresh"))
    pretrained = BLIP3o.from_pretrained(run / "init")
    fresh_tower, tower = fresh.network.visual.state_dict(), pretrained.network.visual.state_dict()
    assert not all(torch.equal(fresh_tower[k], tower[k]) for k in tower)
    assert fresh.network.model.embed_tokens.weight.equal(pretrained.network.model.embed_tokens.weight)
    assert report["reconstruction"]["ground_truth"] == 1.0
    assert json.loads((run / "recipe.json").read_text())["quick"] is True
    model = BLIP3o.from_pretrained(run / "model")
    # The generation stage trained the queries and DiT on the backbone stage's frozen backbone.
    understanding = BLIP3o.from_pretrained(next((run / "backbone").glob("checkpoint-*")) / "model")
    before, after = understanding.network.state_dict(), model.network.state_dict()
    assert not torch.equal(before["model.latent_queries"], after["model.latent_queries"])
    frozen = [k for k in after if not k.startswith(("model.dit.", "model.latent_queries"))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    dit_overrides = report["recipe"]["generation"]["model"]["dit_overrides"]
    assert (model.config.dit.patch_size, model.config.dit.rope_theta) == (dit_overrides["patch_size"],
                                                                          dit_overrides["rope_theta"])
    assert report["backbone_loss"]["gen_loss"]["last"] == 0 and report["generation_loss"]["text_loss"]["last"] == 0
    assert isinstance(model.pixel_decoder, FeatureFlowDecoder)
    assert model.image_processor.min_pixels == report["recipe"]["init"]["min_pixels"]  # [init] reached the model
    assert model.config.feature_dim == report["recipe"]["autoencoder"]["dim"]
    assert model.config.guidance_scale == report["recipe"]["sampler"]["guidance_scale"]  # [sampler] reached it
    images = model.generate_image(["a red circle", "two blue squares"], num_steps=2, seed=[0, 1])
    assert [im.size for im in images] == [(64, 64)] * 2
    again = model.generate_image(["a red circle"], num_steps=2, seed=0)
    # Batch equals single up to one uint8 step (conv kernels may round differently at another batch size).
    diff = (torch.tensor(list(again[0].tobytes())) - torch.tensor(list(images[0].tobytes()))).abs().max()
    assert diff <= 1
    answers = model.generate_text(["What colour is the circle?"], images=[[images[0]]], max_new_tokens=4)
    assert len(answers) == 1 and isinstance(answers[0], str)


def test_quick_recipe_with_online_targets(tmp_path):
    from blip3o_fast import BLIP3o
    from blip3o_fast.shapes.recipe import run_recipe

    report = run_recipe(RECIPE, tmp_path, quick=True, log=lambda msg: None,
                        overrides=['generation.objective.targets="online"'])
    assert "precompute" not in report["seconds"] and not (tmp_path / "data" / "train_targets").exists()
    assert report["generation_loss"]["gen_loss"]["last"] > 0
    ae = ShapesAutoencoder.from_pretrained(tmp_path / "autoencoder")
    assert BLIP3o.from_pretrained(tmp_path / "model").config.dit.in_channels == ae.cfg.dim
