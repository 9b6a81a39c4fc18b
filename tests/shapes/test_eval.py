"""Understanding scoring and the `blip3o-fast eval shapes` command end to end on a tiny random model."""

import json

import pytest
import torch

from blip3o_fast.cli import main
from blip3o_fast.shapes import geneval, understanding
from blip3o_fast.shapes.understanding import normalise_answer


@pytest.mark.parametrize("reply, reference", [
    ("on the left", "Left."), ("in the center", "in the centre"), ("2", "two"), ("It is red.", "red"),
    ("grey", "gray"), ("none", "zero"),
])
def test_normalised_match(reply, reference):
    assert normalise_answer(reply) == normalise_answer(reference)


@pytest.mark.parametrize("reply, reference", [("red", "orange"), ("two", "three"), ("left", "right"),
                                              ("two circles", "two")])
def test_normalised_mismatch(reply, reference):
    assert normalise_answer(reply) != normalise_answer(reference)


def test_understanding_score_oracle_and_constant():
    questions = understanding.heldout_questions(8)
    assert {q.kind for q in questions} == set(understanding.QUESTION_TYPES)
    truth = {(q.key, q.question): q.answer for q in questions}
    oracle = understanding.score(questions, lambda texts, images: [
        truth[(q.key, q.question)].upper() + "." for q in questions[:len(texts)]], batch_size=len(questions))
    assert oracle["overall"] == 1.0
    constant = understanding.score(questions, lambda texts, images: ["red"] * len(texts), batch_size=5)
    assert constant["overall"] < 0.2
    assert constant["types"]["count"]["accuracy"] == 0.0
    assert "overall" in understanding.table(constant)


def test_understanding_split_by_object_count():
    questions = understanding.heldout_questions(12)
    assert {q.objects for q in questions} == {1, 2, 3}
    by_text = {(q.question, id(q.image)): q for q in questions}

    def right_on_single_objects(texts, images):
        asked = [by_text[(t, id(im))] for t, im in zip(texts, images)]
        return [q.answer if q.objects == 1 else "nothing" for q in asked]

    result = understanding.score(questions, right_on_single_objects, batch_size=7)
    shape = result["types"]["shape"]["by_objects"]
    assert shape[1] == 1.0 and shape[2] == 0.0 and shape[3] == 0.0
    assert "1 obj." in understanding.table(result)


def test_overall_is_mean_of_categories():
    prompts = geneval.eval_prompts()
    records = [{"category": p.category, "passed": p.category == "colours"} for p in prompts]
    result = geneval.summarise(records, prompts)
    assert result["overall"] == pytest.approx(1 / 6)
    assert result["categories"]["colours"] == {"prompts": 18, "images": 18, "passed": 18, "accuracy": 1.0}


def test_eval_command_end_to_end(tmp_path, capsys):
    out = tmp_path / "results.json"
    argv = ["eval", "shapes", "--model", "tiny:qwen2_5_vl", "--images-per-prompt", "1", "--limit", "1",
            "--understanding-images", "1", "--understanding-seed", "0", "--steps", "2", "--out", str(out),
            "--save-images", str(tmp_path / "img"), "--threads", "1"]  # a loaded 2-core machine runs the toy model far faster on one thread
    threads = torch.get_num_threads()
    try:
        assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "Mini-GenEval" in printed and "overall (mean of categories)" in printed and "Understanding" in printed
    assert "images (seed 0)" in printed  # the training data's scenes, not the held-out split
    result = json.loads(out.read_text())
    gen = result["geneval"]
    assert list(gen["categories"]) == list(geneval.CATEGORIES)
    assert all(c["images"] == 1 for c in gen["categories"].values())
    assert 0.0 <= gen["overall"] <= 1.0
    assert len(list((tmp_path / "img").glob("*.png"))) == 6
    assert all(r["file"] for r in gen["records"])
    und = result["understanding"]
    assert und["records"] and all(isinstance(r["reply"], str) for r in und["records"])
    assert result["settings"]["sampler"] == {"num_steps": 2}
    assert result["settings"]["understanding_seed"] == 0
    assert result["timings"]["images"] == 6


def test_eval_command_names_a_missing_model(tmp_path, capsys):
    assert main(["eval", "shapes", "--model", str(tmp_path / "nope"), "--limit", "1"]) == 2
    assert "not found" in capsys.readouterr().err
