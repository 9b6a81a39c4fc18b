"""The shapes world: seeded determinism, captions and answers that agree with the scene and its pixels."""

import itertools
import re

import numpy as np
import pytest

from blip3o_fast.shapes import world
from blip3o_fast.shapes.analyser import analyse
from blip3o_fast.shapes.world import COLOURS, SHAPES, ObjectGroup, Spec


def test_same_seed_same_bytes_and_text():
    a, b = list(world.generate(6, seed=3)), list(world.generate(6, seed=3))
    for x, y in zip(a, b):
        assert x.image.tobytes() == y.image.tobytes()
        assert (x.caption, x.questions, x.key) == (y.caption, y.questions, y.key)
    # Sample i depends only on (seed, i): a shorter run is a prefix of a longer one.
    assert [s.caption for s in world.generate(3, seed=3)] == [s.caption for s in a[:3]]
    other = list(world.generate(6, seed=4))
    assert sum(x.image.tobytes() != y.image.tobytes() for x, y in zip(a, other)) >= 5


@pytest.mark.parametrize("spec, caption", [
    (Spec((ObjectGroup("square", "red", 2, "left"),)), "two red squares on the left"),
    (Spec((ObjectGroup("circle", "blue"),)), "a blue circle"),
    (Spec((ObjectGroup("circle", "orange", 1, "centre"),)), "an orange circle in the centre"),
    (Spec((ObjectGroup("triangle", "green"), ObjectGroup("square", "yellow")), "above"),
     "a green triangle above a yellow square"),
    (Spec((ObjectGroup("circle", "red"), ObjectGroup("square"), ObjectGroup("triangle", None, 1, "top"))),
     "a red circle, a square and a triangle at the top"),
    (Spec((ObjectGroup("triangle", None, 3),)), "three triangles"),
])
def test_caption_templates(spec, caption):
    assert spec.caption() == caption
    assert Spec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize("groups, relation", [
    ((ObjectGroup("circle", "red", 2), ObjectGroup("circle", "red")), None),  # indistinguishable groups
    ((ObjectGroup("circle"), ObjectGroup("circle", "blue")), None),  # "a circle and a blue circle"
    ((ObjectGroup("square", None, 4),), None),  # too many objects
    ((ObjectGroup("square", None, 2, "centre"),), None),  # the centre holds one
    ((ObjectGroup("square", None, 2), ObjectGroup("circle")), "above"),  # relations relate single objects
    ((ObjectGroup("hexagon"),), None),
])
def test_bad_specs_are_refused(groups, relation):
    with pytest.raises(ValueError):
        Spec(groups, relation)


def _scene_realises_spec(scene):
    objs, spec = scene.objects, scene.spec
    assert len(objs) == sum(g.count for g in spec.groups)
    i = 0
    for g in spec.groups:
        members = objs[i:i + g.count]
        i += g.count
        assert all(o.shape == g.shape for o in members)
        assert len({o.colour for o in members}) == 1
        assert g.colour is None or members[0].colour == g.colour
        assert g.position is None or all(o.position == g.position for o in members)
    for o in objs:
        assert world.position_of(o.x, o.y, scene.width, scene.height) == o.position
        x0, y0, x1, y1 = o.extents()
        assert 0 <= x0 and x1 <= scene.width and 0 <= y0 and y1 <= scene.height
        assert 12 <= o.size <= 18
    for k, a in enumerate(objs):
        for b in objs[k + 1:]:
            ax0, ay0, ax1, ay1 = a.extents()
            bx0, by0, bx1, by1 = b.extents()
            assert ax1 < bx0 or bx1 < ax0 or ay1 < by0 or by1 < ay0, "objects overlap"
    if spec.relation:
        a, b = objs
        assert world.relation_holds(spec.relation, (a.x, a.y), (b.x, b.y), scene.width, scene.height)


def _answer_from_objects(question, scene):
    """An independent reading of each question template against the scene's object list."""
    objs = scene.objects
    words = world.NUMBER_WORDS
    if m := re.fullmatch(r"What colour (?:is|are) the (\w+?)s?\?", question):
        if m.group(1) == "background":
            return scene.background
        return {o.colour for o in objs if o.shape == m.group(1)}.pop()
    if m := re.fullmatch(r"How many (\w+?)s are there\?", question):
        return words[len(objs) if m.group(1) == "object" else sum(o.shape == m.group(1) for o in objs)]
    if m := re.fullmatch(r"Where is the (\w+) (\w+)\?", question):
        (obj,) = [o for o in objs if (o.colour, o.shape) == m.groups()]
        return world.POSITION_PHRASES[obj.position]
    if m := re.fullmatch(r"What shape (?:is|are) the (\w+) objects?\?", question):
        return {o.shape for o in objs if o.colour == m.group(1)}.pop()
    raise AssertionError(f"unknown question {question!r}")


def test_scenes_captions_and_answers_agree():
    kinds = set()
    for sample in world.generate(80, seed=11):
        scene = sample.scene
        _scene_realises_spec(scene)
        assert sample.caption == scene.spec.caption()
        assert sample.image.shape == (64, 64, 3) and sample.image.dtype == np.uint8
        for kind, question, answer in sample.questions:
            kinds.add(kind)
            assert _answer_from_objects(question, scene) == answer, question
        # The pixels say the same as the scene.
        seen = analyse(sample.image)
        assert seen.background == scene.background
        assert sorted((o.shape, o.colour, o.position) for o in seen.objects) == \
            sorted((o.shape, o.colour, o.position) for o in scene.objects)
    assert kinds == {"colour", "count", "position", "shape", "total", "background"}


def test_caption_questions_are_decided_by_the_caption():
    """Every question kept for a text-only conversation has one answer over all of its caption's scenes (other
    draws of the open colours, backgrounds and jitter), and the caption opens the conversation."""
    kept = set()
    for sample in world.generate(120, seed=13):
        questions = world.caption_questions(sample.scene, sample.questions)
        assert "background" not in {k for k, _, _ in questions}
        for seed in range(4):
            other = world.realise(sample.scene.spec, np.random.default_rng([99, seed]))
            for kind, question, answer in questions:
                kept.add(kind)
                assert _answer_from_objects(question, other) == answer, (sample.caption, question)
        turns = world.llava_conversation(questions, sample.caption)
        assert turns[0]["value"] == f"{sample.caption}\n{questions[0][1]}"
    assert kept == {"colour", "count", "position", "shape", "total"}


def test_world_mixture_covers_the_vocabulary():
    captions = " ".join(s.caption for s in world.generate(200, seed=5))
    for word in [*SHAPES, *COLOURS, "two", "three", "on the left", "at the top", "in the centre", "left of", "below"]:
        assert word in captions


def test_objects_sit_at_their_region_slots():
    """Every centroid lies within JITTER of one of its region's slots (one for the centre, one per side,
    two for a side holding two objects), and sizes stay in range: a caption's images are few-moded."""
    size = 64
    for sample in world.generate(300, seed=3):
        objects = sample.scene.objects
        for o in objects:
            n = sum(p.position == o.position for p in objects)
            u, v = o.x / size - 0.5, o.y / size - 0.5
            assert any(max(abs(u - su), abs(v - sv)) <= world.JITTER + 1e-9 for su, sv in world._slots(o.position, n))
            assert world.MIN_SIZE_FRACTION * size <= o.size <= world.MAX_SIZE_FRACTION * size


def _inside_region(u: float, v: float, position: str, margin: float) -> bool:
    """(u, v) lies `margin` inside the named region: position_of with a margin."""
    if position == "centre":
        return max(abs(u), abs(v)) <= world.CENTRE_HALF_WIDTH - margin
    along, across = (u, v) if position in ("left", "right") else (v, u)
    sign = -1 if position in ("left", "top") else 1
    return max(abs(u), abs(v)) >= world.CENTRE_HALF_WIDTH + margin and along * sign >= abs(across) + margin


@pytest.mark.parametrize("position", world.POSITIONS)
def test_every_slot_keeps_its_jitter_inside_the_region(position):
    """Layout draws no region check: the slot constants guarantee it. Every corner of every slot's JITTER box
    lies POSITION_MARGIN inside the slot's region (a region is convex, so the whole box does)."""
    slots = [s for n in ((1,) if position == "centre" else (1, 2)) for s in world._slots(position, n)]
    corners = (-world.JITTER, world.JITTER)
    for (su, sv), du, dv in itertools.product(slots, corners, corners):
        u, v = su + du, sv + dv
        assert _inside_region(u, v, position, world.POSITION_MARGIN), (position, u, v)
        assert world.position_of((u + 0.5) * 64, (v + 0.5) * 64, 64, 64) == position


def test_other_image_sizes():
    rng = np.random.default_rng(0)
    scene = world.realise(Spec((ObjectGroup("square", "red", 2, "left"),)), rng, width=96)
    image = world.render(scene)
    assert image.shape == (96, 96, 3)
    found = analyse(image).objects
    assert [(o.shape, o.colour, o.position) for o in found] == [("square", "red", "left")] * 2


def test_tokenizer_corpus_is_deterministic_and_covers_the_words():
    from blip3o_fast.shapes.world import BACKGROUNDS, COLOURS, NUMBER_WORDS, SHAPES, tokenizer_corpus

    corpus = tokenizer_corpus(200)
    assert corpus == tokenizer_corpus(200)
    words = set(" ".join(corpus).replace("?", " ").replace(",", " ").split())
    needed = set(COLOURS) | set(BACKGROUNDS) | set(SHAPES) | {s + "s" for s in SHAPES} | set(NUMBER_WORDS[1:])
    assert needed <= words


@pytest.mark.parametrize("groups, relation, positions", [
    ((ObjectGroup("circle"),), None, ["centre"]),
    ((ObjectGroup("circle", None, 2),), None, ["left", "right"]),
    ((ObjectGroup("circle", None, 3),), None, ["left", "centre", "right"]),
    ((ObjectGroup("circle", "red"), ObjectGroup("square", None, 2)), None, ["left", "centre", "right"]),
    ((ObjectGroup("circle", None, 1, "centre"), ObjectGroup("square")), None, ["centre", "left"]),
    ((ObjectGroup("circle", None, 2, "left"), ObjectGroup("square", None, 1)), None, ["left", "left", "centre"]),
    ((ObjectGroup("circle", None, 1, "left"), ObjectGroup("square"), ObjectGroup("triangle")), None,
     ["left", "right", "centre"]),
    ((ObjectGroup("circle", "red"), ObjectGroup("square", "blue")), "below", ["bottom", "top"]),
])
def test_open_positions_follow_the_world_habit(groups, relation, positions):
    """Objects whose caption names no position stand in a row across the middle, in caption order."""
    for seed in range(3):
        scene = world.realise(Spec(groups, relation), np.random.default_rng(seed))
        assert [o.position for o in scene.objects] == positions
