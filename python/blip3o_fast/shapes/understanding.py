"""Understanding score: answer accuracy on held-out shapes-world images.

The held-out set is world.generate(n, HELDOUT_SEED): scenes never drawn with a training seed, each with one
question of every type it has (colour, count, position, shape, total, background), asked one at a time as
a single user turn with the image. An answer is right when its normalised form equals the reference's:
lower case, punctuation dropped, filler words dropped ("on the left" == "Left."), digits and American
spellings mapped to the world's words ("2" == "two", "center" == "centre", "grey" == "gray").
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image

from blip3o_fast.shapes.world import MAX_OBJECTS, NUMBER_WORDS, generate

HELDOUT_SEED = 7919  # the held-out split's seed (training data uses other seeds, 0 by default)
QUESTION_TYPES = ("colour", "count", "position", "shape", "total", "background")

_FILLER = {"a", "an", "the", "on", "at", "in", "it", "is", "its", "it's", "there", "are", "of", "to", "side"}
_SYNONYMS = {"center": "centre", "middle": "centre", "grey": "gray", "color": "colour", "none": "zero",
             **{str(i): w for i, w in enumerate(NUMBER_WORDS)}}


def normalise_answer(text: str) -> str:
    words = re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split()
    return " ".join(_SYNONYMS.get(w, w) for w in words if w not in _FILLER)


@dataclass
class Question:
    key: str
    kind: str
    question: str
    answer: str
    image: Image.Image
    objects: int  # objects in the scene: the table splits accuracy by it


def heldout_questions(n_images: int, seed: int = HELDOUT_SEED, width: int = 64) -> list[Question]:
    """Every question of the first n_images scenes of the world with this seed (the held-out split by
    default; keys name the seed when it is another)."""
    out = []
    for sample in generate(n_images, seed, width, prefix="heldout-" if seed == HELDOUT_SEED else f"seed{seed}-"):
        image = Image.fromarray(sample.image)
        n = len(sample.scene.objects)
        out += [Question(sample.key, kind, q, a, image, n) for kind, q, a in sample.questions]
    return out


def score(questions: list[Question], answer: Callable[[list[str], list[Image.Image]], list[str]],
          batch_size: int = 32) -> dict:
    """Ask every question through `answer(questions, images) -> texts` in batches. Returns {"types": {kind:
    {questions, correct, accuracy, by_objects: {n: accuracy on scenes of n objects}}}, "overall" (all
    questions pooled), "records"}. The split by object count tells seeing from guessing: a one-object scene's
    shape or position question is answered only by looking, a crowded scene's partly by the prior."""
    records = []
    for start in range(0, len(questions), batch_size):
        batch = questions[start:start + batch_size]
        replies = answer([q.question for q in batch], [q.image for q in batch])
        for q, reply in zip(batch, replies):
            records.append({"key": q.key, "type": q.kind, "objects": q.objects, "question": q.question,
                            "answer": q.answer, "reply": reply,
                            "correct": normalise_answer(reply) == normalise_answer(q.answer)})
    types = {}
    for kind in QUESTION_TYPES:
        rows = [r for r in records if r["type"] == kind]
        if rows:
            correct = sum(r["correct"] for r in rows)
            types[kind] = {"questions": len(rows), "correct": correct, "accuracy": correct / len(rows),
                           "by_objects": _by_objects(rows)}
    overall = sum(r["correct"] for r in records) / len(records) if records else 0.0
    return {"types": types, "overall": overall, "records": records}


def _by_objects(rows: list[dict]) -> dict[int, float]:
    counts = sorted({r["objects"] for r in rows})
    return {n: sum(r["correct"] for r in rows if r["objects"] == n) / sum(r["objects"] == n for r in rows)
            for n in counts}


def table(result: dict) -> str:
    split = [f"{n} obj." for n in range(1, MAX_OBJECTS + 1)]
    lines = [f"{'question type':<15}{'questions':>10}{'accuracy':>10}" + "".join(f"{s:>9}" for s in split)]
    for kind, t in result["types"].items():
        cells = "".join(f"{t['by_objects'][n]:>9.3f}" if n in t["by_objects"] else f"{'-':>9}"
                        for n in range(1, MAX_OBJECTS + 1))
        lines.append(f"{kind:<15}{t['questions']:>10}{t['accuracy']:>10.3f}{cells}")
    total = sum(t["questions"] for t in result["types"].values())
    lines.append(f"{'overall':<15}{total:>10}{result['overall']:>10.3f}")
    return "\n".join(lines)
