"""Mini-GenEval: a fixed prompt set in GenEval's six categories, scored by the shapes analyser.

Prompt set (69 prompts, built by enumeration, no randomness):
  single_object  3   "a circle"                             every shape
  two_object     6   "a circle and a square"                every ordered pair of different shapes
  counting      12   "two squares", "three red triangles"   every shape x {2, 3}, without and with a colour
  colours       18   "a red circle"                         every shape x colour
  position      18   "a red circle on the left" (10),       every named position twice;
                     "a red circle left of a blue square" (8) every relation twice
  colour_attr   12   "a red circle and a blue square"       every ordered shape pair, two colour pairs each

An image passes its prompt when the analysis satisfies all of:
  - for every object group of the prompt, exactly `count` detected objects have its shape (and its colour when
    the prompt names one), and all of them are at its named position when the prompt names one;
  - nothing else is in the image: the number of detected objects equals the number the prompt asks for (a
    blob of no recognisable shape counts as an extra object);
  - for a relation ("A left of B"), A's centroid lies at least world.RELATION_GAP of the image width (height
    for above/below) beyond B's along that axis.
Category accuracy is the fraction of its images that pass; overall is the mean of the category accuracies,
as in GenEval's table.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from blip3o_fast.shapes.analyser import Analysis, analyse
from blip3o_fast.shapes.world import COLOURS, POSITIONS, RELATIONS, SHAPES, ObjectGroup, Spec, relation_holds

CATEGORIES = ("single_object", "two_object", "counting", "colours", "position", "colour_attr")
SEED_STRIDE = 1000  # image k of prompt i uses seed + SEED_STRIDE * i + k


@dataclass(frozen=True)
class EvalPrompt:
    category: str
    spec: Spec

    @property
    def prompt(self) -> str:
        return self.spec.caption()


def eval_prompts() -> list[EvalPrompt]:
    colours = tuple(COLOURS)
    shape_pairs = list(itertools.permutations(SHAPES, 2))
    out = [EvalPrompt("single_object", Spec((ObjectGroup(s),))) for s in SHAPES]
    out += [EvalPrompt("two_object", Spec((ObjectGroup(a), ObjectGroup(b)))) for a, b in shape_pairs]
    for i, (shape, n) in enumerate(itertools.product(SHAPES, (2, 3))):
        out.append(EvalPrompt("counting", Spec((ObjectGroup(shape, None, n),))))
        out.append(EvalPrompt("counting", Spec((ObjectGroup(shape, colours[i % 6], n),))))
    out += [EvalPrompt("colours", Spec((ObjectGroup(s, c),))) for s, c in itertools.product(SHAPES, colours)]
    for i, (position, k) in enumerate(itertools.product(POSITIONS, range(2))):
        out.append(EvalPrompt("position", Spec((ObjectGroup(SHAPES[i % 3], colours[(i + k) % 6], 1, position),))))
    for i, (relation, k) in enumerate(itertools.product(RELATIONS, range(2))):
        a = ObjectGroup(SHAPES[i % 3], colours[i % 6])
        b = ObjectGroup(SHAPES[(i + 1 + k) % 3], colours[(i + 3) % 6])
        out.append(EvalPrompt("position", Spec((a, b), relation)))
    for i, ((a, b), _) in enumerate(itertools.product(shape_pairs, range(2))):
        groups = (ObjectGroup(a, colours[i % 6]), ObjectGroup(b, colours[(i + 2) % 6]))
        out.append(EvalPrompt("colour_attr", Spec(groups)))
    return out


def limit_per_category(prompts: Sequence[EvalPrompt], limit: int | None) -> list[EvalPrompt]:
    """The first `limit` prompts of each category (all when None)."""
    if limit is None:
        return list(prompts)
    seen: dict[str, int] = {}
    out = []
    for p in prompts:
        seen[p.category] = seen.get(p.category, 0) + 1
        if seen[p.category] <= limit:
            out.append(p)
    return out


def _matches(obj, group: ObjectGroup) -> bool:
    return obj.shape == group.shape and (group.colour is None or obj.colour == group.colour)


def check(spec: Spec, analysis: Analysis) -> tuple[bool, str]:
    """(passed, why not) for one analysed image (module doc: the rules)."""
    found = []
    for g in spec.groups:
        hits = [o for o in analysis.objects if _matches(o, g)]
        label = f"{g.colour + ' ' if g.colour else ''}{g.shape}"
        if len(hits) != g.count:
            return False, f"{len(hits)} {label}(s), wanted {g.count}"
        wrong = [o.position for o in hits if g.position is not None and o.position != g.position]
        if wrong:
            return False, f"{label} at {wrong[0]}, wanted {g.position}"
        found.append(hits)
    wanted = sum(g.count for g in spec.groups)
    if len(analysis.objects) != wanted:
        return False, f"{len(analysis.objects)} objects, wanted {wanted}"
    if spec.relation is not None:
        a, b = found[0][0], found[1][0]
        if not relation_holds(spec.relation, (a.x, a.y), (b.x, b.y), analysis.width, analysis.height):
            return False, f"not {spec.relation}: A at ({a.x:.0f}, {a.y:.0f}), B at ({b.x:.0f}, {b.y:.0f})"
    return True, ""


def image_seeds(prompt_index: int, images_per_prompt: int, seed: int) -> list[int]:
    return [seed + SEED_STRIDE * prompt_index + k for k in range(images_per_prompt)]


def score(prompts: Sequence[EvalPrompt], generate: Callable[[list[str], list[int]], list],
          images_per_prompt: int = 4, seed: int = 0, batch_size: int = 8, on_image=None) -> dict:
    """Generate `images_per_prompt` images per prompt through `generate(captions, seeds) -> images`, in
    batches, analyse and check each. `on_image(prompt, seed, image, record)` sees every result (saving).
    Returns {"categories": {name: {prompts, images, passed, accuracy}}, "overall", "records"}."""
    jobs = [(i, p, s) for i, p in enumerate(prompts) for s in image_seeds(i, images_per_prompt, seed)]
    records = []
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start:start + batch_size]
        images = generate([p.prompt for _, p, _ in batch], [s for _, _, s in batch])
        for (i, p, s), image in zip(batch, images):
            analysis = analyse(image)
            passed, reason = check(p.spec, analysis)
            record = {
                "category": p.category, "prompt": p.prompt, "prompt_index": i, "seed": s, "passed": passed,
                "reason": reason, "background": analysis.background,
                "detected": [{"shape": o.shape, "colour": o.colour, "position": o.position,
                              "x": round(o.x, 2), "y": round(o.y, 2), "area": o.area} for o in analysis.objects],
            }
            records.append(record)
            if on_image is not None:
                on_image(p, s, image, record)
    return summarise(records, prompts)


def summarise(records: list[dict], prompts: Sequence[EvalPrompt]) -> dict:
    categories = {}
    for name in CATEGORIES:
        rows = [r for r in records if r["category"] == name]
        if not rows:
            continue
        passed = sum(r["passed"] for r in rows)
        categories[name] = {
            "prompts": sum(p.category == name for p in prompts), "images": len(rows), "passed": passed,
            "accuracy": passed / len(rows),
        }
    overall = sum(c["accuracy"] for c in categories.values()) / len(categories) if categories else 0.0
    return {"categories": categories, "overall": overall, "records": records}


def table(result: dict) -> str:
    lines = [f"{'category':<15}{'prompts':>8}{'images':>8}{'accuracy':>10}"]
    for name, c in result["categories"].items():
        lines.append(f"{name:<15}{c['prompts']:>8}{c['images']:>8}{c['accuracy']:>10.3f}")
    lines.append(f"{'overall (mean of categories)':<31}{result['overall']:>10.3f}")
    return "\n".join(lines)
