import json
import logging

import pytest
from torch.utils.data import DataLoader

from blip3o_fast.data import ConversationDataset, DataStats, GenerationSample, ResumableLoader, UnderstandingSample
from synthetic_shards import (
    generation_turns, index_of, save_png, truncated_png, understanding_turns, write_json, write_jsonl,
)


def keys(samples):
    return [s.key for s in samples]


def test_records_become_samples(tmp_path):
    (tmp_path / "sub").mkdir()
    save_png(tmp_path, "img/a.png", 1)
    save_png(tmp_path, "img/b.png", 2)
    save_png(tmp_path, "img/c.png", 3)
    write_json(tmp_path / "sub" / "data.json", [
        {"id": "u", "image": "../img/a.png", "conversations": understanding_turns("What is it?", "A square.")},
        {"image": ["../img/b.png"], "conversations": generation_turns("a blue square")},
        {"image": ["../img/a.png", "../img/b.png", "../img/c.png"],
         "conversations": generation_turns("combine them", source_images=2)},
        {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                           {"from": "gpt", "value": "Hello"}, {"from": "human", "value": "Bye"},
                           {"from": "gpt", "value": "Bye"}]},
        {"image": "../img/c.png", "caption": "  a red square "},
    ])
    write_jsonl(tmp_path / "more.jsonl", [
        {"image": "img/b.png", "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Describe"}, {"type": "image"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Blue."}]}]},
        "",  # blank lines are not records
        {"messages": [{"role": "user", "content": "Draw a cat"}, {"role": "assistant", "content": "<image>"}],
         "image": "img/a.png"},
    ])
    ds = ConversationDataset([str(tmp_path / "sub" / "data.json"), str(tmp_path / "more.jsonl")], shuffle=False)
    got = list(ds)
    assert keys(got) == [f"{tmp_path}/sub/data.json:{i}" for i in range(5)] + [f"{tmp_path}/more.jsonl:{i}"
                                                                            for i in range(2)]
    und, gen, combine, chat, caption, described, drawn = got

    assert isinstance(und, UnderstandingSample) and [index_of(i) for i in und.images] == [1]
    assert und.messages == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A square."}]},
    ]
    assert isinstance(gen, GenerationSample) and gen.caption == "a blue square" and index_of(gen.image) == 2
    assert gen.source_images == [] and gen.target is None
    assert combine.caption == "combine them" and index_of(combine.image) == 3
    assert [index_of(i) for i in combine.source_images] == [1, 2]
    assert chat.images == [] and [m["role"] for m in chat.messages] == ["system", "user", "assistant", "user",
                                                                       "assistant"]
    assert chat.messages[0] == {"role": "system", "content": [{"type": "text", "text": "Be brief."}]}
    assert caption.caption == "a red square" and index_of(caption.image) == 3
    assert described.messages[0]["content"] == [{"type": "text", "text": "Describe"}, {"type": "image"}]
    assert [index_of(i) for i in described.images] == [2]
    assert isinstance(drawn, GenerationSample) and drawn.caption == "Draw a cat" and index_of(drawn.image) == 1

    gen_only = ConversationDataset(str(tmp_path / "*/*.json"), tasks=("generation",), shuffle=False)
    assert [s.key.rsplit(":", 1)[1] for s in gen_only] == ["1", "2", "4"]


def _write_records(folder, n):
    for i in range(n):
        save_png(folder, f"im/{i}.png", i)
    half = n // 2
    write_json(folder / "a.json", [{"image": f"im/{i}.png", "conversations": understanding_turns(f"q{i}", "a")}
                                   for i in range(half)])
    write_jsonl(folder / "b.jsonl", [{"image": f"im/{i}.png", "conversations": generation_turns(f"c{i}")}
                                     for i in range(half, n)])
    return [str(folder / "a.json"), str(folder / "b.jsonl")]


def test_shuffle_is_seeded_and_changes_per_epoch(tmp_path):
    paths = _write_records(tmp_path, 10)
    a = keys(ConversationDataset(paths, seed=5, epochs=2))
    assert a == keys(ConversationDataset(paths, seed=5, epochs=2))
    assert a != keys(ConversationDataset(paths, seed=6, epochs=2))
    plain = keys(ConversationDataset(paths, shuffle=False))
    assert sorted(a[:10]) == sorted(a[10:]) == sorted(plain) and a[:10] != a[10:] and a[:10] != plain


def test_ranks_and_workers_cover_every_record_once(tmp_path):
    paths = _write_records(tmp_path, 11)
    seen = []
    for rank in range(2):
        ds = ConversationDataset(paths, seed=3, rank=rank, world_size=2)
        seen += [s.key for batch in DataLoader(ds, batch_size=2, num_workers=2, collate_fn=list) for s in batch]
    assert len(seen) == 11 and len(set(seen)) == 11


@pytest.mark.parametrize("cut", [1, 9, 16])
def test_resume_equals_uninterrupted(tmp_path, cut):
    paths = _write_records(tmp_path, 10)

    def make():
        return ConversationDataset(paths, seed=1, epochs=2, shuffle_buffer=3)

    full = keys(make())
    ds = make()
    it = iter(ds)
    head = [next(it).key for _ in range(cut)]
    state = json.loads(json.dumps(ds.state_dict()))
    resumed = make()
    resumed.load_state_dict(state)
    assert head + keys(resumed) == full


def test_loader_with_workers_resumes_exactly(tmp_path):
    paths = _write_records(tmp_path, 10)

    def make():
        return ResumableLoader(ConversationDataset(paths, seed=4), batch_size=2, num_workers=2, collate_fn=keys)

    full = list(make())
    loader = make()
    it = iter(loader)
    head = [next(it) for _ in range(3)]
    resumed = make()
    resumed.load_state_dict(loader.state_dict())
    assert head + list(resumed) == full


def _write_bad_records(folder):
    save_png(folder, "ok.png", 7)
    (folder / "cut.png").write_bytes(truncated_png(0))
    (folder / "junk.png").write_bytes(b"not an image")
    write_json(folder / "good.json", [
        {"image": "ok.png", "conversations": understanding_turns("q", "a")},  # fine
        {"image": "nope.png", "conversations": understanding_turns("q", "a")},  # missing_file
        {"image": "cut.png", "conversations": understanding_turns("q", "a")},  # corrupt_image
        {"image": "junk.png", "conversations": generation_turns("x")},  # corrupt_image
        {"conversations": generation_turns("")},  # missing_caption
        {"conversations": generation_turns("no picture")},  # missing_image
        {"image": ["ok.png", "ok.png"], "conversations": understanding_turns("q", "a")},  # image_count_mismatch
        {"image": "ok.png", "conversations": [{"from": "robot", "value": "?"}]},  # bad_conversation
        {"image": "ok.png"},  # bad_conversation
        ["not", "a", "record"],  # bad_conversation
        {"image": "ok.png", "caption": "fine"},  # fine
    ])
    write_jsonl(folder / "lines.jsonl", [
        {"image": "ok.png", "conversations": generation_turns("fine")},
        "{broken",  # bad_json
        {"image": 3, "conversations": generation_turns("x")},  # bad_conversation
    ])
    (folder / "broken.json").write_text("[{\"image\": ")  # bad_file
    (folder / "object.json").write_text("{\"image\": \"ok.png\"}")  # bad_file: not a list
    return 3


EXPECTED_SKIPS = {"missing_file": 1, "corrupt_image": 2, "missing_caption": 1, "missing_image": 1,
                  "image_count_mismatch": 1, "bad_conversation": 4, "bad_json": 1, "bad_file": 2}


def test_bad_records_are_skipped_and_counted(tmp_path, caplog):
    good = _write_bad_records(tmp_path)
    with caplog.at_level(logging.WARNING, logger="blip3o_fast.data"):
        ds = ConversationDataset(str(tmp_path / "*.json*"))
        assert len(list(ds)) == good
    assert ds.stats.counts == EXPECTED_SKIPS and ds.stats.yielded == good
    assert ds.stats.examples["bad_file"] == [str(tmp_path / "broken.json"), str(tmp_path / "object.json")]
    assert len(caplog.records) == len(EXPECTED_SKIPS)


def test_file_errors_are_counted_once_over_ranks_and_workers(tmp_path):
    good = _write_bad_records(tmp_path)
    per_rank = []
    for rank in range(2):
        loader = ResumableLoader(ConversationDataset(str(tmp_path / "*.json*"), rank=rank, world_size=2),
                                 batch_size=2, num_workers=2, collate_fn=keys)
        per_rank.append((sum(map(len, loader)), loader.stats))
    total = DataStats.sum(stats for _, stats in per_rank)
    assert sum(n for n, _ in per_rank) == good and total.counts == EXPECTED_SKIPS and total.yielded == good
