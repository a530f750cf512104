"""The shapes world: scenes of 1-3 coloured shapes, their pictures, captions and questions.

A scene is a list of objects, each with a shape, colour, size and a cell of a 3x3 grid
(distinct cells, so objects never overlap and positions have one right name). Pictures
are rendered with 4x supersampling on varied backgrounds (flat or gradient, light or
dark) with mild noise and a random jitter inside the cell, so a tokenizer must learn
real shapes rather than a lookup table. `backgrounds="plain"` draws the same objects on flat
grey backgrounds (five levels) with faint noise: a world sized for a CPU, whose few background
codes a coarse tokenizer and the visual BPE can spend little on. `snap_grid=G` keeps the jitter but
moves each object's centre to the centre of a block of a GxG lattice (G = a tokenizer's code grid):
objects then move by whole codes, so a stride-aligned encoder gives one object the same codes
wherever it sits, and the visual BPE can merge those codes into object-sized tokens. Everything is a
pure function of a `numpy.random.Generator`, so the world is deterministic given the seed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, asdict, replace

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 225),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
}
SIZES = ("small", "large")
# An object's radius as a share of its cell's side, by size.
OBJECT_RADIUS = {"small": 0.22, "large": 0.40}
# 3x3 grid cells, raster order; names are what captions and questions use.
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
NUMBER_WORDS = ("zero", "one", "two", "three")

_SUPERSAMPLE = 4


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    colour: str
    size: str
    position: str

    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...]
    background: tuple[int, int, int]
    background2: tuple[int, int, int]
    gradient: bool
    noise_seed: int
    noise: float = 4.0
    """Standard deviation of the pixel noise."""
    snap_grid: int = 0
    """Object centres sit at block centres of a snap_grid x snap_grid lattice (0: anywhere)."""

    def to_dict(self) -> dict:
        return {"objects": [asdict(o) for o in self.objects], "background": list(self.background),
                "background2": list(self.background2), "gradient": self.gradient, "noise_seed": self.noise_seed,
                "noise": self.noise, "snap_grid": self.snap_grid}

    @staticmethod
    def from_dict(d: dict) -> "Scene":
        return Scene(tuple(ShapeObject(**o) for o in d["objects"]), tuple(d["background"]), tuple(d["background2"]),
                     bool(d["gradient"]), int(d["noise_seed"]), float(d.get("noise", 4.0)),
                     int(d.get("snap_grid", 0)))


BACKGROUND_LEVELS = (35, 60, 170, 200, 225)
BACKGROUNDS = ("varied", "plain")


def sample_background(rng: np.random.Generator) -> tuple[int, int, int]:
    """Muted greys/tints, light or dark, far from the saturated object colours."""
    base = int(rng.choice(BACKGROUND_LEVELS))
    tint = rng.integers(-15, 16, size=3)
    return tuple(int(np.clip(base + t, 0, 255)) for t in tint)


def sample_scene(rng: np.random.Generator, num_objects: int | None = None, backgrounds: str = "varied",
                 snap_grid: int = 0) -> Scene:
    """A random scene. `backgrounds="plain"` makes the same draws (so the same objects) and then
    flattens the background to the nearest grey level, without gradient, with faint noise.
    `snap_grid` changes no draw either, only where the objects are drawn (see the module doc)."""
    if backgrounds not in BACKGROUNDS:
        raise ValueError(f"backgrounds must be one of {BACKGROUNDS}, got {backgrounds!r}")
    if snap_grid < 0:
        raise ValueError(f"snap_grid must be >= 0, got {snap_grid}")
    scene = _sample_scene(rng, num_objects)
    if backgrounds == "plain":
        grey = min(BACKGROUND_LEVELS, key=lambda b: abs(b - float(np.mean(scene.background))))
        scene = Scene(scene.objects, (grey,) * 3, (grey,) * 3, False, scene.noise_seed, noise=1.0)
    return replace(scene, snap_grid=snap_grid) if snap_grid else scene


def _sample_scene(rng: np.random.Generator, num_objects: int | None = None) -> Scene:
    n = int(num_objects if num_objects is not None else rng.integers(1, 4))
    cells = rng.choice(len(POSITIONS), size=n, replace=False)
    objects = tuple(
        ShapeObject(
            shape=str(rng.choice(SHAPES)),
            colour=str(rng.choice(list(COLOURS))),
            size=str(rng.choice(SIZES)),
            position=POSITIONS[int(c)],
        )
        for c in sorted(cells)
    )
    return Scene(objects, sample_background(rng), sample_background(rng), bool(rng.random() < 0.5), int(rng.integers(0, 2**31)))


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r * 0.85), (cx - r, cy + r * 0.85)]
    if shape == "diamond":
        return [(cx, cy - r * 1.15), (cx + r, cy), (cx, cy + r * 1.15), (cx - r, cy)]
    return None


def jitter_slack(obj: ShapeObject, resolution: int) -> float:
    """How far (pixels at `resolution`) an object's centre may move from its cell's centre, per axis,
    and the object (up to 1.15 radii across, the diamond) still stay inside its cell."""
    cell = resolution / 3.0
    return max(cell / 2 - cell * OBJECT_RADIUS[obj.size] * 1.15, 0.0)


def object_box(obj: ShapeObject, resolution: int, jitter: tuple[float, float] = (0.0, 0.0)) -> tuple[float, float, float]:
    """Center (x, y) and radius in pixels of an object at `resolution`."""
    cell = resolution / 3.0
    idx = POSITIONS.index(obj.position)
    row, col = divmod(idx, 3)
    r = cell * OBJECT_RADIUS[obj.size]
    slack = jitter_slack(obj, resolution)
    cx = (col + 0.5) * cell + jitter[0] * slack
    cy = (row + 0.5) * cell + jitter[1] * slack
    return cx, cy, r


def snap_to_grid(x: float, centre: float, slack: float, block: float) -> float:
    """The block centre ((k + 0.5) * block) nearest `x` among those within `slack` of the cell's
    `centre`; the one nearest the centre if none is (a large object has under a block of slack)."""
    k = np.floor(x / block)
    lo, hi = np.ceil((centre - slack) / block - 0.5), np.floor((centre + slack) / block - 0.5)
    k = np.clip(k, lo, hi) if lo <= hi else np.floor(centre / block)
    return float((k + 0.5) * block)


def render_scene(scene: Scene, resolution: int, offsets: list[tuple[float, float]] | None = None) -> np.ndarray:
    """Scene -> uint8 RGB image (resolution, resolution, 3).

    `offsets` (one per object, in cells) moves objects off their cell centre; videos use it.
    """
    rng = np.random.default_rng(scene.noise_seed)
    size = resolution * _SUPERSAMPLE
    if scene.gradient:
        t = np.linspace(0.0, 1.0, size)[None, :, None]
        bg = (1 - t) * np.array(scene.background)[None, None] + t * np.array(scene.background2)[None, None]
        bg = np.broadcast_to(bg, (size, size, 3))
    else:
        bg = np.broadcast_to(np.array(scene.background, dtype=np.float64), (size, size, 3))
    canvas = Image.fromarray(np.ascontiguousarray(bg).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(canvas)
    for i, obj in enumerate(scene.objects):
        jitter = tuple(rng.uniform(-1, 1, size=2))
        cx, cy, r = object_box(obj, size, jitter)
        if offsets is not None:
            cx += offsets[i][0] * size / 3.0
            cy += offsets[i][1] * size / 3.0
        if scene.snap_grid:
            # a still object stays within its cell's jitter range; a moving one snaps to the block its path is in
            ccx, ccy = (cx, cy) if offsets is not None else object_box(obj, size)[:2]
            slack, block = jitter_slack(obj, size), size / scene.snap_grid
            cx, cy = snap_to_grid(cx, ccx, slack, block), snap_to_grid(cy, ccy, slack, block)
        colour = COLOURS[obj.colour]
        poly = _shape_polygon(obj.shape, cx, cy, r)
        if poly is None:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        else:
            draw.polygon(poly, fill=colour)
    img = canvas.resize((resolution, resolution), Image.Resampling.LANCZOS)
    arr = np.asarray(img).astype(np.int16)
    arr += rng.normal(0, scene.noise, size=arr.shape).round().astype(np.int16)  # mild sensor-like noise
    return np.clip(arr, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- language

_CAPTION_OPENERS = ("", "there is ", "an image of ", "a picture showing ")


def caption(scene: Scene, rng: np.random.Generator | None = None) -> str:
    """Canonical caption, objects in raster order of their cells. With `rng`, the opener varies."""
    parts = [f"{o.phrase()} at the {o.position}" if o.position != "center" else f"{o.phrase()} in the center"
             for o in scene.objects]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    opener = _CAPTION_OPENERS[int(rng.integers(len(_CAPTION_OPENERS)))] if rng is not None else ""
    return (opener + text).capitalize() + "."


def parse_caption(text: str) -> list[ShapeObject]:
    """Inverse of `caption`: objects named in a caption (unparseable parts are skipped). Whitespace is
    normalised first: a generated caption starts with the space of its first word's token (" A picture
    showing ..."), and an opener left unstripped there would make every object unparseable."""
    text = " ".join(text.lower().split()).rstrip(".")
    for opener in _CAPTION_OPENERS[1:]:
        if text.startswith(opener):
            text = text[len(opener):]
    chunks = [c.strip() for part in text.split(", ") for c in part.split(" and ")]
    objects = []
    for chunk in chunks:
        words = chunk.split()
        if len(words) < 4 or words[0] not in ("a", "an"):
            continue
        size, colour, shape = words[1], words[2], words[3]
        rest = " ".join(words[4:])
        position = "center" if rest == "in the center" else rest.removeprefix("at the ").strip()
        if size in SIZES and colour in COLOURS and shape in SHAPES and position in POSITIONS:
            objects.append(ShapeObject(shape, colour, size, position))
    return objects


def object_questions(scene: Scene, obj: ShapeObject) -> list[dict]:
    """Colour, shape, size and (when the description is unique) position of one object."""
    where = "in the center" if obj.position == "center" else f"at the {obj.position}"
    out = [{"type": "colour", "question": f"What colour is the {obj.shape} {where}?", "answer": obj.colour},
           {"type": "shape", "question": f"What shape is {where}?", "answer": obj.shape},
           {"type": "size", "question": f"What size is the {obj.shape} {where}?", "answer": obj.size}]
    if sum((o.size, o.colour, o.shape) == (obj.size, obj.colour, obj.shape) for o in scene.objects) == 1:
        out.append({"type": "position", "question": f"Where is the {obj.size} {obj.colour} {obj.shape}?", "answer": obj.position})
    return out


_EXISTENCE = re.compile(r"Is there a (\w+) (\w+) in the image\?")


def existence_question(colour: str, shape: str, present: bool) -> dict:
    """POPE's question about one (colour, shape) pair, answered "yes" or "no"."""
    return {"type": "exists", "question": f"Is there a {colour} {shape} in the image?", "answer": "yes" if present else "no"}


def existence_pairs(qs: list[dict]) -> set[tuple[str, str]]:
    """The (colour, shape) pairs the existence questions among `qs` ask about: `existence_question` read back
    (its text is all a question keeps, and all the published question files hold)."""
    return {m.groups() for q in qs if q["type"] == "exists" and (m := _EXISTENCE.fullmatch(q["question"]))}


def questions(scene: Scene, rng: np.random.Generator, every_object: bool = False) -> list[dict]:
    """Questions about one scene: attributes of one object (of every object with
    `every_object`, as the training VQA asks), a count, and POPE-style existence probes (half
    present, half absent objects). The held-out set uses one object per scene."""
    obj = scene.objects[int(rng.integers(len(scene.objects)))]
    out = [q for o in (scene.objects if every_object else (obj,)) for q in object_questions(scene, o)]
    out.append({"type": "count", "question": "How many objects are there?", "answer": NUMBER_WORDS[len(scene.objects)]})
    present = {(o.colour, o.shape) for o in scene.objects}
    probe = scene.objects[int(rng.integers(len(scene.objects)))]
    out.append(existence_question(probe.colour, probe.shape, True))
    while True:
        colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
        if (colour, shape) not in present:
            break
    out.append(existence_question(colour, shape, False))
    return out


def existence_probes(scene: Scene, rng: np.random.Generator, asked: set[tuple[str, str]] = frozenset()) -> list[dict]:
    """More existence probes for a training conversation: "yes" for every (colour, shape) in the scene
    not in `asked`, and as many "no" probes. A "no" takes one object's colour with another's shape
    when that pair is absent (only binding colour to shape tells it from a "yes"; POPE's adversarial
    split draws its negatives from co-occurring objects likewise), else any absent pair."""
    present = sorted({(o.colour, o.shape) for o in scene.objects})
    yes = [p for p in present if p not in asked]
    swapped = sorted({(a.colour, b.shape) for a in scene.objects for b in scene.objects} - set(present) - set(asked))
    absent = sorted({(c, s) for c in COLOURS for s in SHAPES} - set(present) - set(asked) - set(swapped))
    no = []
    for _ in yes:
        pool = swapped if swapped else absent
        if not pool:
            break
        no.append(pool.pop(int(rng.integers(len(pool)))))
    return [existence_question(c, s, True) for c, s in yes] + [existence_question(c, s, False) for c, s in no]
