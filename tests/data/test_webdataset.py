import json
import logging
import os

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from blip3o_fast.data import DataStats, GenerationSample, ResumableLoader, UnderstandingSample, WebDataset, write_shard
from blip3o_fast.data.webdataset import expand_braces, resolve_shards, split_member_name
from synthetic_shards import (
    feat, generation_turns, index_of, png, truncate_tar_inside, truncated_png, understanding_turns,
    write_t2i_shards,
)


def keys(samples):
    return [s.key for s in samples]


def test_brace_glob_and_member_names(tmp_path):
    assert expand_braces("a-{000..002}.tar") == ["a-000.tar", "a-001.tar", "a-002.tar"]
    assert expand_braces("{x,y}-{8..10}") == ["x-8", "x-9", "x-10", "y-8", "y-9", "y-10"]
    paths, _ = write_t2i_shards(tmp_path, 3, 1)
    assert resolve_shards(str(tmp_path / "shard-{000..002}.tar")) == paths
    assert resolve_shards(str(tmp_path / "shard-*.tar")) == paths
    assert resolve_shards([paths[2], str(tmp_path / "shard-00[01].tar")]) == [paths[2], paths[0], paths[1]]
    assert split_member_name("d/e/0012.feat.npy") == ("d/e/0012", "feat.npy")
    assert split_member_name("0012.JPG") == ("0012", "jpg")
    with pytest.raises(ValueError, match="no shards"):
        WebDataset(str(tmp_path / "nothing-*.tar"))


def test_members_become_samples(tmp_path):
    conv_und = {"conversations": understanding_turns("What colour?", "Red.")}
    conv_gen = {"conversations": generation_turns("a red cube")}
    conv_edit = {"conversations": generation_turns("make it blue", source_images=1)}
    messages = {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]},
                             {"role": "assistant", "content": "Hello"}]}
    write_shard(tmp_path / "a.tar", [
        {"__key__": "t2i", "png": png(1), "txt": "  a cat  "},
        {"__key__": "feat_only", "txt": "a dog", "feat.npy": feat(2)},
        {"__key__": "json_caption", "jpg": png(3), "json": {"caption": "a bird", "width": 6}},
        {"__key__": "und", "png": png(4), "json": conv_und},
        {"__key__": "gen", "webp": png(5), "json": conv_gen},
        {"__key__": "edit", "src.png": png(6), "png": png(7), "json": conv_edit, "feat.npy": feat(7, (2, 2, 2))},
        {"__key__": "multi", "src1.png": png(9), "src.png": png(8), "png": png(10),
         "json": {"conversations": understanding_turns("Compare.", "Same.", images=3)}},
        {"__key__": "chat", "png": png(11), "json": messages},
        {"__key__": "sub/dir", "png": png(12), "txt": "nested", "cls": "3"},
    ])
    got = {s.key: s for s in WebDataset(str(tmp_path / "a.tar"), shuffle_shards=False)}
    assert list(got) == ["t2i", "feat_only", "json_caption", "und", "gen", "edit", "multi", "chat", "sub/dir"]

    t2i = got["t2i"]
    assert isinstance(t2i, GenerationSample) and t2i.caption == "a cat" and t2i.target is None
    assert t2i.image.mode == "RGB" and index_of(t2i.image) == 1 and t2i.source_images == []
    f = got["feat_only"]
    assert f.image is None and f.target.dtype == torch.float32 and torch.equal(f.target, torch.full((4, 3), 2.0))
    assert got["json_caption"].caption == "a bird" and index_of(got["json_caption"].image) == 3

    und = got["und"]
    assert isinstance(und, UnderstandingSample) and [index_of(i) for i in und.images] == [4]
    assert und.messages == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
    ]
    gen = got["gen"]
    assert isinstance(gen, GenerationSample) and gen.caption == "a red cube" and index_of(gen.image) == 5
    edit = got["edit"]
    assert edit.caption == "make it blue" and index_of(edit.image) == 7 and edit.target.shape == (2, 2, 2)
    assert [index_of(i) for i in edit.source_images] == [6]
    assert [index_of(i) for i in got["multi"].images] == [8, 9, 10]  # src, src1, then the main image
    assert got["chat"].messages[1] == {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]}
    assert got["sub/dir"].caption == "nested"

    only_und = WebDataset(str(tmp_path / "a.tar"), tasks=("understanding",), shuffle_shards=False)
    assert keys(only_und) == ["und", "multi", "chat"]
    lazy = {s.key: s for s in WebDataset(str(tmp_path / "a.tar"), decode_target_image=False)}
    assert lazy["edit"].image is None and lazy["edit"].target is not None and lazy["t2i"].image is not None


def test_shuffle_is_seeded_and_changes_per_epoch(tmp_path):
    _, all_keys = write_t2i_shards(tmp_path, 4, 5)
    pattern = str(tmp_path / "shard-*.tar")
    plain = keys(WebDataset(pattern, shuffle_shards=False))
    assert plain == all_keys
    a = keys(WebDataset(pattern, shuffle_buffer=8, seed=3, epochs=2))
    assert a == keys(WebDataset(pattern, shuffle_buffer=8, seed=3, epochs=2))
    assert a != keys(WebDataset(pattern, shuffle_buffer=8, seed=4, epochs=2))
    first, second = a[:20], a[20:]
    assert sorted(first) == sorted(second) == sorted(all_keys) and first != second and first != all_keys


@pytest.mark.parametrize("num_shards", [8, 5])
def test_ranks_and_workers_cover_every_sample_once(tmp_path, num_shards):
    _, all_keys = write_t2i_shards(tmp_path, num_shards, 3)
    seen = []
    for rank in range(2):
        ds = WebDataset(str(tmp_path / "shard-*.tar"), shuffle_buffer=4, seed=1, rank=rank, world_size=2)
        loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=list)
        seen += [s.key for batch in loader for s in batch]
    assert len(seen) == len(all_keys) and sorted(seen) == sorted(all_keys)


def _resume_matches(make, cut):
    """Iterate ``cut`` samples, save the state (through json, as a checkpoint would), resume a fresh reader."""
    full = keys(make())
    ds = make()
    it = iter(ds)
    head = [next(it).key for _ in range(cut)]
    state = json.loads(json.dumps(ds.state_dict()))
    it.close()
    resumed = make()
    resumed.load_state_dict(state)
    assert head + keys(resumed) == full


@pytest.mark.parametrize("cut", [1, 13, 20, 31])
def test_resume_equals_uninterrupted(tmp_path, cut):
    write_t2i_shards(tmp_path, 4, 5)
    write_shard(tmp_path / "shard-009.tar", [{"__key__": "bad", "png": b"garbage", "txt": "x"},
                                              {"__key__": "good", "png": png(1), "txt": "y"}])
    _resume_matches(lambda: WebDataset(str(tmp_path / "shard-*.tar"), shuffle_buffer=6, seed=7, epochs=2), cut)


def test_resume_rejects_another_split(tmp_path):
    write_t2i_shards(tmp_path, 2, 2)
    ds = WebDataset(str(tmp_path / "shard-*.tar"))
    next(iter(ds))
    other = WebDataset(str(tmp_path / "shard-*.tar"), rank=1, world_size=2)
    other.load_state_dict(ds.state_dict())
    with pytest.raises(ValueError, match="split"):
        list(other)


# 5 shards over 2 workers: worker 1 ends first, so cut 13 resumes where only worker 0 is left.
@pytest.mark.parametrize("num_shards,cut,drop_last", [(6, 5, False), (5, 13, False), (5, 7, True)])
def test_loader_with_workers_resumes_exactly(tmp_path, num_shards, cut, drop_last):
    write_t2i_shards(tmp_path, num_shards, 4)

    def make():
        ds = WebDataset(str(tmp_path / "shard-*.tar"), shuffle_buffer=3, seed=2, epochs=2)
        return ResumableLoader(ds, batch_size=3, num_workers=2, collate_fn=keys, drop_last=drop_last)

    full = list(make())
    assert all(len(b) == 3 for b in full) or not drop_last
    loader = make()
    head = []
    for batch in loader:
        head.append(batch)
        if len(head) == cut:
            break
    state = json.loads(json.dumps(loader.state_dict()))
    resumed = make()
    resumed.load_state_dict(state)
    assert head + list(resumed) == full
    assert loader.stats.yielded == sum(map(len, head))  # stats of exactly the batches handed out


def _write_bad_data(folder):
    """Shards with exactly known faults; returns (pattern, good keys)."""
    write_shard(os.path.join(folder, "shard-000.tar"), [
        {"__key__": "ok0", "png": png(0), "txt": "fine"},
        {"__key__": "garbage_img", "png": b"\x89PNG not really", "txt": "x"},
        {"__key__": "cut_img", "png": truncated_png(1), "txt": "x"},
        {"__key__": "no_caption", "png": png(2)},
        {"__key__": "blank_caption", "png": png(2), "txt": "  \n"},
        {"__key__": "no_image", "txt": "caption only"},
        {"__key__": "bad_json", "png": png(3), "json": "{not json"},
        {"__key__": "bad_feat", "txt": "x", "feat.npy": b"nonsense"},
        {"__key__": "mismatch", "json": {"conversations": understanding_turns("Q?", "A.")}},
        {"__key__": "ok1", "png": png(4), "txt": "fine"},
    ])
    with open(os.path.join(folder, "shard-001.tar"), "wb") as f:
        f.write(b"this is not a tar file " * 100)
    write_shard(os.path.join(folder, "shard-002.tar"),
                [{"__key__": f"t{i}", "png": png(i), "txt": "fine"} for i in range(4)])
    truncate_tar_inside(os.path.join(folder, "shard-002.tar"), "t2.png")
    open(os.path.join(folder, "shard-003.tar"), "wb").close()  # empty file
    return ["ok0", "ok1", "t0", "t1"]


EXPECTED_SKIPS = {"corrupt_image": 2, "missing_caption": 2, "missing_image": 1, "bad_json": 1, "bad_target": 1,
                  "image_count_mismatch": 1, "bad_shard": 3}


def test_bad_data_is_skipped_and_counted(tmp_path, caplog):
    good = _write_bad_data(tmp_path)
    shards = [str(tmp_path / "shard-{000..003}.tar"), str(tmp_path / "missing.tar")]
    with caplog.at_level(logging.WARNING, logger="blip3o_fast.data"):
        ds = WebDataset(shards, shuffle_shards=False)
        assert keys(ds) == good
    assert ds.stats.counts == {**EXPECTED_SKIPS, "bad_shard": 4}
    assert ds.stats.yielded == len(good)
    assert ds.stats.examples["corrupt_image"] == [f"{tmp_path}/shard-000.tar:garbage_img",
                                                  f"{tmp_path}/shard-000.tar:cut_img"]
    assert len(caplog.records) == len(EXPECTED_SKIPS)  # one warning per reason


def test_stats_merge_across_workers_and_ranks(tmp_path):
    good = _write_bad_data(tmp_path)
    pattern = str(tmp_path / "shard-*.tar")
    per_rank = []
    for rank in range(2):
        loader = ResumableLoader(WebDataset(pattern, rank=rank, world_size=2), batch_size=2, num_workers=2,
                                 collate_fn=keys)
        seen = [k for batch in loader for k in batch]
        per_rank.append((seen, loader.stats))
    assert sorted(per_rank[0][0] + per_rank[1][0]) == sorted(good)
    total = DataStats.sum([per_rank[0][1], per_rank[1][1].to_dict()])
    assert total.counts == EXPECTED_SKIPS and total.yielded == len(good)
    assert (per_rank[0][1] + per_rank[1][1]).counts == EXPECTED_SKIPS
    assert total.all_reduce().counts == EXPECTED_SKIPS  # no process group: itself


def test_endless_stream_repeats_with_new_orders(tmp_path):
    _, all_keys = write_t2i_shards(tmp_path, 2, 3)
    ds = WebDataset(str(tmp_path / "shard-*.tar"), shuffle_buffer=4, epochs=None)
    it = iter(ds)
    got = [next(it).key for _ in range(3 * len(all_keys))]
    for e in range(3):
        assert sorted(got[e * 6:(e + 1) * 6]) == sorted(all_keys)
    assert ds.state_dict()["positions"][0]["epoch"] == 2
    empty = WebDataset(str(tmp_path / "shard-000.tar"), epochs=None, rank=1, world_size=2)
    assert list(empty) == []  # no unit for this stream: ends instead of spinning


def test_write_shard_round_trips_arrays_and_text(tmp_path):
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    n = write_shard(tmp_path / "w.tar", [{"__key__": "k", "txt": "é", "feat.npy": torch.from_numpy(arr)}])
    assert n == 1 and not [p for p in os.listdir(tmp_path) if ".tmp" in p]
    (sample,) = list(WebDataset(str(tmp_path / "w.tar")))
    assert sample.caption == "é" and torch.equal(sample.target, torch.from_numpy(arr))
    with pytest.raises(TypeError, match="cannot encode"):
        write_shard(tmp_path / "x.tar", [{"__key__": "k", "txt": 3}])
