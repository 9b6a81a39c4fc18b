import json
from collections import Counter

import pytest

from blip3o_fast.data import ConversationDataset, GenerationSample, Mixture, ResumableLoader, WebDataset
from synthetic_shards import save_png, understanding_turns, write_jsonl, write_t2i_shards


def keys(samples):
    return [s.key for s in samples]


def _sources(folder, epochs=None, shards=3, per_shard=4, records=6):
    write_t2i_shards(folder, shards, per_shard)
    for i in range(records):
        save_png(folder, f"u{i}.png", i)
    write_jsonl(folder / "und.jsonl", [{"image": f"u{i}.png", "conversations": understanding_turns(f"q{i}", "a")}
                                       for i in range(records)])
    gen = WebDataset(str(folder / "shard-*.tar"), shuffle_buffer=4, seed=1, epochs=epochs)
    und = ConversationDataset(str(folder / "und.jsonl"), seed=2, epochs=epochs)
    return gen, und


def test_ratios_follow_weights(tmp_path):
    gen, und = _sources(tmp_path)
    mix = Mixture({"gen": gen, "und": und}, {"gen": 3.0, "und": 1.0}, seed=0)
    it = iter(mix)
    drawn = [next(it) for _ in range(800)]
    generated = [s.key for s in drawn if isinstance(s, GenerationSample)]
    assert abs(len(generated) / len(drawn) - 0.75) < 0.06  # binomial sd 0.015: a 4-sd bound
    # each source keeps its own order: the generation samples are the WebDataset's stream as it is alone
    alone = iter(WebDataset(str(tmp_path / "shard-*.tar"), shuffle_buffer=4, seed=1, epochs=None))
    assert generated == [next(alone).key for _ in generated]


def test_mixture_is_seeded(tmp_path):
    def run(seed):
        gen, und = _sources(tmp_path, epochs=1)
        return keys(Mixture([gen, und], [1, 1], seed=seed))

    a = run(0)
    assert a == run(0) and a != run(1)
    assert len(a) == 12 + 6 and len(set(a)) == 18  # finite sources: all of both, each once, then the end


def test_zero_weight_never_draws_and_bad_weights_raise(tmp_path):
    gen, und = _sources(tmp_path)
    it = iter(Mixture({"gen": gen, "und": und}, {"gen": 0.0, "und": 2.0}))
    assert not any(isinstance(next(it), GenerationSample) for _ in range(30))
    with pytest.raises(ValueError, match="weights"):
        Mixture([gen, und], [0, 0])
    with pytest.raises(ValueError, match="2 sources but 1 weights"):
        Mixture([gen, und], [1])


@pytest.mark.parametrize("cut", [3, 15])  # 15: after the smaller source ran out
def test_resume_equals_uninterrupted(tmp_path, cut):
    def make():
        gen, und = _sources(tmp_path, epochs=1)
        return Mixture({"gen": gen, "und": und}, {"gen": 1.0, "und": 2.0}, seed=9)

    full = keys(make())
    mix = make()
    it = iter(mix)
    head = [next(it).key for _ in range(cut)]
    state = json.loads(json.dumps(mix.state_dict()))
    resumed = make()
    resumed.load_state_dict(state)
    assert head + keys(resumed) == full
    if cut == 15:
        assert state["positions"]["0"]["active"] == [True, False]


def test_loader_over_mixture_resumes_with_workers(tmp_path):
    def make():
        gen, und = _sources(tmp_path, epochs=2)
        mix = Mixture({"gen": gen, "und": und}, {"gen": 1.0, "und": 1.0}, seed=3)
        return ResumableLoader(mix, batch_size=4, num_workers=2, collate_fn=keys)

    full = list(make())
    loader = make()
    it = iter(loader)
    head = [next(it) for _ in range(4)]
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(loader.state_dict())))
    assert head + list(resumed) == full
    counts = Counter(k for batch in full for k in batch)
    assert len(counts) == 12 + 6 and set(counts.values()) == {2}  # two epochs of both sources over two workers
