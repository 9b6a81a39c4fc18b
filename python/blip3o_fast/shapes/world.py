"""The synthetic shapes world: scene specs, their captions, seeded layouts, rendering and questions.

A *spec* is what a caption says: object groups (shape, optional colour, count, optional named position) and
optionally a relation between two single objects ("a red circle left of a blue square"). A *scene* realises a
spec: every object gets a colour, a named position, a size and a centre, on a plain background. Captions are
a deterministic function of the spec; everything random comes from one numpy Generator, so a seed gives the
same scenes, captions and image bytes on every machine.

Geometry (normalised offsets u, v from the image centre, in image widths): an object's named position is
"centre" when max(|u|, |v|) < 1/6, otherwise the dominant axis decides (left/right when |u| >= |v|, else
top/bottom). Each region has slots: the centre one at (0, 0), a side region's at SLOT_OFFSET along its axis,
or, for two objects sharing a side, PAIR_OFFSET either side of that axis. A centroid lies within JITTER of its
slot. Layouts keep every centroid POSITION_MARGIN inside its region, objects GAP_FRACTION apart and inside the
image, so the analyser reads back exactly the position the scene says.

Where a caption names no position the world has a habit, as photographs do: open objects stand in a row across
the middle, in caption order (DEFAULT_ROWS), and a relation uses the two opposite side regions. Slots and the
habit keep a caption's images few-moded: the tiny model's flow matching, at the compute of 2 CPU cores,
averages a caption's layouts, and averaged positions decode to an empty image (README, tiny-shapes).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

COLOURS = {
    "red": (230, 25, 25),
    "orange": (255, 140, 0),
    "yellow": (250, 230, 20),
    "green": (30, 170, 40),
    "blue": (30, 70, 230),
    "purple": (150, 40, 190),
}
BACKGROUNDS = {"white": (255, 255, 255), "gray": (128, 128, 128), "black": (0, 0, 0)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "right", "top", "bottom", "centre")
POSITION_PHRASES = {
    "left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
    "centre": "in the centre",
}
RELATIONS = ("left of", "right of", "above", "below")
NUMBER_WORDS = ("zero", "one", "two", "three")
MAX_OBJECTS = 3

CENTRE_HALF_WIDTH = 1 / 6  # the centre region is the middle third in both axes
POSITION_MARGIN = 0.04  # centroids stay this far (in image widths) inside their region
RELATION_GAP = 1 / 8  # "A left of B": B's centroid at least this far right of A's (analyser rule)
MIN_SIZE_FRACTION, MAX_SIZE_FRACTION = 0.2, 0.24  # 13-15 px at 64 px
SLOT_OFFSET = 0.3  # a side region's slot, from the centre along its axis
PAIR_OFFSET = 0.16  # two objects sharing a side region: their slots, either side of its axis
JITTER = 0.03  # a centroid's largest offset from its slot, per axis (2 px at 64)
GAP_FRACTION = 0.05  # free space between bounding boxes (3 px at 64: blur must not bridge objects)
BORDER_FRACTION = 0.03  # free space between objects and the image edge
SUPERSAMPLE = 4  # anti-aliased edges, like a natural image


@dataclass(frozen=True)
class ObjectGroup:
    """`count` objects of one shape; colour / position None when the caption leaves them open."""

    shape: str
    colour: str | None = None
    count: int = 1
    position: str | None = None


@dataclass(frozen=True)
class Spec:
    """What a caption says. relation, when set, relates groups[0] to groups[1] (both single objects)."""

    groups: tuple[ObjectGroup, ...]
    relation: str | None = None

    def __post_init__(self) -> None:
        total = sum(g.count for g in self.groups)
        if not self.groups or total > MAX_OBJECTS:
            raise ValueError(f"a spec needs 1 to {MAX_OBJECTS} objects, got {total}")
        for g in self.groups:
            if g.shape not in SHAPES or (g.colour is not None and g.colour not in COLOURS):
                raise ValueError(f"unknown shape or colour in {g}")
            if g.position is not None and g.position not in POSITIONS:
                raise ValueError(f"unknown position {g.position!r}")
            if g.count < 1 or (g.position == "centre" and g.count > 1):
                raise ValueError(f"bad count in {g} (the centre holds one object)")
        if self.relation is not None:
            if self.relation not in RELATIONS or len(self.groups) != 2 or any(g.count != 1 for g in self.groups):
                raise ValueError(f"a relation needs exactly two single objects: {self}")
            if any(g.position is not None for g in self.groups):
                raise ValueError("a relation spec gives no absolute positions")
        # Groups must be told apart by what the caption says, or counting them is ambiguous.
        for i, a in enumerate(self.groups):
            for b in self.groups[i + 1:]:
                if a.shape == b.shape and (a.colour is None or b.colour is None or a.colour == b.colour):
                    raise ValueError(f"groups {a} and {b} cannot be told apart")

    def caption(self) -> str:
        phrases = [group_phrase(g) for g in self.groups]
        if self.relation is not None:
            return f"{phrases[0]} {self.relation} {phrases[1]}"
        if len(phrases) == 1:
            return phrases[0]
        return ", ".join(phrases[:-1]) + " and " + phrases[-1]

    def to_dict(self) -> dict:
        return {"groups": [asdict(g) for g in self.groups], "relation": self.relation}

    @classmethod
    def from_dict(cls, d: dict) -> "Spec":
        return cls(tuple(ObjectGroup(**g) for g in d["groups"]), d.get("relation"))


def group_phrase(g: ObjectGroup) -> str:
    words = [g.colour] if g.colour else []
    words.append(g.shape + ("s" if g.count > 1 else ""))
    if g.count == 1:
        head = "an" if words[0][0] in "aeiou" else "a"
    else:
        head = NUMBER_WORDS[g.count]
    phrase = " ".join([head, *words])
    return f"{phrase} {POSITION_PHRASES[g.position]}" if g.position else phrase


def position_of(x: float, y: float, width: int, height: int) -> str:
    """Named position of a centroid (module doc: centre square, then the dominant axis)."""
    u, v = x / width - 0.5, y / height - 0.5
    if max(abs(u), abs(v)) < CENTRE_HALF_WIDTH:
        return "centre"
    if abs(u) >= abs(v):
        return "left" if u < 0 else "right"
    return "top" if v < 0 else "bottom"


@dataclass
class PlacedObject:
    shape: str
    colour: str
    position: str
    x: float  # centroid, pixels
    y: float
    size: float  # bounding-box side, pixels

    def extents(self) -> tuple[float, float, float, float]:
        """Bounding box (x0, y0, x1, y1); a triangle's centroid sits a third of its height above its base."""
        h = self.size / 2
        if self.shape == "triangle":
            return self.x - h, self.y - 2 * self.size / 3, self.x + h, self.y + self.size / 3
        return self.x - h, self.y - h, self.x + h, self.y + h


@dataclass
class Scene:
    spec: Spec
    background: str
    objects: list[PlacedObject]
    width: int = 64
    height: int = 64
    caption: str = field(init=False)

    def __post_init__(self) -> None:
        self.caption = self.spec.caption()

    def to_dict(self) -> dict:
        return {
            "caption": self.caption, "spec": self.spec.to_dict(), "background": self.background,
            "width": self.width, "height": self.height, "objects": [asdict(o) for o in self.objects],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        objects = [PlacedObject(**o) for o in d["objects"]]
        return cls(Spec.from_dict(d["spec"]), d["background"], objects, d["width"], d["height"])


# ---------------------------------------------------------------------------------------------- specs
def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _maybe(rng: np.random.Generator, p: float) -> bool:
    return bool(rng.random() < p)


def sample_spec(rng: np.random.Generator) -> Spec:
    """A random caption spec from the training mixture: single objects, counts, two or three objects
    (colours and positions sometimes left open) and relations; every eval prompt form is covered."""
    kind = _pick(rng, ("single", "count", "pair", "relation", "triple"))
    if kind == "single":
        colour = _pick(rng, tuple(COLOURS)) if _maybe(rng, 0.8) else None
        position = _pick(rng, POSITIONS) if _maybe(rng, 0.5) else None
        return Spec((ObjectGroup(_pick(rng, SHAPES), colour, 1, position),))
    if kind == "count":
        count = int(rng.integers(2, MAX_OBJECTS + 1))
        colour = _pick(rng, tuple(COLOURS)) if _maybe(rng, 0.6) else None
        position = _pick(rng, POSITIONS[:4]) if count == 2 and _maybe(rng, 0.3) else None
        return Spec((ObjectGroup(_pick(rng, SHAPES), colour, count, position),))
    if kind == "relation":
        shapes = [_pick(rng, SHAPES), _pick(rng, SHAPES)]
        colours = [str(c) for c in rng.permutation(list(COLOURS))[:2]]
        groups = tuple(ObjectGroup(s, c) for s, c in zip(shapes, colours))
        return Spec(groups, _pick(rng, RELATIONS))
    n_groups = 2 if kind == "pair" else 3
    while True:  # redraw until the groups can be told apart by their caption
        counts = [1] * n_groups
        if n_groups == 2 and _maybe(rng, 0.3):
            counts[int(rng.integers(2))] = 2
        groups = []
        positions = [str(p) for p in rng.permutation(list(POSITIONS))]
        for i, count in enumerate(counts):
            colour = _pick(rng, tuple(COLOURS)) if _maybe(rng, 0.7) else None
            position = positions[i] if _maybe(rng, 0.25) and not (count > 1 and positions[i] == "centre") else None
            groups.append(ObjectGroup(_pick(rng, SHAPES), colour, count, position))
        try:
            return Spec(tuple(groups))
        except ValueError:
            continue


# ---------------------------------------------------------------------------------------------- layout
RELATION_LAYOUT = {  # (position of A, position of B): A clearly left of / above ... B
    "left of": ("left", "right"), "right of": ("right", "left"), "above": ("top", "bottom"), "below": ("bottom", "top"),
}
DEFAULT_ROWS = {0: (), 1: ("centre",), 2: ("left", "right"), 3: ("left", "centre", "right")}
FALLBACK_ORDER = ("centre", "left", "right", "top", "bottom")


def relation_holds(relation: str, a: tuple[float, float], b: tuple[float, float], width: int, height: int) -> bool:
    """The analyser's rule: A's centroid at least RELATION_GAP of the image beyond B's along the relation's axis."""
    dx, dy = (b[0] - a[0]) / width, (b[1] - a[1]) / height
    return {"left of": dx, "right of": -dx, "above": dy, "below": -dy}[relation] >= RELATION_GAP


def _positions_for(spec: Spec) -> list[str]:
    """A named position per object: the spec's, else the world's habit (module doc): open objects stand in a
    row across the middle in caption order (one: centre; two: left, right; three: left, centre, right), each
    in a region of its own, a taken region giving way to the next free one of FALLBACK_ORDER."""
    if spec.relation is not None:
        return list(RELATION_LAYOUT[spec.relation])
    named = [g.position for g in spec.groups for _ in range(g.count)]
    habit = iter(DEFAULT_ROWS[named.count(None)] + FALLBACK_ORDER)
    taken = {p for p in named if p is not None}
    out = []
    for position in named:
        if position is None:
            position = next(p for p in habit if p not in taken)
            taken.add(position)
        out.append(position)
    return out


def _slots(position: str, n: int) -> list[tuple[float, float]]:
    """The (u, v) slots of n objects in one region (module doc)."""
    if position == "centre":
        return [(0.0, 0.0)]
    sign = -1 if position in ("left", "top") else 1
    across = [0.0] if n == 1 else [-PAIR_OFFSET, PAIR_OFFSET]
    if position in ("left", "right"):
        return [(sign * SLOT_OFFSET, a) for a in across]
    return [(a, sign * SLOT_OFFSET) for a in across]


def _place(rng: np.random.Generator, shape: str, colour: str, position: str, slot: tuple[float, float],
           placed: list[PlacedObject], width: int, height: int, tries: int = 50) -> PlacedObject | None:
    gap, border = GAP_FRACTION * width, BORDER_FRACTION * width
    for _ in range(tries):
        size = float(rng.uniform(MIN_SIZE_FRACTION, MAX_SIZE_FRACTION) * min(width, height))
        u, v = (slot[0] + rng.uniform(-JITTER, JITTER), slot[1] + rng.uniform(-JITTER, JITTER))
        obj = PlacedObject(shape, colour, position, float((u + 0.5) * width), float((v + 0.5) * height), size)
        x0, y0, x1, y1 = obj.extents()
        if x0 < border or y0 < border or x1 > width - border or y1 > height - border:
            continue
        if all(_apart(obj.extents(), other.extents(), gap) for other in placed):
            return obj
    return None


def _apart(a, b, gap: float) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def realise(spec: Spec, rng: np.random.Generator, width: int = 64, height: int | None = None) -> Scene:
    """A seeded layout of `spec`: colours the caption leaves open are drawn per group, positions follow the spec
    and the world's habit; sizes and centres are drawn at the slots until every object fits (non-overlapping, in
    its region, relation satisfied)."""
    height = height or width
    background = _pick(rng, tuple(BACKGROUNDS))
    colours = []
    for g in spec.groups:
        colour = g.colour or _pick(rng, tuple(COLOURS))
        colours += [colour] * g.count
    shapes = [g.shape for g in spec.groups for _ in range(g.count)]
    positions = _positions_for(spec)
    for _ in range(100):
        slots = {p: _slots(p, positions.count(p)) for p in set(positions)}
        placed: list[PlacedObject] = []
        for shape, colour, position in zip(shapes, colours, positions):
            obj = _place(rng, shape, colour, position, slots[position].pop(), placed, width, height)
            if obj is None:
                break
            placed.append(obj)
        else:
            a, b = placed[:2] if spec.relation else (None, None)
            if spec.relation is None or relation_holds(spec.relation, (a.x, a.y), (b.x, b.y), width, height):
                return Scene(spec, background, placed, width, height)
    raise RuntimeError(f"could not lay out {spec.caption()!r} at {width}x{height}")


def sample_scene(rng: np.random.Generator, width: int = 64, height: int | None = None) -> Scene:
    return realise(sample_spec(rng), rng, width, height)


# ---------------------------------------------------------------------------------------------- pixels
def _coverage(obj: PlacedObject, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Inside-mask of the object on a grid of sample points (xs: row vector, ys: column vector)."""
    x0, y0, x1, y1 = obj.extents()
    if obj.shape == "circle":
        r = obj.size / 2
        return (xs - obj.x) ** 2 + (ys - obj.y) ** 2 <= r * r
    if obj.shape == "square":
        return (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)
    # Upright isosceles triangle, apex at top centre: half-width grows linearly from apex to base.
    t = (ys - y0) / (y1 - y0)
    return (t >= 0) & (t <= 1) & (np.abs(xs - obj.x) <= t * obj.size / 2)


def shape_mask(shape: str, x: float, y: float, size: float, width: int, height: int) -> np.ndarray:
    """(H, W) bool: which pixel centres an upright shape with this centroid and size covers."""
    xs = (np.arange(width) + 0.5)[None, :]
    ys = (np.arange(height) + 0.5)[:, None]
    return _coverage(PlacedObject(shape, "", "", x, y, size), xs, ys)


def render(scene: Scene) -> np.ndarray:
    """(H, W, 3) uint8, each pixel the mean of SUPERSAMPLE^2 sub-pixel samples (anti-aliased edges)."""
    s = SUPERSAMPLE
    w, h = scene.width, scene.height
    xs = ((np.arange(w * s) + 0.5) / s)[None, :]
    ys = ((np.arange(h * s) + 0.5) / s)[:, None]
    image = np.empty((h, w, 3), dtype=np.float64)
    image[:] = BACKGROUNDS[scene.background]
    for obj in scene.objects:
        cover = _coverage(obj, xs, ys).reshape(h, s, w, s).mean(axis=(1, 3))[..., None]
        image = image * (1 - cover) + np.asarray(COLOURS[obj.colour], dtype=np.float64) * cover
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------- questions
def _plural(shape: str) -> str:
    return shape + "s"


def question_candidates(scene: Scene) -> dict[str, list[tuple[str, str]]]:
    """Every question with a unique true answer, by type: colour, count, position, shape, total, background."""
    objs = scene.objects
    by_shape = {s: [o for o in objs if o.shape == s] for s in SHAPES}
    out: dict[str, list[tuple[str, str]]] = {k: [] for k in ("colour", "count", "position", "shape", "total",
                                                                "background")}
    for shape, group in by_shape.items():
        colours = {o.colour for o in group}
        if len(colours) == 1:
            q = f"What colour is the {shape}?" if len(group) == 1 else f"What colour are the {_plural(shape)}?"
            out["colour"].append((q, group[0].colour))
        out["count"].append((f"How many {_plural(shape)} are there?", NUMBER_WORDS[len(group)]))
    for o in objs:
        if sum(p.shape == o.shape and p.colour == o.colour for p in objs) == 1:
            out["position"].append((f"Where is the {o.colour} {o.shape}?", POSITION_PHRASES[o.position]))
    for colour in COLOURS:
        same = {o.shape for o in objs if o.colour == colour}
        if len(same) == 1:
            n = sum(o.colour == colour for o in objs)
            q = f"What shape is the {colour} object?" if n == 1 else f"What shape are the {colour} objects?"
            out["shape"].append((q, same.pop()))
    out["total"].append(("How many objects are there?", NUMBER_WORDS[len(objs)]))
    out["background"].append(("What colour is the background?", scene.background))
    return out


def sample_questions(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """One random question of every type that has one, in random order: (type, question, answer)."""
    candidates = question_candidates(scene)
    kinds = [k for k in candidates if candidates[k]]
    out = []
    for i in rng.permutation(len(kinds)):
        kind = kinds[int(i)]
        question, answer = _pick(rng, candidates[kind])
        out.append((kind, question, answer))
    return out


def caption_questions(scene: Scene, questions: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """Those of a scene's questions that its caption alone answers. Positions follow from the caption (named or
    the world's habit); colour, shape and position questions name colours, so they stay only when the caption
    names every colour; the background is never in a caption."""
    every_colour_named = all(g.colour is not None for g in scene.spec.groups)
    kinds = ("count", "total") + (("colour", "position", "shape") if every_colour_named else ())
    return [q for q in questions if q[0] in kinds]


def llava_conversation(questions: list[tuple[str, str, str]], context: str = "<image>") -> list[dict]:
    """LLaVA turns; the context (the image placeholder, or a caption) opens the first human turn."""
    turns = []
    for i, (_, question, answer) in enumerate(questions):
        turns.append({"from": "human", "value": (f"{context}\n" if i == 0 else "") + question})
        turns.append({"from": "gpt", "value": answer})
    return turns


@dataclass
class WorldSample:
    key: str
    scene: Scene
    image: np.ndarray
    questions: list[tuple[str, str, str]]

    @property
    def caption(self) -> str:
        return self.scene.caption


def generate(n: int, seed: int, width: int = 64, height: int | None = None, prefix: str = ""):
    """n samples from one seed (a generator: constant memory). Sample i depends only on (seed, i), so a
    prefix of a larger run is the smaller run."""
    for i in range(n):
        scene, questions = _scene_and_questions(seed, i, width, height)
        yield WorldSample(f"{prefix}{i:06d}", scene, render(scene), questions)


def _scene_and_questions(seed: int, i: int, width: int = 64, height: int | None = None):
    """Sample i of a seed's world (without its pixels): everything drawn from one generator seeded by (seed, i)."""
    rng = np.random.default_rng([seed, i])
    scene = sample_scene(rng, width, height)
    return scene, sample_questions(scene, rng)


def tokenizer_corpus(n: int = 500, seed: int = 0) -> list[str]:
    """Text the shapes model's tokenizer is trained on (blip3o_fast.tokenizer.build_tiny_tokenizer): the
    captions, questions and answers of n scenes and the fixed prompt and chat-role words around them, so
    that every word of the world becomes one token. Deterministic (specs and questions only, no pixels)."""
    from blip3o_fast.tokenizer import GENERATION_INSTRUCTION

    lines = [GENERATION_INSTRUCTION.format(""), "You are a helpful assistant.", "system\nuser\nassistant\n"] * 50
    for i in range(n):
        scene, questions = _scene_and_questions(seed, i)
        lines.append(scene.caption)
        lines += [f"{q} {a}" for _, q, a in questions]
    return lines
