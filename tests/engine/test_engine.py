"""The paged-KV continuous-batching engine: tokens and logprobs vs transformers generate (LLaMA 3,
Qwen2.5-VL with 0, 1 and 2 images), batch == alone, requests joining mid-flight, preemption under a
tiny cache, budget errors, abort, stop strings, streaming, and the block allocator."""

import copy

import numpy as np
import pytest
import torch

from blip3o_fast import ops
from blip3o_fast.engine.engine import Engine, _TextStream
from blip3o_fast.engine.paged_kv_cache import BlockAllocator, OutOfBlocks, PagedKVCache
from blip3o_fast.engine.text_generation import expand_image_tokens
from blip3o_fast.models.causal_lm import CausalLM
from blip3o_fast.tiny import tiny_model
from blip3o_fast.tokenizer import TokenIds
from twin_models import EOS, IMAGES, IMG, PAD, PROC, VE, VS, llama_twins, qwen_twins, randomize

transformers = pytest.importorskip("transformers")

IDS = TokenIds(img=None, query=None, image_pad=IMG, vision_start=VS, vision_end=VE, pad=PAD, eos=(EOS,))
PROMPTS = [[5, 17, 200, 33, 9], [44, 3, 19, 301, 8, 250, 61, 90, 12, 77, 3], [402, 11], list(range(20, 57))]
NEW = 24


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a loaded machine OpenMP waits cost 100x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def llama():
    return llama_twins()


@pytest.fixture(scope="module")
def qwen():
    return qwen_twins()


def image_prompt(n_images: int) -> list[int]:
    """Text, then each image as <vision_start><image_pad><vision_end> and more text; expanded."""
    ids = [5, 17, 200]
    for k in range(n_images):
        ids += [VS, IMG, VE, 30 + k, 41]
    ids += [9, 33]
    return expand_image_tokens(ids, PROC(IMAGES[:n_images])[1], IMG) if n_images else ids


def engine(lm, kv_bytes=1 << 20, **kw) -> Engine:
    return Engine(lm, kv_cache_bytes=kv_bytes, image_processor=PROC, token_ids=IDS, **kw)


def run(lm, requests, **kw):
    eng = engine(lm, **kw)
    outs = eng.generate(requests)
    assert eng.cache.allocator.num_used == 0 and not eng.cache.tables  # nothing leaks
    return outs, eng


def hf_generate(hf, ids, new=NEW, images=None):
    input_ids = torch.tensor([ids])
    kw = {}
    if images:
        kw["pixel_values"], kw["image_grid_thw"] = PROC(images)
        kw["mm_token_type_ids"] = (input_ids == IMG).int()
    out = hf.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new, do_sample=False,
                      eos_token_id=EOS, pad_token_id=PAD, output_logits=True, return_dict_in_generate=True, **kw)
    tokens = out.sequences[0, len(ids):].tolist()
    tokens = tokens[:tokens.index(EOS)] if EOS in tokens else tokens
    logprobs = [out.logits[i][0].float().log_softmax(-1)[t].item() for i, t in enumerate(tokens)]
    return tokens, logprobs


# ---------------------------------------------------------------- vs transformers
def test_llama_greedy_tokens_and_logprobs_match_transformers(llama):
    hf, ours = llama
    outs, _ = run(ours, [dict(prompt=p, max_new_tokens=NEW, logprobs=True) for p in PROMPTS])
    for p, out in zip(PROMPTS, outs):
        tokens, logprobs = hf_generate(hf, p)
        assert out.token_ids == tokens
        assert out.finish_reason == ("eos" if len(tokens) < NEW else "length")
        assert np.abs(np.array(out.logprobs) - np.array(logprobs)).max() < 1e-4
    assert sum(len(o.token_ids) for o in outs) > 2 * NEW


def test_qwen_greedy_tokens_and_logprobs_match_transformers_with_0_1_2_images(qwen):
    hf, ours = qwen
    cases = [(PROMPTS[1], []), (image_prompt(1), IMAGES[:1]), (image_prompt(2), IMAGES), (PROMPTS[0], [])]
    outs, _ = run(ours, [dict(prompt=p, images=imgs, max_new_tokens=NEW, logprobs=True) for p, imgs in cases])
    for (p, imgs), out in zip(cases, outs):
        tokens, logprobs = hf_generate(hf, p, images=imgs)
        assert out.token_ids == tokens
        assert np.abs(np.array(out.logprobs) - np.array(logprobs)).max() < 1e-4
    # One image-pad per image is expanded by the engine itself.
    short = [5, 17, 200, VS, IMG, VE, 30, 41, 9, 33]
    again, _ = run(ours, [dict(prompt=short, images=IMAGES[0], max_new_tokens=NEW)])
    assert again[0].token_ids == outs[1].token_ids


def test_bf16_logprobs_close_to_transformers(llama):
    """bf16 logprobs within 5e-2 of transformers' fp32 ones, and within 2x transformers' own bf16 error
    (DESIGN.md): two bf16 implementations that round differently can each be that far from fp32."""
    hf32, ours32 = llama
    hf = transformers.LlamaForCausalLM(hf32.config).eval()
    hf.load_state_dict(hf32.state_dict())
    hf.to(torch.bfloat16)
    ours = CausalLM(ours32.text_cfg).eval()
    ours.load_state_dict(ours32.state_dict())
    ours.to(torch.bfloat16)
    outs, eng = run(ours, [dict(prompt=p, max_new_tokens=NEW, logprobs=True) for p in PROMPTS[:2]])
    assert eng.cache.kv.dtype == torch.bfloat16
    for p, out in zip(PROMPTS, outs):
        # Teacher-forced on our tokens: bf16 rounding may legitimately flip a near-tie greedy choice.
        seq = torch.tensor([p + out.token_ids])
        chosen = torch.tensor(out.token_ids)[:, None]
        with torch.no_grad():
            ref32, ref16 = (m(seq).logits[0, len(p) - 1:-1].float().log_softmax(-1).gather(-1, chosen)[:, 0]
                            for m in (hf32, hf))
        err = (torch.tensor(out.logprobs) - ref32).abs().max()
        assert err < 5e-2
        assert err <= 2 * (ref16 - ref32).abs().max()


# ---------------------------------------------------------------- batching
SAMPLED = dict(temperature=0.9, top_k=50, top_p=0.95)


def mixed_requests():
    reqs = [dict(prompt=p, max_new_tokens=NEW) for p in PROMPTS]
    reqs[1].update(SAMPLED, seed=1)
    reqs[3].update(SAMPLED, seed=2, top_k=None)
    return reqs


def test_mixed_length_batch_equals_one_by_one(llama):
    _, ours = llama
    reqs = mixed_requests()
    batched, _ = run(ours, reqs)
    alone = [run(ours, [r])[0][0] for r in reqs]
    assert [o.token_ids for o in batched] == [o.token_ids for o in alone]
    again, _ = run(ours, reqs[1:2])
    assert again[0].token_ids == alone[1].token_ids  # seeded sampling reproduces


def test_padded_decode_buckets_equal_the_live_batch(llama):
    """Fixed-shape decode (what a CUDA graph replays) pads the batch with rows that write nothing
    and attend to nothing; forced here on the CPU, the results must not change."""
    _, ours = llama
    reqs = mixed_requests()
    live, _ = run(ours, reqs)
    padded, eng = run(ours, reqs, decode_buckets=(2, 8))
    assert eng.runner.buckets == (2, 8, 32)
    assert [o.token_ids for o in padded] == [o.token_ids for o in live]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph capture needs a CUDA device")
@pytest.mark.parametrize("backbone", ["llama", "qwen"])  # qwen: the M-RoPE tables are built inside the graph
def test_cuda_graph_decode_equals_eager(backbone, request):
    _, ours = request.getfixturevalue(backbone)
    gpu = copy.deepcopy(ours).cuda()
    reqs = mixed_requests()
    eager, _ = run(gpu, reqs, cuda_graphs=False)
    graphed, eng = run(gpu, reqs, cuda_graphs=True)
    assert eng.runner._graphs  # decode ran as graph replays
    assert [o.token_ids for o in graphed] == [o.token_ids for o in eager]


def test_requests_joining_mid_flight_equal_alone(llama):
    _, ours = llama
    reqs = mixed_requests()
    alone = [run(ours, [r])[0][0].token_ids for r in reqs]
    eng = engine(ours, max_batch_size=3)  # the fourth request also waits for a free batch row
    got = {i: [] for i in range(len(reqs))}
    schedule = {0: [0, 1], 3: [2], 5: [3]}  # step -> requests added before it
    step = 0
    while step in schedule or eng.has_unfinished():
        for i in schedule.get(step, []):
            eng.add_request(i, **reqs[i])
        for out in eng.step():
            got[out.request_id] += out.token_ids
        step += 1
    assert [got[i] for i in range(len(reqs))] == alone
    assert eng.cache.allocator.num_used == 0


def test_tiny_cache_preempts_and_results_stay_identical(qwen):
    _, ours = qwen
    # The two-image request takes most of the pool; the sampled one joins it, and their growth
    # forces the youngest (the sampled one, mid-generation) out and back in through a re-prefill.
    reqs = [dict(prompt=image_prompt(2), images=IMAGES), dict(prompt=PROMPTS[3], **SAMPLED, seed=3),
            dict(prompt=PROMPTS[1]), dict(prompt=image_prompt(1), images=IMAGES[:1])]
    reqs = [dict(r, max_new_tokens=NEW, eos_token_ids=[]) for r in reqs]
    free, _ = run(ours, reqs)
    longest = len(reqs[0]["prompt"]) + NEW
    per_block = PagedKVCache.bytes_per_block(2, 2, 16, 4, torch.float32)
    tight, eng = run(ours, reqs, kv_bytes=(longest // 4 + 8) * per_block, block_size=4)
    assert eng.num_preemptions > 0
    assert [o.token_ids for o in tight] == [o.token_ids for o in free]


def test_budget_too_small_for_one_request_raises(llama):
    _, ours = llama
    per_block = PagedKVCache.bytes_per_block(2, 2, 16, 16, torch.float32)
    eng = engine(ours, kv_bytes=2 * per_block)  # 32 tokens
    eng.add_request("fits", PROMPTS[0], max_new_tokens=28)  # 5 + 28 - 1 = 32 cached tokens
    with pytest.raises(ValueError, match=r"'big' cannot fit in the KV cache even alone.*need 3 blocks.*gives 2 blocks.*at least 24576"):
        eng.add_request("big", PROMPTS[0], max_new_tokens=29)
    with pytest.raises(ValueError, match="holds no block"):
        engine(ours, kv_bytes=per_block - 1)


def test_bad_requests_raise(llama):
    _, ours = llama
    eng = engine(ours)
    eng.add_request("a", PROMPTS[0])
    for kwargs, match in [(dict(request_id="a", prompt=PROMPTS[1]), "already in the engine"),
                          (dict(request_id="b", prompt=[]), "empty"),
                          (dict(request_id="b", prompt=[3, 10_000]), r"must be in \[0, 512\)"),
                          (dict(request_id="b", prompt=PROMPTS[0], stop=["x"]), "need an engine with a tokenizer"),
                          (dict(request_id="b", prompt=PROMPTS[0], temperature=-1), "temperature"),
                          (dict(request_id="b", prompt=PROMPTS[0], images=IMAGES[0]), "no vision tower")]:
        with pytest.raises(ValueError, match=match):
            eng.add_request(**kwargs)
    with pytest.raises(RuntimeError, match="idle engine"):
        eng.generate([dict(prompt=PROMPTS[1])])


def test_abort_frees_blocks(llama):
    _, ours = llama
    eng = engine(ours, max_batch_size=2)
    for i, p in enumerate(PROMPTS[:3]):
        eng.add_request(i, p, max_new_tokens=NEW, eos_token_ids=[])
    eng.step()
    eng.step()
    used = eng.cache.allocator.num_used
    eng.abort(0)  # running
    eng.abort(2)  # still waiting
    assert eng.cache.allocator.num_used < used and 0 not in [s.request_id for s in eng.running]
    outs = eng.step()
    assert {(o.request_id, o.finish_reason) for o in outs if o.finished} == {(0, "aborted"), (2, "aborted")}
    with pytest.raises(KeyError):
        eng.abort(0)
    while eng.has_unfinished():
        eng.step()
    assert eng.cache.allocator.num_used == 0 and not eng.cache.tables


def test_eos_list_and_zero_new_tokens(llama):
    _, ours = llama
    full, _ = run(ours, [dict(prompt=PROMPTS[1], max_new_tokens=NEW, eos_token_ids=[])])
    tokens = full[0].token_ids
    extra = tokens[5]
    cut, _ = run(ours, [dict(prompt=PROMPTS[1], max_new_tokens=NEW, eos_token_ids=[EOS, extra]),
                        dict(prompt=PROMPTS[0], max_new_tokens=0)])
    assert cut[0].token_ids == tokens[:tokens.index(extra)] and cut[0].finish_reason == "eos"
    assert cut[1].token_ids == [] and cut[1].finish_reason == "length"


# ---------------------------------------------------------------- text: stop strings, streaming
@pytest.fixture(scope="module")
def chat_model():
    model = tiny_model("qwen2_5_vl", seed=0)
    randomize(model.network, 1)  # varied text instead of the toy model's repeated newlines
    return model


def test_stop_strings_and_streaming(chat_model):
    eng = Engine.from_model(chat_model, kv_cache_bytes=1 << 20)
    req = dict(prompt=[{"role": "user", "content": "Describe the image."}], max_new_tokens=40, eos_token_ids=[])
    full = eng.generate([req])[0]
    assert full.text == chat_model.tokenizer.decode(full.token_ids, skip_special_tokens=True)
    assert len(full.text) > 8
    deltas = list(eng.stream(req))
    assert "".join(deltas) == full.text and len(deltas) > 1
    stop = full.text[5:8]
    cut = eng.generate([{**req, "stop": [stop, "never appears"]}])[0]
    assert cut.text == full.text[:full.text.find(stop)] and cut.finish_reason == "stop"
    assert "".join(eng.stream({**req, "stop": [stop]})) == cut.text
    stream = eng.stream(req)
    next(stream)
    stream.close()  # closing early aborts the request
    assert not eng.has_unfinished() and eng.cache.allocator.num_used == 0


def test_text_stream_never_splits_a_character_and_holds_back_stop_prefixes(chat_model):
    tok = chat_model.tokenizer
    text = "caf\u00e9 \u2615 d\u00e9j\u00e0 vu, the end"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text) // 2
    stream = _TextStream(tok, [])
    deltas = [stream.push([i])[0] for i in ids] + [stream.finish()[0]]
    assert all("\ufffd" not in d for d in deltas) and "".join(deltas) == text
    stream = _TextStream(tok, ["vu, the"])
    deltas, stopped = [], False
    for i in ids:
        delta, stopped = stream.push([i])
        deltas.append(delta)
        if stopped:
            break
    assert stopped and "".join(deltas) == "caf\u00e9 \u2615 d\u00e9j\u00e0 "


# ---------------------------------------------------------------- cache pieces
def test_block_allocator_allocate_release_reuse():
    alloc = BlockAllocator(4)
    a = alloc.allocate(3)
    assert a == [0, 1, 2] and alloc.num_free == 1
    with pytest.raises(OutOfBlocks):
        alloc.allocate(2)
    alloc.free([1])
    assert alloc.allocate(2) == [1, 3]  # freed blocks are reused
    with pytest.raises(ValueError, match="not allocated"):
        alloc.free([5])
    alloc.free([0, 1, 2, 3])
    with pytest.raises(ValueError, match="double free"):
        alloc.free([0])
    assert alloc.num_free == 4 and alloc.num_used == 0


def test_cache_budget_reserve_and_release():
    per_block = PagedKVCache.bytes_per_block(3, 2, 8, 4, torch.float32)
    assert per_block == 2 * 3 * 4 * 2 * 8 * 4
    cache = PagedKVCache.from_budget(5 * per_block + per_block // 2, 3, 2, 8, 4)
    assert cache.num_blocks == 5 and cache.nbytes == 5 * per_block
    cache.reserve("a", 9)  # 3 blocks
    assert cache.tables["a"] == [0, 1, 2]
    assert not cache.can_reserve("b", 9)
    with pytest.raises(OutOfBlocks):
        cache.reserve("b", 9)
    assert "b" not in cache.tables and cache.allocator.num_free == 2
    cache.reserve("a", 12)  # still 3 blocks
    assert cache.slots("a", 3, 5).tolist() == [3, 4]
    cache.release("a")
    assert cache.allocator.num_free == 5 and not cache.tables


def test_paged_decode_and_varlen_prefill_attention_agree_through_the_cache():
    g = torch.Generator().manual_seed(0)
    heads, kvh, d, bs = 6, 2, 8, 4
    lens = [5, 1, 11, 5]  # two of the same length share one batched prefill call
    cache = PagedKVCache(1, kvh, d, num_blocks=12, block_size=bs)
    cache.reserve("pad", 3)  # sequences get non-contiguous, shuffled blocks
    ks, vs = [], []
    for i, n in enumerate(lens):
        cache.reserve(i, n)
        k, v = torch.randn(n, kvh, d, generator=g), torch.randn(n, kvh, d, generator=g)
        cache.write(0, k, v, cache.slots(i, 0, n))
        ks.append(k)
        vs.append(v)
    tables = torch.zeros(4, 5, dtype=torch.int32)
    for i in range(4):
        tables[i, :len(cache.tables[i])] = torch.tensor(cache.tables[i])
    q = torch.randn(4, heads, d, generator=g)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    out = ops.paged_decode_attention(q, cache.key_cache(0), cache.value_cache(0), tables, seq_lens)
    for i in range(4):
        k, v = ks[i].repeat_interleave(heads // kvh, 1), vs[i].repeat_interleave(heads // kvh, 1)
        w = torch.einsum("hd,nhd->hn", q[i], k) / d**0.5
        ref = torch.einsum("hn,nhd->hd", w.softmax(-1), v)
        assert (out[i] - ref).abs().max() < 1e-5
    # Prefill: the last query of each packed sequence sees exactly what decode sees.
    qs = [torch.randn(n, heads, d, generator=g) for n in lens]
    cu = torch.tensor([0, 5, 6, 17, 22], dtype=torch.int32)
    packed = ops.varlen_prefill_attention(torch.cat(qs), torch.cat(ks), torch.cat(vs), cu, max(lens))
    last = ops.paged_decode_attention(torch.stack([x[-1] for x in qs]), cache.key_cache(0), cache.value_cache(0),
                                      tables, seq_lens)
    assert (packed[cu[1:].long() - 1] - last).abs().max() < 1e-5
