"""Our LLaMA 3 decoder vs transformers' LlamaForCausalLM on tiny random weights: logits, greedy
tokens, KV cache, ragged batches, sampling seeds, and the errors a text-only backbone raises."""

import pytest
import torch

from blip3o_fast.engine.text_generation import filter_logits, generate_tokens
from blip3o_fast.models.causal_lm import CausalLM
from blip3o_fast.models.config import BLIP3oConfig
from blip3o_fast.models.text_decoder import KVCache, text_inv_freq
from twin_models import EOS, PAD, llama_twins, rel_err

PROMPTS = [[5, 17, 200, 33, 9], [44, 3, 19, 301, 8, 250, 61, 90, 12, 77, 3], [402, 11]]


@pytest.fixture(scope="module")
def models():
    return llama_twins()


def left_pad(prompts):
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), PAD)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


def test_state_dict_names_match_transformers(models):
    hf, ours = models
    assert set(ours.state_dict()) == set(hf.state_dict())
    assert ours.lm_head.weight is ours.model.embed_tokens.weight


def test_llama3_inv_freq_scaling_matches_transformers(models):
    hf, ours = models
    ref = hf.model.rotary_emb.inv_freq
    assert torch.equal(text_inv_freq(ours.text_cfg), ref)
    # The tiny config exercises all three bands: kept, blended and slowed frequencies.
    plain = 1.0 / (ours.text_cfg.rope_theta ** (torch.arange(0, 16, 2).float() / 16))
    ratio = plain / ref
    assert (ratio == 1).any() and (ratio == 32).any() and ((ratio > 1) & (ratio < 32)).any()


@pytest.mark.parametrize("rope_scaling", [True, False])
def test_logits_match_transformers(rope_scaling):
    hf, ours = llama_twins(rope_scaling)
    ids = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        ref = hf(ids).logits
        out = ours(ids)
    assert out.dtype == torch.float32
    assert rel_err(out, ref) < 1e-4


def test_left_padded_batch_logits_match_transformers(models):
    hf, ours = models
    ids, mask = left_pad(PROMPTS)
    with torch.no_grad():
        out = ours(ids, attention_mask=mask)
        for i, p in enumerate(PROMPTS):
            ref = hf(torch.tensor([p])).logits[0]
            assert rel_err(out[i, -len(p):], ref) < 1e-4
    assert torch.isfinite(out).all()  # padding rows are masked, never NaN


def test_kv_cache_prefill_then_decode_equals_full_forward(models):
    _, ours = models
    ids, mask = left_pad(PROMPTS)
    with torch.no_grad():
        full_logits = ours(ids, attention_mask=mask)
        cache = KVCache.for_config(ours.text_cfg, len(PROMPTS), ids.shape[1])
        split = ids.shape[1] - 3
        pos = ours.positions(ids, mask, None, None, None)[0]
        h1 = ours.hidden_states(ids[:, :split], mask[:, :split], position_ids=pos[:, :split], kv_cache=cache)
        steps = [h1]
        for j in range(split, ids.shape[1]):
            step = ours.hidden_states(ids[:, j:j + 1], mask[:, :j + 1], position_ids=pos[:, j:j + 1], kv_cache=cache)
            steps.append(step)
        logits = ours.logits(torch.cat(steps, dim=1))
    for i, p in enumerate(PROMPTS):
        assert rel_err(logits[i, -len(p):], full_logits[i, -len(p):]) < 1e-5
    with pytest.raises(ValueError, match="max_len"):
        ours.hidden_states(ids[:, :1], position_ids=pos[:, :1], kv_cache=cache)


def test_greedy_tokens_match_transformers_generate(models):
    hf, ours = models
    got = generate_tokens(ours, PROMPTS, None, max_new_tokens=32, eos_token_ids=[EOS], pad_token_id=PAD)
    for p, tokens in zip(PROMPTS, got):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=32, do_sample=False, eos_token_id=EOS, pad_token_id=PAD)
        ref = ref[0, len(p):].tolist()
        ref = ref[:ref.index(EOS)] if EOS in ref else ref
        assert tokens == ref
    assert max(map(len, got)) > 0


def test_batched_generation_equals_one_by_one(models):
    _, ours = models
    kw = dict(max_new_tokens=32, eos_token_ids=[EOS], pad_token_id=PAD)
    batched = generate_tokens(ours, PROMPTS, None, **kw)
    assert batched == [generate_tokens(ours, [p], None, **kw)[0] for p in PROMPTS]


def test_seeded_sampling_is_independent_of_the_batch(models):
    _, ours = models
    kw = dict(max_new_tokens=12, temperature=0.9, top_k=50, top_p=0.95, eos_token_ids=[EOS], pad_token_id=PAD)
    batched = generate_tokens(ours, PROMPTS, None, seeds=[1, 2, 3], **kw)
    alone = [generate_tokens(ours, [p], None, seeds=[s], **kw)[0] for p, s in zip(PROMPTS, [1, 2, 3])]
    assert batched == alone
    assert generate_tokens(ours, PROMPTS[:1], None, seeds=[1], **kw)[0] == alone[0]  # reproducible
    greedy = generate_tokens(ours, PROMPTS[:1], None, max_new_tokens=12, eos_token_ids=[EOS], pad_token_id=PAD)
    assert generate_tokens(ours, PROMPTS[:1], None, seeds=[1], **{**kw, "temperature": 0.0}) == greedy


def test_filter_logits_top_k_top_p():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    assert torch.isinf(filter_logits(logits, 2, None)[0, :2]).all()
    assert torch.isfinite(filter_logits(logits, 2, None)[0, 2:]).all()
    probs = logits.softmax(-1)[0]  # 0.032, 0.087, 0.237, 0.644
    kept = torch.isfinite(filter_logits(logits, None, float(probs[3] + probs[2] - 0.01)))[0]
    assert kept.tolist() == [False, False, True, True]
    assert torch.isfinite(filter_logits(logits, None, 0.1))[0].tolist() == [False, False, False, True]


def test_images_to_llama3_backbone_raise(models):
    from PIL import Image

    from blip3o_fast.models.image_processing import QwenImageProcessor

    _, ours = models
    with pytest.raises(ValueError, match="no vision tower"):
        ours.embed(torch.tensor([[5, 6]]), torch.zeros(4, 1176), torch.tensor([[1, 2, 2]]), image_token_id=6)
    with pytest.raises(ValueError, match="no vision tower"):
        generate_tokens(ours, [[5, 6]], [[Image.new("RGB", (56, 56))]], processor=QwenImageProcessor(),
                        image_token_id=6, max_new_tokens=2, eos_token_ids=[EOS], pad_token_id=PAD)
    with pytest.raises(ValueError, match="vision tower needs the qwen"):
        CausalLM(ours.text_cfg, BLIP3oConfig.tiny("qwen2_5_vl", with_decoder=False).vision)


@pytest.mark.parametrize("section, message", [(None, "needs TextConfig.mrope_section"),
                                              ([2, 3, 4], r"\[2, 3, 4\] must sum to head_dim / 2 = 8")])
def test_qwen_decoder_rejects_a_bad_mrope_section(section, message):
    import dataclasses

    from blip3o_fast.models.text_decoder import TextDecoder

    text = dataclasses.replace(BLIP3oConfig.tiny().text, mrope_section=section)
    with pytest.raises(ValueError, match=message):
        TextDecoder(text)
