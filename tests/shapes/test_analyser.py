"""The analyser and the Mini-GenEval rules: ground-truth renders pass (also noisy and blurred), wrong renders fail."""

import dataclasses

import numpy as np
import pytest

from blip3o_fast.shapes import geneval, world
from blip3o_fast.shapes.analyser import analyse
from blip3o_fast.shapes.world import COLOURS, POSITIONS, SHAPES, ObjectGroup, Spec

PROMPTS = geneval.eval_prompts()
SPEC_OF = {p.prompt: p.spec for p in PROMPTS}
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    radius = int(np.ceil(3 * sigma))
    taps = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2 * sigma**2))
    taps /= taps.sum()
    out = image.astype(np.float64)
    for axis in (0, 1):
        padded = np.pad(out, [(radius, radius) if a == axis else (0, 0) for a in range(3)], mode="edge")
        out = sum(t * np.take(padded, range(i, i + out.shape[axis]), axis=axis) for i, t in enumerate(taps))
    return out


def renderer(mutate=None, noise=0.0, blur=0.0):
    """A perfect "model": the world renders the prompt's spec (or a mutated one) from the image's seed."""
    def generate(captions, seeds):
        images = []
        for caption, seed in zip(captions, seeds):
            rng = np.random.default_rng(seed)
            spec = SPEC_OF[caption] if mutate is None else mutate(SPEC_OF[caption], rng)
            image = world.render(world.realise(spec, rng)).astype(np.float64)
            if blur:
                image = gaussian_blur(image, blur)
            if noise:
                image = image + rng.normal(0.0, noise, image.shape)
            images.append(np.clip(np.rint(image), 0, 255).astype(np.uint8))
        return images
    return generate


def test_prompt_set_sizes():
    sizes = {c: sum(p.category == c for p in PROMPTS) for c in geneval.CATEGORIES}
    assert sizes == {"single_object": 3, "two_object": 6, "counting": 12, "colours": 18, "position": 18,
                     "colour_attr": 12}
    assert len(SPEC_OF) == len(PROMPTS), "prompts must be distinct"
    assert [p.prompt for p in geneval.limit_per_category(PROMPTS, 1)] == [
        "a circle", "a circle and a square", "two circles", "a red circle", "a red circle on the left",
        "a red circle and a yellow square"]


def test_ground_truth_renders_score_one():
    result = geneval.score(PROMPTS, renderer(), images_per_prompt=2, seed=0, batch_size=16)
    failures = [(r["prompt"], r["reason"]) for r in result["records"] if not r["passed"]]
    assert failures == []
    assert result["overall"] == 1.0
    assert {c: r["images"] for c, r in result["categories"].items()} == {
        "single_object": 6, "two_object": 12, "counting": 24, "colours": 36, "position": 36, "colour_attr": 24}


@pytest.mark.parametrize("noise, blur", [(8.0, 0.0), (6.0, 0.8)])
def test_noisy_and_blurred_ground_truth_still_passes(noise, blur):
    result = geneval.score(PROMPTS, renderer(noise=noise, blur=blur), images_per_prompt=1, seed=100)
    assert result["overall"] == 1.0, [(r["prompt"], r["reason"]) for r in result["records"] if not r["passed"]]


def _other(options, current, rng):
    return [o for o in options if o != current][int(rng.integers(len(options) - 1))]


def wrong_colour(spec, rng):
    g = spec.groups[0]
    return dataclasses.replace(spec, groups=(dataclasses.replace(g, colour=_other(list(COLOURS), g.colour, rng)),
                                             *spec.groups[1:]))


def wrong_shape(spec, rng):
    while True:
        g = dataclasses.replace(spec.groups[0], shape=_other(list(SHAPES), spec.groups[0].shape, rng))
        try:
            return dataclasses.replace(spec, groups=(g, *spec.groups[1:]))
        except ValueError:  # it became indistinguishable from another group: draw again
            continue


def wrong_count(spec, rng):
    g = spec.groups[0]
    total = sum(x.count for x in spec.groups)
    if total < world.MAX_OBJECTS:  # one more (off the centre, which holds one)
        g = dataclasses.replace(g, count=g.count + 1, position=None if g.position == "centre" else g.position)
        return Spec((g, *spec.groups[1:]))
    if g.count > 1:
        return Spec((dataclasses.replace(g, count=g.count - 1), *spec.groups[1:]))
    return Spec(spec.groups[1:])


def wrong_position(spec, rng):
    if spec.relation is not None:
        return dataclasses.replace(spec, relation=OPPOSITE[spec.relation])
    g = spec.groups[0]
    return Spec((dataclasses.replace(g, position=_other(list(POSITIONS), g.position, rng)),))


def blank(spec, rng):
    return Spec(())  # never realised: the renderer below paints the background only


MUTATIONS = {  # which prompts each mistake applies to
    "wrong colour": (wrong_colour, lambda s: s.groups[0].colour is not None),
    "wrong shape": (wrong_shape, lambda s: True),
    "wrong count": (wrong_count, lambda s: True),
    "wrong position": (wrong_position, lambda s: s.relation is not None or s.groups[0].position is not None),
}


@pytest.mark.parametrize("mistake", sorted(MUTATIONS))
def test_wrong_renders_fail(mistake):
    mutate, applies = MUTATIONS[mistake]
    prompts = [p for p in PROMPTS if applies(p.spec)]
    result = geneval.score(prompts, renderer(mutate), images_per_prompt=1, seed=7)
    assert len(result["records"]) >= 15
    passed = [r["prompt"] for r in result["records"] if r["passed"]]
    assert passed == [], f"{mistake} renders passed: {passed}"
    assert all(c["accuracy"] == 0.0 for c in result["categories"].values())


def test_blank_and_noise_images_fail():
    def blank_images(captions, seeds):
        return [np.full((64, 64, 3), world.BACKGROUNDS["white"], np.uint8) for _ in captions]

    def noise_images(captions, seeds):
        return [np.random.default_rng(s).integers(0, 256, (64, 64, 3), dtype=np.uint8) for s in seeds]

    for generate in (blank_images, noise_images):
        result = geneval.score(PROMPTS, generate, images_per_prompt=1)
        assert result["overall"] == 0.0


def test_analyser_background_components_and_other_blobs():
    image = np.full((64, 64, 3), world.BACKGROUNDS["black"], np.uint8)
    image[10:16, 5:40] = COLOURS["green"]  # a bar: no square
    image[40:42, 40:42] = COLOURS["red"]  # a speck: below the minimum area
    seen = analyse(image)
    assert seen.background == "black"
    assert [(o.shape, o.colour) for o in seen.objects] == [("other", "green")]
    image[20:60, 20:60] = COLOURS["red"]  # a square, but far bigger than any object of the world
    assert [(o.shape, o.colour) for o in analyse(image).objects] == [("other", "green"), ("other", "red")]
    noisy_border = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    noisy_border[8:-8, 8:-8] = world.BACKGROUNDS["white"]
    assert analyse(noisy_border).background == "none" and analyse(noisy_border).objects == []


def test_blur_bridged_neighbours_are_split():
    # Two squares 2 px apart: a blur joins them above the foreground threshold, not above half contrast.
    image = np.full((64, 64, 3), 255.0)
    image[20:36, 10:26] = COLOURS["blue"]
    image[20:36, 28:44] = COLOURS["blue"]
    seen = analyse(np.clip(np.rint(gaussian_blur(image, 1.0)), 0, 255).astype(np.uint8))
    assert [(o.shape, o.colour) for o in seen.objects] == [("square", "blue")] * 2


def test_check_reasons():
    spec = Spec((ObjectGroup("circle", "red"), ObjectGroup("square", "blue")), "left of")
    scene = world.realise(spec, np.random.default_rng(0))
    ok, why = geneval.check(spec, analyse(world.render(scene)))
    assert ok and why == ""
    ok, why = geneval.check(dataclasses.replace(spec, relation="right of"), analyse(world.render(scene)))
    assert not ok and "right of" in why
    ok, why = geneval.check(Spec((ObjectGroup("circle", "red"),)), analyse(world.render(scene)))
    assert not ok and "2 objects, wanted 1" in why
