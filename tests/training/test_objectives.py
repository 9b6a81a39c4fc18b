"""Unit checks of the training pieces: sigma grid, keyed draws, losses, schedule, config, prompt
encoding and labels, positions, trainable sets."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from blip3o_fast.data.samples import GenerationSample, UnderstandingSample
from blip3o_fast.models.mrope import rope_index
from blip3o_fast.training.batches import IGNORE, Collator, SampleEncoder
from blip3o_fast.training.config import load_config
from blip3o_fast.training.model import TrainingModule, load_model, set_trainable
from blip3o_fast.training.objectives import draw_flow, flow_matching_loss, sample_generator, train_sigmas
from blip3o_fast.training.schedule import learning_rate, warmup_steps
from training_data import square


@pytest.fixture(scope="module")
def qwen():
    return load_model("tiny:qwen2_5_vl", seed=0)


def _encoder(model, **kw):
    vision = model.config.vision
    return SampleEncoder(model.tokenizer, model.token_ids, model.image_processor, model.config.n_query, 256,
                         merge_size=vision.spatial_merge_size if vision else 2, **kw)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_sigma_grid_is_the_schedulers(shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    ours = train_sigmas(1000, shift)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, sched.sigmas.float(), rtol=0, atol=0)
    torch.testing.assert_close(ours * 1000, sched.timesteps.float(), rtol=1e-7, atol=1e-4)


def test_draws_are_keyed_and_index_the_grid():
    sig = train_sigmas(1000, 1.0)
    a = draw_flow(sample_generator(5, 3, "k"), (4, 2), sig, "uniform", 0.1)
    b = draw_flow(sample_generator(5, 3, "k"), (4, 2), sig, "uniform", 0.1)
    c = draw_flow(sample_generator(5, 4, "k"), (4, 2), sig, "uniform", 0.1)
    assert a.sigma == b.sigma and a.keep == b.keep and torch.equal(a.noise, b.noise)
    assert not torch.equal(a.noise, c.noise)
    g = sample_generator(5, 3, "k")
    u = float(torch.rand((), generator=g))
    assert a.sigma == float(sig[int(u * 1000)])
    # Condition dropout rate and logit-normal concentration, over many keys.
    draws = [draw_flow(sample_generator(0, 0, str(i)), (1,), sig, "logit_normal", 0.1) for i in range(2000)]
    dropped = sum(not d.keep for d in draws) / len(draws)
    assert 0.07 < dropped < 0.13
    mid = sum(0.25 < d.sigma < 0.75 for d in draws) / len(draws)
    assert mid > 0.6  # uniform would give 0.5


def test_flow_matching_loss_is_the_velocity_mse():
    torch.manual_seed(0)
    calls = {}

    def fake_dit(x, t, cond):
        calls["x"], calls["t"], calls["cond"] = x, t, cond
        return x * 0.5 + cond.mean((1, 2))[:, None, None, None]

    x0, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    cond = torch.randn(3, 5, 6)
    sigma = torch.tensor([0.1, 0.5, 0.9])
    keep = torch.tensor([True, False, True])
    loss = flow_matching_loss(fake_dit, x0, cond, sigma, keep, noise)
    x_t = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * noise
    torch.testing.assert_close(calls["x"], x_t)
    torch.testing.assert_close(calls["t"], sigma * 1000)
    assert torch.all(calls["cond"][1] == 0) and torch.equal(calls["cond"][0], cond[0])
    pred = fake_dit(x_t, sigma * 1000, cond * keep[:, None, None])
    expected = ((pred - (noise - x0)) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(loss.mean(), F.mse_loss(pred, noise - x0))


def test_schedules_match_transformers():
    from transformers import get_scheduler

    p = torch.nn.Parameter(torch.zeros(1))
    for name, kwargs, ours in [
        ("cosine_with_min_lr", {"scheduler_specific_kwargs": {"min_lr": 1e-5}}, dict(schedule="cosine_with_min_lr", min_lr=1e-5)),
        ("cosine", {}, dict(schedule="cosine")),
    ]:
        opt = torch.optim.AdamW([p], lr=1e-4)
        warm = warmup_steps(1000, 0.003)
        assert warm == 3
        sched = get_scheduler(name, opt, num_warmup_steps=warm, num_training_steps=1000, **kwargs)
        for step in range(1000):
            got = learning_rate(step, lr=1e-4, total_steps=1000, warmup=warm, **ours)
            assert math.isclose(got, opt.param_groups[0]["lr"], rel_tol=1e-9, abs_tol=1e-15), (name, step)
            opt.step()
            sched.step()


def test_config_file_and_overrides(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[model]\nsource = "tiny:llama3"\n[data]\ngeneration = ["a.tar"]\n[optim]\nlr = 1\n')
    cfg = load_config(f, ["train.max_steps=7", "optim.betas=[0.9, 0.95]", "train.output_dir=/tmp/x",
                          "model.dit_overrides={in_channels = 4}"])
    assert cfg.model.source == "tiny:llama3" and cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.train.max_steps == 7 and cfg.optim.betas == [0.9, 0.95] and cfg.train.output_dir == "/tmp/x"
    assert cfg.model.dit_overrides == {"in_channels": 4}
    with pytest.raises(ValueError, match="optim.lrr"):
        load_config(f, ["optim.lrr=1"])
    with pytest.raises(TypeError, match="train.max_steps"):
        load_config(f, ["train.max_steps=1.5"])
    with pytest.raises(ValueError, match="objective.generation"):
        load_config(f, ["objective.generation=diffusion"])
    with pytest.raises(ValueError, match="needs data.understanding"):
        load_config(f, ["objective.text=true"])


def test_generation_prompts(qwen):
    sample = GenerationSample("k", "a red square", target=torch.zeros(64, 32))
    ids = _encoder(qwen).generation(sample).ids
    text = qwen.tokenizer.decode(ids)
    assert text.endswith("a red square<|im_end|>\n<|im_start|>assistant\n<|im_end|>\n[IMG]")  # spec 2.5, training
    inference = _encoder(qwen, generation_prompt="inference").generation(sample).ids
    assert qwen.tokenizer.decode(inference).endswith("<|im_start|>assistant\n[IMG]")
    # The inference prompt is exactly what generate_image_features builds before [IMG].
    assert inference[:-1] == qwen._generation_ids("a red square")


def test_understanding_labels_cover_assistant_turns_only(qwen):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
        {"role": "user", "content": [{"type": "text", "text": "Where?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "in the centre"}]},
    ]
    enc = _encoder(qwen).understanding(UnderstandingSample("u", messages, [square("red", 56)]))
    tok = qwen.tokenizer
    labelled = tok.decode([t for t, lab in zip(enc.ids, enc.labels) if lab != IGNORE])
    assert labelled == "red<|im_end|>\nin the centre<|im_end|>\n"
    assert all(lab in (IGNORE, t) for t, lab in zip(enc.ids, enc.labels))
    pads = sum(t == qwen.token_ids.image_pad for t in enc.ids)
    assert pads == int(enc.grid_thw.prod()) // 4 and pads > 1  # expanded as expand_image_tokens does


def test_collate_positions_and_text_loss(qwen):
    """Generation rows get 1-D positions over prompt + queries; understanding rows the model's own
    3-D M-RoPE; the fused CE equals the CE of the model's full logits."""
    enc = _encoder(qwen)
    und = enc.understanding(UnderstandingSample("u", [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "blue, a blue square"}]}], [square("blue", 56)]))
    und2 = enc.understanding(UnderstandingSample("v", [
        {"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hello, world!"}], []))
    gen = enc.generation(GenerationSample("g", "two blue squares", target=torch.randn(64, 32)))
    batch = Collator(enc, mrope=True)([und, gen, und2])
    assert batch.num_gen == 1 and batch.keys == ["g", "u", "v"]
    n = len(gen.ids) + 64
    assert batch.position_ids[:, 0, -n:].tolist() == [list(range(n))] * 3
    ids, mask = batch.input_ids[1:], batch.attention_mask[1:]
    expected, _ = rope_index(ids, mask, und.grid_thw, qwen.token_ids.image_pad, qwen.token_ids.vision_start, 2)
    assert torch.equal(batch.position_ids[:, 1:][mask[None].expand(3, -1, -1).bool()],
                       expected[mask[None].expand(3, -1, -1).bool()])

    module = TrainingModule(qwen.network, qwen.token_ids, "clip_flow")
    hidden = qwen.network.hidden_states(ids, mask, und.pixel_values, und.grid_thw,
                                        image_token_id=qwen.token_ids.image_pad,
                                        vision_start_token_id=qwen.token_ids.vision_start)
    ours = module.text_loss(hidden, batch.labels[1:], torch.ones(2))
    logits = qwen.network.logits(hidden)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch.labels[1:, 1:].reshape(-1), reduction="sum")
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-4)
    assert batch.text_count == float((batch.labels[:, 1:] != IGNORE).sum())


@pytest.mark.parametrize("trainable", ["released", "full", "language", "dit_only"])
def test_trainable_sets_and_query_gradients(qwen, trainable):
    net = qwen.network
    set_trainable(net, trainable, "clip_flow")
    frozen_backbone = trainable not in ("full", "language")
    assert all(p.requires_grad for p in net.dit.parameters())
    assert net.model.latent_queries.requires_grad == (trainable != "dit_only")
    for name, p in [("layers", net.model.layers[0].mlp.up_proj.weight), ("embed", net.model.embed_tokens.weight)]:
        assert p.requires_grad != frozen_backbone, name
    assert all(p.requires_grad == (trainable == "full") for p in net.visual.parameters())

    enc = _encoder(qwen)
    batch = Collator(enc, mrope=True)([enc.generation(GenerationSample(k, k, target=torch.randn(64, 32))) for k in ("a red", "a blue")])
    draws = [draw_flow(sample_generator(0, 0, k), (64, 32), train_sigmas(), "uniform", 0.0) for k in batch.keys]
    batch.sigma = torch.tensor([d.sigma for d in draws])
    batch.keep = torch.ones(2, dtype=torch.bool)
    batch.noise = torch.stack([d.noise for d in draws])
    net.zero_grad(set_to_none=True)
    loss, _, _ = TrainingModule(net, qwen.token_ids, "clip_flow")(batch, 0.5, 0.0)
    loss.backward()
    queries = net.model.latent_queries.grad
    if trainable == "dit_only":
        assert queries is None
    else:  # through the frozen backbone (released) or the trained one (full)
        assert queries is not None and queries.abs().sum() > 0
    backbone = net.model.layers[0].self_attn.q_proj.weight.grad
    assert (backbone is None) == frozen_backbone
    assert net.dit.layers[0].attn1.to_q.weight.grad.abs().sum() > 0
    net.zero_grad(set_to_none=True)
    set_trainable(net, "full", "clip_flow")


def test_gradient_checkpointing_gives_the_same_gradients():
    from blip3o_fast.training.model import apply_gradient_checkpointing

    grads = []
    for checkpointing in (False, True):
        model = load_model("tiny:llama3", seed=1)
        set_trainable(model.network, "full", "clip_flow", text=True)
        if checkpointing:
            apply_gradient_checkpointing(model.network)
        enc = _encoder(model)
        und = enc.understanding(UnderstandingSample("u", [{"role": "user", "content": "Hello"},
                                                          {"role": "assistant", "content": "Hello, world!"}], []))
        gen = enc.generation(GenerationSample("g", "a red square", target=torch.randn(64, 32, generator=torch.Generator().manual_seed(0))))
        batch = Collator(enc, mrope=False)([gen, und])
        d = draw_flow(sample_generator(0, 0, "g"), (64, 32), train_sigmas(), "uniform", 0.0)
        batch.sigma, batch.keep, batch.noise = torch.tensor([d.sigma]), torch.tensor([True]), d.noise[None]
        loss, _, _ = TrainingModule(model.network, model.token_ids, "clip_flow")(batch, 1.0, 0.1)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.network.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 20
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6, msg=name)
