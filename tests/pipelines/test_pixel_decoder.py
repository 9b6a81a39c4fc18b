"""The pixel decoder's Euler CFG loop vs a loop over diffusers' EulerDiscreteScheduler (spec 5.2)."""

import shutil

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler

from blip3o_fast.models.config import tiny_pixel_decoder_config
from blip3o_fast.models.pixel_decoder import PixelDecoder, euler_schedule

FEATURE_DIM = 32
STEPS = 8


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.fixture(scope="module")
def decoder():
    return PixelDecoder.from_config(tiny_pixel_decoder_config(FEATURE_DIM), seed=0)


def features(b: int, seed: int) -> torch.Tensor:
    return torch.randn(b, 64, FEATURE_DIM, generator=torch.Generator().manual_seed(seed))


def diffusers_loop(dec: PixelDecoder, feats, negative, seeds, steps, guidance):
    """The released pipeline's loop: cond-first doubled batch, scale_model_input, scheduler.step."""
    sched = EulerDiscreteScheduler(**dec.cfg.scheduler)
    sched.set_timesteps(steps)
    size = dec.unet.config.sample_size
    latents = torch.cat(
        [torch.randn((1, 4, size, size), generator=torch.Generator("cpu").manual_seed(s)) for s in seeds]
    ) * sched.init_noise_sigma
    px = size * dec.vae_scale_factor
    embeds = torch.cat([feats, negative.expand_as(feats)])
    added = {"text_embeds": embeds.mean(1), "time_ids": torch.tensor([[px, px, 0, 0, px, px]] * embeds.shape[0]).float()}
    with torch.no_grad():
        for t in sched.timesteps:
            inp = sched.scale_model_input(torch.cat([latents, latents]), t)
            eps = dec.unet(inp, t, encoder_hidden_states=embeds, added_cond_kwargs=added).sample
            eps_c, eps_u = eps.chunk(2)
            latents = sched.step(eps_u + guidance * (eps_c - eps_u), t, latents).prev_sample
        images = (dec.vae.decode(latents / dec.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    return latents, images


def test_schedule_equals_diffusers(decoder):
    for steps in (1, STEPS, 50):
        sched = EulerDiscreteScheduler(**decoder.cfg.scheduler)
        sched.set_timesteps(steps)
        timesteps, sigmas, init_sigma = euler_schedule(decoder._scheduler_json, steps)
        assert torch.equal(timesteps, sched.timesteps)
        torch.testing.assert_close(sigmas, sched.sigmas, rtol=1e-6, atol=0)
        assert init_sigma == pytest.approx(float(sched.init_noise_sigma), rel=1e-6)


def test_euler_cfg_loop_matches_diffusers(decoder):
    feats, negative = features(2, 1), features(1, 2)
    want_lat, want_img = diffusers_loop(decoder, feats, negative, [3, 4], STEPS, 3.0)
    got_lat = decoder.sample_latents(feats, negative, num_steps=STEPS, guidance_scale=3.0, seeds=[3, 4])
    got_img = decoder.decode_latents(got_lat)
    assert got_img.shape == (2, 3, 64, 64)
    assert rel_err(got_lat, want_lat) < 1e-4
    assert rel_err(got_img, want_img) < 1e-4
    pil = decoder.decode(feats, negative, num_steps=STEPS, guidance_scale=3.0, seeds=[3, 4])
    assert [im.size for im in pil] == [(64, 64), (64, 64)]
    assert np.array_equal(np.asarray(pil[1]), (got_img[1].permute(1, 2, 0).numpy() * 255).round().astype("uint8"))


def test_batch_equals_single(decoder):
    feats, negative = features(3, 5), features(1, 6)
    batch = decoder.sample_latents(feats, negative, num_steps=4, seeds=[7, 8, 7])
    for i, s in enumerate([7, 8, 7]):
        one = decoder.sample_latents(feats[i : i + 1], negative, num_steps=4, seeds=[s])
        assert rel_err(batch[i : i + 1], one) < 1e-5


def test_save_then_load_gives_identical_images(decoder, tmp_path):
    feats, negative = features(1, 9), features(1, 10)
    want = decoder.decode(feats, negative, num_steps=3, seeds=[1])
    decoder.save_pretrained(tmp_path / "dec")
    for name in ("model_index.json", "unet/config.json", "vae/config.json", "scheduler/scheduler_config.json",
                 "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        assert (tmp_path / "dec" / name).is_file(), name
    loaded = PixelDecoder.from_pretrained(tmp_path / "dec")
    assert np.array_equal(np.asarray(loaded.decode(feats, negative, num_steps=3, seeds=[1])[0]), np.asarray(want[0]))
    # The published checkpoint names its UNet weights with the bf16 variant.
    unet = tmp_path / "dec" / "unet"
    (unet / "diffusion_pytorch_model.safetensors").rename(unet / "diffusion_pytorch_model.bf16.safetensors")
    loaded = PixelDecoder.from_pretrained(tmp_path / "dec")
    assert np.array_equal(np.asarray(loaded.decode(feats, negative, num_steps=3, seeds=[1])[0]), np.asarray(want[0]))


def test_missing_files_are_named(decoder, tmp_path):
    decoder.save_pretrained(tmp_path / "dec")
    shutil.rmtree(tmp_path / "dec" / "vae")
    with pytest.raises(FileNotFoundError, match=r"vae/config\.json"):
        PixelDecoder.from_pretrained(tmp_path / "dec")
    decoder.save_pretrained(tmp_path / "dec")
    (tmp_path / "dec" / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model"):
        PixelDecoder.from_pretrained(tmp_path / "dec")
    decoder.save_pretrained(tmp_path / "dec")
    (tmp_path / "dec" / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"scheduler/scheduler_config\.json"):
        PixelDecoder.from_pretrained(tmp_path / "dec")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PixelDecoder.from_pretrained(tmp_path / "nowhere")


def test_bad_inputs_name_the_problem(decoder):
    with pytest.raises(ValueError, match="negative_features"):
        decoder.decode(features(2, 1), features(3, 2), num_steps=1, seeds=[1, 2])
    with pytest.raises(ValueError, match="one seed per request"):
        decoder.decode(features(2, 1), features(1, 2), num_steps=1, seeds=[1])
