"""The assembled model through its public API: round trips, batch == single, the four tasks, bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import blip3o_fast as bf
from blip3o_fast.checkpoint.safetensors_io import CheckpointError, read_weights, write_weights
from blip3o_fast.tiny import tiny_model
from blip3o_fast.tokenizer import render_chat, user_message

STEPS = 4


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def picture(seed: int, size: tuple[int, int] = (56, 84)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module", params=["qwen2_5_vl", "llama3"])
def model(request):
    return tiny_model(request.param, seed=0)


@pytest.fixture(scope="module")
def qwen():
    return tiny_model("qwen2_5_vl", seed=0)


@pytest.fixture(scope="module")
def saved(qwen, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "blip3o-tiny"
    qwen.save_pretrained(path)
    return path


def test_feature_shape_and_determinism(model):
    a = model.generate_image_features(["a red circle"], num_steps=STEPS, seed=3)
    b = model.generate_image_features(["a red circle"], num_steps=STEPS, seed=3)
    d = model.config.dit
    assert a.shape == (1, d.sample_size**2, d.in_channels)
    assert torch.equal(a, b)
    c = model.generate_image_features(["a red circle"], num_steps=STEPS, seed=4)
    assert not torch.allclose(a, c)


def test_batch_of_ragged_prompts_equals_single_calls(model):
    prompts = ["a red circle", "two blue squares at the top of the picture on the left", "hi"]
    batch = model.generate_image_features(prompts, num_steps=STEPS, seed=[1, 2, 3])
    for i, p in enumerate(prompts):
        single = model.generate_image_features([p], num_steps=STEPS, seed=i + 1)
        assert rel_err(batch[i : i + 1], single) < 1e-5, p
    texts = model.generate_text(prompts, max_new_tokens=8)
    assert texts == [model.generate_text([p], max_new_tokens=8)[0] for p in prompts]


def test_images_batch_equals_single(qwen):
    prompts = ["a red circle", "three green triangles on the right"]
    batch = qwen.generate_image(prompts, num_steps=STEPS, seed=[5, 6])
    for i, p in enumerate(prompts):
        single = qwen.generate_image([p], num_steps=STEPS, seed=5 + i)[0]
        diff = np.abs(np.asarray(batch[i], dtype=np.int16) - np.asarray(single, dtype=np.int16)).max()
        assert diff <= 1, p
    assert batch[0].size == (64, 64)


def test_noise_argument_replaces_seeded_noise(qwen):
    d = qwen.config.dit
    noise = torch.randn(2, d.sample_size**2, d.in_channels, generator=torch.Generator().manual_seed(9))
    a = qwen.generate_image_features(["x", "y"], num_steps=STEPS, noise=noise, seed=0)
    b = qwen.generate_image_features(["x", "y"], num_steps=STEPS, noise=noise, seed=123)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="noise must have shape"):
        qwen.generate_image_features(["x"], num_steps=STEPS, noise=noise)


def test_round_trip_gives_identical_outputs(model, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = bf.BLIP3o.from_pretrained(tmp_path)
    prompts = ["a red circle", "a yellow square at the bottom"]
    assert torch.equal(
        model.generate_image_features(prompts, num_steps=STEPS, seed=0),
        loaded.generate_image_features(prompts, num_steps=STEPS, seed=0),
    )
    assert model.generate_text(prompts, max_new_tokens=8) == loaded.generate_text(prompts, max_new_tokens=8)
    a = model.generate_image(prompts[:1], num_steps=STEPS, seed=0)[0]
    b = loaded.generate_image(prompts[:1], num_steps=STEPS, seed=0)[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_checkpoint_guidance_default_is_saved_and_used(tmp_path):
    model = tiny_model("qwen2_5_vl", seed=0)
    model.config.guidance_scale = 5.0
    model.save_pretrained(tmp_path)
    loaded = bf.BLIP3o.from_pretrained(tmp_path)
    assert loaded.config.guidance_scale == 5.0 and loaded.resolve_guidance(None) == 5.0

    def features(**guidance):
        return loaded.generate_image_features(["a red circle"], num_steps=STEPS, seed=0, **guidance)

    default = features()
    assert torch.equal(default, features(guidance_scale=5.0))
    assert not torch.allclose(default, features(guidance_scale=3.0))
    raw = json.loads((tmp_path / "config.json").read_text())
    del raw["blip3o_fast"]["guidance_scale"]  # a checkpoint written before the field: the release's 3.0
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert bf.BLIP3o.from_pretrained(tmp_path).config.guidance_scale == 3.0


def test_saved_layout_is_the_published_one(saved):
    raw = json.loads((saved / "config.json").read_text())
    assert raw["model_type"] == "blip3o_qwen"
    assert "text_config" not in raw and raw["rope_scaling"]["type"] == "mrope"
    keys = set(read_weights(saved))
    for key in (
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.bias",
        "model.norm.weight",
        "model.latent_queries",
        "visual.patch_embed.proj.weight",
        "visual.blocks.0.attn.qkv.weight",
        "visual.merger.mlp.0.weight",
        "model.dit.model.caption_projection.linear_1.weight",
        "model.dit.model.layers.0.attn2.to_out.0.weight",
        "model.dit.model.layers.0.gate",
        "model.dit.model.norm_out.linear_2.bias",
    ):
        assert key in keys, key
    for sub in ("unet/config.json", "vae/config.json", "scheduler/scheduler_config.json"):
        assert (saved / "diffusion-decoder" / sub).is_file(), sub
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(saved)
    assert all(t in tok.get_vocab() for t in ("[IMG]", "[/IMG]", "<image>"))


def test_dit_sizes_read_from_weights_without_our_config_key(qwen, saved, tmp_path):
    """Published configs carry no DiT sizes: they come from the weights' shapes (head_dim 64)."""
    folder = tmp_path / "published"
    shutil.copytree(saved, folder)
    raw = json.loads((folder / "config.json").read_text())
    del raw["blip3o_fast"]
    (folder / "config.json").write_text(json.dumps(raw))
    loaded = bf.BLIP3o.from_pretrained(folder)
    assert loaded.config.dit.hidden_size == qwen.config.dit.hidden_size
    assert loaded.config.dit.num_layers == qwen.config.dit.num_layers
    assert loaded.config.dit.ffn_hidden_size == qwen.config.dit.ffn_hidden_size
    assert torch.equal(
        qwen.generate_image_features(["a red circle"], num_steps=STEPS),
        loaded.generate_image_features(["a red circle"], num_steps=STEPS),
    )


def test_sharded_checkpoint_with_index_loads(qwen, saved, tmp_path):
    folder = tmp_path / "sharded"
    shutil.copytree(saved, folder)
    (folder / "model.safetensors").unlink()
    write_weights(read_weights(saved), folder, max_shard_bytes=200_000)
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("model-*.safetensors"))) > 1
    loaded = bf.BLIP3o.from_pretrained(folder)
    assert loaded.generate_text(["hello"], max_new_tokens=6) == qwen.generate_text(["hello"], max_new_tokens=6)


def test_transformers_5_key_names_load(qwen, saved, tmp_path):
    """A checkpoint written with transformers 5 names (model.language_model.*, model.visual.*)."""
    folder = tmp_path / "t5names"
    shutil.copytree(saved, folder)
    state = read_weights(saved)
    renamed = {
        ("model.language_model." + k[len("model."):] if k.startswith("model.") and not k.startswith(("model.dit.", "model.latent_queries")) else
         "model.visual." + k[len("visual."):] if k.startswith("visual.") else k): v
        for k, v in state.items()
    }
    (folder / "model.safetensors").unlink()
    write_weights(renamed, folder)
    loaded = bf.BLIP3o.from_pretrained(folder)
    assert torch.equal(
        qwen.generate_image_features(["a red circle"], num_steps=STEPS),
        loaded.generate_image_features(["a red circle"], num_steps=STEPS),
    )


def test_editing_returns_images_and_uses_the_input(qwen):
    out = qwen.edit_image([picture(0)], ["make it blue"], num_steps=STEPS, seed=0)
    assert len(out) == 1 and isinstance(out[0], Image.Image)
    two = qwen.edit_image([[picture(0), picture(1, (28, 28))]], ["combine them"], num_steps=STEPS, seed=0)
    assert len(two) == 1
    ids = render_chat(qwen.tokenizer, user_message("make it blue", 1))
    a = qwen._query_states([ids], [[picture(0)]])
    b = qwen._query_states([ids], [[picture(2)]])
    assert not torch.allclose(a, b), "the input image must change the condition"


def test_understanding_with_images(qwen):
    one = qwen.generate_text(["Describe the image."], images=[[picture(0)]], max_new_tokens=6)
    two = qwen.generate_text(["Compare."], images=[[picture(0), picture(1, (28, 56))]], max_new_tokens=6)
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    assert qwen.generate_text([conv], images=[[picture(0)]], max_new_tokens=6) == one
    assert isinstance(two[0], str)
    mixed = qwen.generate_text(["Describe the image.", "hello"], images=[[picture(0)], []], max_new_tokens=6)
    assert mixed[0] == one[0]
    assert mixed[1] == qwen.generate_text(["hello"], max_new_tokens=6)[0]


def test_stop_strings_cut_the_text(qwen):
    full = qwen.generate_text(["hello"], max_new_tokens=12)[0]
    if len(full) > 2:
        stop = full[2:4]
        assert qwen.generate_text(["hello"], max_new_tokens=12, stop=[stop])[0] == full[: full.find(stop)]


def test_sampling_seeds_are_per_request(qwen):
    a = qwen.generate_text(["hello", "a red circle"], max_new_tokens=8, temperature=1.0, seed=[7, 8])
    b = qwen.generate_text(["a red circle"], max_new_tokens=8, temperature=1.0, seed=8)
    assert a[1] == b[0]


# ---------------------------------------------------------------- bad input
def test_missing_checkpoint_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        bf.BLIP3o.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        bf.BLIP3o.from_pretrained(tmp_path)


def test_missing_and_unexpected_keys_are_listed(saved, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(saved, folder)
    state = read_weights(saved)
    del state["model.norm.weight"]
    state["model.surprise"] = torch.zeros(1)
    (folder / "model.safetensors").unlink()
    write_weights(state, folder)
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): model.norm.weight.*unexpected keys \(1\): model.surprise"):
        bf.BLIP3o.from_pretrained(folder)


def test_shape_mismatch_is_reported(saved, tmp_path):
    folder = tmp_path / "shape"
    shutil.copytree(saved, folder)
    state = read_weights(saved)
    state["model.norm.weight"] = torch.zeros(3)
    (folder / "model.safetensors").unlink()
    write_weights(state, folder)
    with pytest.raises(CheckpointError, match="model.norm.weight: checkpoint \\(3,\\)"):
        bf.BLIP3o.from_pretrained(folder)


def test_corrupt_shard_names_the_file(saved, tmp_path):
    folder = tmp_path / "corrupt"
    shutil.copytree(saved, folder)
    (folder / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        bf.BLIP3o.from_pretrained(folder)


def test_empty_prompt_list(qwen):
    for call in (qwen.generate_image_features, qwen.generate_text, qwen.generate_image):
        with pytest.raises(ValueError, match="empty"):
            call([])
    with pytest.raises(TypeError, match="wrap it in a list"):
        qwen.generate_text("hello")


def test_wrong_image_type(qwen):
    with pytest.raises(TypeError, match="PIL"):
        qwen.generate_text(["hi"], images=[[np.zeros((4, 4, 3))]])
    with pytest.raises(TypeError, match="PIL"):
        qwen.edit_image(["not an image"], ["edit"])


def test_image_to_text_only_backbone():
    llama = tiny_model("llama3")
    with pytest.raises(ValueError, match="no vision tower"):
        llama.generate_text(["hi"], images=[[picture(0)]])
    with pytest.raises(ValueError, match="no vision tower"):
        llama.edit_image([picture(0)], ["edit"])


def test_plain_transformers_llama_loads_and_generates_text(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from blip3o_fast.tokenizer import build_tiny_tokenizer

    tok = build_tiny_tokenizer("llama3")
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    hf = LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    tok.save_pretrained(tmp_path)
    model = bf.BLIP3o.from_pretrained(tmp_path)
    assert model.network.dit is None
    ids = model.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello"}], add_generation_prompt=True, tokenize=False
    )
    prompt = model.tokenizer(ids, add_special_tokens=False, return_tensors="pt")["input_ids"]
    hf_out = hf.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False, eos_token_id=[-1],
        pad_token_id=tok.pad_token_id,
    )[0]
    new = hf_out[prompt.shape[1]:].tolist()
    eos = model.token_ids.eos
    new = new[: next((i for i, t in enumerate(new) if t in eos), len(new))]
    assert model.generate_text(["hello"], max_new_tokens=8)[0] == model.tokenizer.decode(new, skip_special_tokens=True)
    with pytest.raises(ValueError, match="no DiT"):
        model.generate_image_features(["a red circle"])


def test_plain_transformers_qwen2_5_vl_loads_with_images(tmp_path):
    """A transformers-5 Qwen2.5-VL folder (nested text_config, rope_parameters, model.language_model.*)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from blip3o_fast.models.image_processing import QwenImageProcessor
    from blip3o_fast.tokenizer import build_tiny_tokenizer

    tok = build_tiny_tokenizer("qwen2_5_vl")
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in (
        ("image_token_id", "<|image_pad|>"), ("vision_start_token_id", "<|vision_start|>"),
        ("vision_end_token_id", "<|vision_end|>"))}
    cfg = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        ),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           fullatt_block_indexes=[1]),
        **ids,
    )
    torch.manual_seed(0)
    hf = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    hf.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    QwenImageProcessor().save_pretrained(tmp_path)
    model = bf.BLIP3o.from_pretrained(tmp_path)
    assert model.network.dit is None and model.network.visual is not None
    state = {k.replace("model.language_model.", "model.").replace("model.visual.", "visual."): v
             for k, v in hf.state_dict().items()}
    ours = model.network.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in state.items() if k in ours)
    answer = model.generate_text(["Describe the image."], images=[[picture(0)]], max_new_tokens=6)
    assert isinstance(answer[0], str)
    with pytest.raises(ValueError, match="no DiT"):
        model.generate_image(["a red circle"])


def test_solver_is_selectable_from_the_public_api(qwen):
    euler = qwen.generate_image_features(["a red circle"], num_steps=STEPS)
    for solver in ("heun", "multistep"):
        other = qwen.generate_image_features(["a red circle"], num_steps=STEPS, solver=solver)
        assert other.shape == euler.shape and not torch.equal(other, euler)
    with pytest.raises(ValueError, match="solver"):
        qwen.generate_image_features(["a red circle"], num_steps=STEPS, solver="rk45")
