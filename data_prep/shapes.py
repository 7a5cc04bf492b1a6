"""Synthetic "Shapes" world: a tiny, fully deterministic vision-language data set.

Each image shows 1-6 coloured shapes placed in distinct cells of a 3x3 grid on a plain light
background. Every piece of text (captions, questions, answers, preference pairs, POPE/CHAIR
evaluation files) is derived from a structured ``Scene``, so tests and evaluators can recompute
the ground truth with ``caption(scene)`` and ``answer_question(scene, qtype, params)``.

Everything is seeded through ``random.Random`` instances derived from ``(seed, stream name)`` with
SHA-256, so the same seed gives byte-identical files (PNG included) and one stream's length never
shifts another's (e.g. changing the number of preference pairs leaves the scenes unchanged).

Output layout under ``out_dir`` (image paths inside JSON are relative to ``out_dir/images``)::

    images/{train,eval}/000000.png
    scenes/train.jsonl, scenes/eval.jsonl          ground-truth scenes, one line per image
    scenes/instruct_struct.jsonl                   structured (qtype, params) behind instruct.json
    scenes/preference_struct.jsonl                 structured form behind preference.json
    scenes/vqa_struct.jsonl                        structured form behind eval/vqa.jsonl
    captions.json                                  LLaVA-Pretrain style caption conversations
    instruct.json                                  LLaVA instruction conversations (+ ~2% text-only)
    preference.json                                RLAIF-V style chosen/rejected pairs
    eval/vqa.jsonl                                 short-answer VQA over the eval images
    eval/pope_{random,popular,adversarial}.jsonl   POPE-format object probing
    eval/chair.jsonl, eval/chair_synonyms.json     CHAIR ground truth and synonym table
    corpus.txt                                     text-only corpus, one document per line
    manifest.json                                  config, record counts and SHA-256 (written last)

Run::

    python -m data_prep.shapes --out data/shapes --seed 0 --preset demo
    python -m data_prep.shapes --out data/shapes_gpu --preset gpu --set n_train_images=5000
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import logging
import math
import multiprocessing
import os
import random
import re
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

# Bump when the generator's output changes so stale worlds are regenerated rather than reused.
GENERATOR_VERSION = 3

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES: tuple[str, ...] = ("small", "large")
ROWS: tuple[str, ...] = ("top", "middle", "bottom")
COLS: tuple[str, ...] = ("left", "center", "right")
QTYPES: tuple[str, ...] = ("existence", "color", "count", "position", "relation", "shape")
RELATIONS: tuple[str, ...] = ("left", "right", "above", "below")
RELATION_PHRASES: dict[str, str] = {
    "left": "to the left of",
    "right": "to the right of",
    "above": "above",
    "below": "below",
}

# Saturated, well separated colours (pairwise RGB distance > 90) so a tiny vision tower can tell them apart.
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 180),
    "orange": (250, 130, 10),
}
BACKGROUND_RGB: tuple[int, int, int] = (245, 245, 238)

PLURALS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "star": "stars",
    "cross": "crosses",
    "diamond": "diamonds",
}

# Object vocabulary for CHAIR: canonical shape -> words a model may use for it.
CHAIR_SYNONYMS: dict[str, list[str]] = {
    "circle": ["circle", "circles", "ring", "rings", "disc", "discs", "disk", "dot", "dots"],
    "square": ["square", "squares", "box", "boxes"],
    "triangle": ["triangle", "triangles"],
    "star": ["star", "stars"],
    "cross": ["cross", "crosses", "plus", "plus sign", "plus signs"],
    "diamond": ["diamond", "diamonds", "rhombus", "rhombi", "lozenge"],
}

# Non-uniform shape prior so POPE "popular" negatives differ from "random" ones.
SHAPE_WEIGHTS: tuple[float, ...] = (0.26, 0.22, 0.17, 0.13, 0.12, 0.10)
# Companion shapes co-occur more often than chance, so POPE "adversarial" differs from "popular".
SHAPE_COMPANIONS: dict[str, str] = {
    "circle": "star",
    "star": "circle",
    "square": "cross",
    "cross": "square",
    "triangle": "diamond",
    "diamond": "triangle",
}
COMPANION_PROB = 0.4

CAPTION_PROMPTS: tuple[str, ...] = (
    "Describe the image briefly.",
    "What is in this picture?",
    "Give a short description of the image.",
    "List the objects in the image.",
)

# Text-only instruction data (exercises the loaders' no-image path): key -> (question, answer).
WORLD_FACTS: dict[str, tuple[str, str]] = {
    "square_sides": ("How many sides does a square have?", "4"),
    "triangle_sides": ("How many sides does a triangle have?", "3"),
    "diamond_sides": ("How many sides does a diamond have?", "4"),
    "star_points": ("How many points does a star have?", "5"),
    "cross_arms": ("How many arms does a cross have?", "4"),
    "circle_corners": ("How many corners does a circle have?", "0"),
    "mix_red_yellow": ("What color do you get by mixing red and yellow?", "orange"),
    "mix_blue_yellow": ("What color do you get by mixing blue and yellow?", "green"),
    "mix_red_blue": ("What color do you get by mixing red and blue?", "purple"),
    "sky": ("What color is the sky on a clear day?", "blue"),
    "grass": ("What color is fresh grass?", "green"),
    "banana": ("What color is a ripe banana?", "yellow"),
}

POPE_VARIANTS: tuple[str, ...] = ("random", "popular", "adversarial")


# --------------------------------------------------------------------------------------------
# Scene model
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Obj:
    """One object: a shape of a colour and size in grid cell (row, col), both in 0..2."""

    shape: str
    color: str
    size: str
    row: int
    col: int

    @property
    def cell(self) -> int:
        """Row-major cell index 0..8."""
        return self.row * 3 + self.col

    @property
    def position(self) -> str:
        return position_phrase(self.row, self.col)

    def to_dict(self) -> dict[str, Any]:
        return {"shape": self.shape, "color": self.color, "size": self.size, "row": self.row, "col": self.col}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Obj:
        return cls(shape=d["shape"], color=d["color"], size=d["size"], row=int(d["row"]), col=int(d["col"]))


@dataclass(frozen=True)
class Scene:
    """A set of objects in distinct cells, kept in row-major cell order; ``image`` is relative to images/."""

    objects: tuple[Obj, ...]
    image: str = ""

    def __post_init__(self) -> None:
        # Canonical order makes captions and serialisation independent of construction order.
        ordered = tuple(sorted(self.objects, key=lambda o: o.cell))
        if len({o.cell for o in ordered}) != len(ordered):
            raise ValueError("objects must occupy distinct cells")
        object.__setattr__(self, "objects", ordered)

    def to_dict(self) -> dict[str, Any]:
        return {"image": self.image, "objects": [o.to_dict() for o in self.objects]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scene:
        return cls(objects=tuple(Obj.from_dict(o) for o in d["objects"]), image=d.get("image", ""))

    def shapes(self) -> set[str]:
        return {o.shape for o in self.objects}

    def find(self, shape: str | None = None, color: str | None = None) -> list[Obj]:
        return [o for o in self.objects if (shape is None or o.shape == shape) and (color is None or o.color == color)]

    def at(self, row: int, col: int) -> Obj | None:
        for o in self.objects:
            if o.row == row and o.col == col:
                return o
        return None

    def identifiable(self) -> list[Obj]:
        """Objects whose colour+shape combination is unique, i.e. can be referred to unambiguously."""
        counts = Counter((o.color, o.shape) for o in self.objects)
        return [o for o in self.objects if counts[(o.color, o.shape)] == 1]

    def unique_shapes(self) -> list[str]:
        counts = Counter(o.shape for o in self.objects)
        return [s for s in SHAPES if counts[s] == 1]


@dataclass(frozen=True)
class WorldPreset:
    """Size knobs of a generated world; any field can be overridden in ``build_world(**overrides)``."""

    name: str
    image_size: int = 96
    n_train_images: int = 12000
    """The demo size: 12k images render in about 10 s, and a small VLM trained on each image once learns to read
    them; on 1.5k images seen five times it learnt to recall answers instead."""
    n_eval_images: int = 200
    min_objects: int = 1
    max_objects: int = 6
    min_turns: int = 2
    max_turns: int = 4
    vqa_per_eval_image: int = 4
    n_preference_pairs: int = 600
    text_only_fraction: float = 0.02
    pope_per_image: int = 3


PRESETS: dict[str, WorldPreset] = {
    "demo": WorldPreset(name="demo"),
    "gpu": WorldPreset(name="gpu", n_train_images=20000, n_eval_images=1000, n_preference_pairs=6000),
}


def get_preset(name: str, **overrides: Any) -> WorldPreset:
    """Return preset ``name`` with ``overrides`` applied; unknown fields raise ``TypeError``."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    known = {f.name for f in dataclasses.fields(WorldPreset)} - {"name"}
    unknown = set(overrides) - known
    if unknown:
        raise TypeError(f"unknown preset fields: {sorted(unknown)}")
    preset = dataclasses.replace(PRESETS[name], **overrides)
    if not 1 <= preset.min_objects <= preset.max_objects <= 6:
        # More than 6 objects would leave fewer than 3 free cells / absent shapes for negatives.
        raise ValueError("need 1 <= min_objects <= max_objects <= 6")
    if not 1 <= preset.min_turns <= preset.max_turns:
        raise ValueError("need 1 <= min_turns <= max_turns")
    if preset.image_size < 16:
        raise ValueError("image_size must be >= 16")
    return preset


# --------------------------------------------------------------------------------------------
# Deterministic randomness
# --------------------------------------------------------------------------------------------


def derive_rng(seed: int, *names: str | int) -> random.Random:
    """Independent RNG for a named stream; SHA-256 instead of ``hash()`` because str hashing is salted."""
    key = ":".join([str(seed), *map(str, names)]).encode()
    return random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "big"))


def generate_scene(rng: random.Random, min_objects: int = 1, max_objects: int = 6, image: str = "") -> Scene:
    """Sample a scene: distinct cells, weighted shapes with companion co-occurrence, uniform colour and size."""
    n = rng.randint(min_objects, max_objects)
    cells = rng.sample(range(9), n)
    objs: list[Obj] = []
    for cell in cells:
        if objs and rng.random() < COMPANION_PROB:
            shape = SHAPE_COMPANIONS[rng.choice(objs).shape]
        else:
            shape = rng.choices(SHAPES, weights=SHAPE_WEIGHTS)[0]
        objs.append(Obj(shape, rng.choice(COLORS), rng.choice(SIZES), cell // 3, cell % 3))
    return Scene(tuple(objs), image=image)


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[list[tuple[float, float]]]:
    """Polygons (in drawing coordinates) approximating ``shape`` of radius ``r`` centred at (cx, cy)."""
    if shape == "square":
        h = r * 0.85  # comparable area to the circle so size reads consistently across shapes
        return [[(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]]
    if shape == "triangle":
        # Upward equilateral triangle, shifted down so its bounding box is centred in the cell.
        dy = r * 0.25
        return [
            [(cx + r * math.cos(a), cy + dy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        ]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + 0.08 * r + rad * math.sin(a)))
        return [pts]
    if shape == "cross":
        h, w = r * 0.9, r * 0.32
        return [
            [(cx - h, cy - w), (cx + h, cy - w), (cx + h, cy + w), (cx - h, cy + w)],
            [(cx - w, cy - h), (cx + w, cy - h), (cx + w, cy + h), (cx - w, cy + h)],
        ]
    if shape == "diamond":
        return [[(cx, cy - r), (cx + 0.72 * r, cy), (cx, cy + r), (cx - 0.72 * r, cy)]]
    raise ValueError(f"no polygon for shape {shape!r}")


def render_scene(scene: Scene, image_size: int = 96, rng: random.Random | None = None) -> Image.Image:
    """Draw ``scene`` as an RGB image; ``rng`` adds a small in-cell jitter (none when ``None``).

    Shapes are drawn supersampled and box-downsampled for anti-aliased edges at small sizes. Radius plus
    jitter stays below half a cell, so every object lies inside its own cell.
    """
    ss = max(2, min(4, 512 // image_size))
    big = image_size * ss
    cell = big / 3
    img = Image.new("RGB", (big, big), BACKGROUND_RGB)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        r = cell * (0.40 if o.size == "large" else 0.25)
        # Jitter is small enough that the cell centre stays inside every shape (tests rely on it).
        jx, jy = (rng.uniform(-0.04, 0.04) * cell, rng.uniform(-0.04, 0.04) * cell) if rng else (0.0, 0.0)
        cx, cy = (o.col + 0.5) * cell + jx, (o.row + 0.5) * cell + jy
        fill = COLOR_RGB[o.color]
        if o.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            for poly in _shape_polygon(o.shape, cx, cy, r):
                draw.polygon(poly, fill=fill)
    return img.resize((image_size, image_size), Image.Resampling.BOX)


# --------------------------------------------------------------------------------------------
# Text derived from scenes
# --------------------------------------------------------------------------------------------


def position_phrase(row: int, col: int) -> str:
    """'top left', 'middle right', ...; the middle cell is just 'center'."""
    if row == 1 and col == 1:
        return "center"
    return f"{ROWS[row]} {COLS[col]}"


_PHRASE_TO_CELL: dict[str, tuple[int, int]] = {position_phrase(r, c): (r, c) for r in range(3) for c in range(3)}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def describe_object(o: Obj) -> str:
    return f"a {o.size} {o.color} {o.shape} at the {o.position}"


def caption(scene: Scene) -> str:
    """Row-major listing, e.g. 'a large red circle at the top left, a small blue square at the center.'"""
    return ", ".join(describe_object(o) for o in scene.objects) + "."


_CAPTION_RE = re.compile(r"an? (small|large) (\w+) (\w+) at the ((?:top|middle|bottom) (?:left|center|right)|center)")


def parse_caption(text: str) -> list[Obj]:
    """Inverse of ``caption`` (also useful to score generated captions); unparseable parts are ignored."""
    objs = []
    for size, color, shape, pos in _CAPTION_RE.findall(text):
        row, col = _PHRASE_TO_CELL[pos]
        objs.append(Obj(shape, color, size, row, col))
    return objs


def _ref(color: str, shape: str) -> str:
    return f"{color} {shape}"


def question_text(qtype: str, params: dict[str, Any]) -> str:
    """Render a structured question; one phrasing per form keeps the vocabulary small and regular."""
    if qtype == "existence":
        noun = _ref(params["color"], params["shape"]) if params.get("color") else params["shape"]
        return f"Is there {_article(noun)} {noun} in the image?"
    if qtype == "color":
        return f"What color is the {params['shape']}?"
    if qtype == "count":
        noun = PLURALS[params["shape"]] if params.get("shape") else "shapes"
        if params.get("color"):
            noun = f"{params['color']} {noun}"
        return f"How many {noun} are there?"
    if qtype == "position":
        return f"Where is the {_ref(params['color'], params['shape'])}?"
    if qtype == "relation":
        rel = RELATION_PHRASES[params["relation"]]
        a, b = _ref(params["a_color"], params["a_shape"]), _ref(params["b_color"], params["b_shape"])
        return f"Is the {a} {rel} the {b}?"
    if qtype == "shape":
        return f"What shape is at the {position_phrase(params['row'], params['col'])}?"
    if qtype == "fact":
        return WORLD_FACTS[params["fact"]][0]
    raise ValueError(f"unknown question type {qtype!r}")


def _unique(scene: Scene, shape: str, color: str | None = None) -> Obj:
    found = scene.find(shape=shape, color=color)
    if len(found) != 1:
        raise ValueError(f"{color or ''} {shape} is not uniquely identifiable ({len(found)} matches)")
    return found[0]


def answer_question(scene: Scene | None, qtype: str, params: dict[str, Any]) -> str:
    """Ground-truth short answer recomputed from the scene; raises ``ValueError`` for ill-posed questions."""
    if qtype == "fact":
        return WORLD_FACTS[params["fact"]][1]
    if scene is None:
        raise ValueError(f"{qtype} questions need a scene")
    if qtype == "existence":
        return "yes" if scene.find(shape=params["shape"], color=params.get("color")) else "no"
    if qtype == "color":
        return _unique(scene, params["shape"]).color
    if qtype == "count":
        return str(len(scene.find(shape=params.get("shape"), color=params.get("color"))))
    if qtype == "position":
        return _unique(scene, params["shape"], params["color"]).position
    if qtype == "relation":
        a = _unique(scene, params["a_shape"], params["a_color"])
        b = _unique(scene, params["b_shape"], params["b_color"])
        if a is b:
            raise ValueError("relation between an object and itself")
        holds = {
            "left": a.col < b.col,
            "right": a.col > b.col,
            "above": a.row < b.row,
            "below": a.row > b.row,
        }[params["relation"]]
        return "yes" if holds else "no"
    if qtype == "shape":
        o = scene.at(params["row"], params["col"])
        if o is None:
            raise ValueError("shape question about an empty cell")
        return o.shape
    raise ValueError(f"unknown question type {qtype!r}")


def available_qtypes(scene: Scene) -> list[str]:
    """Question types that have at least one well-posed question for ``scene``."""
    out = ["existence", "count", "shape"]
    if scene.unique_shapes():
        out.append("color")
    ident = scene.identifiable()
    if ident:
        out.append("position")
    if len(ident) >= 2:
        out.append("relation")
    return [q for q in QTYPES if q in out]


def _sample_existence(rng: random.Random, scene: Scene, want: str | None = None) -> dict[str, Any]:
    """Yes/no balanced within each form: "Is there a <shape>?" (POPE's form: a no is an absent shape) and "Is
    there a <colour> <shape>?" (a no prefers a present shape in another colour: attribute binding)."""
    want = want or rng.choice(("yes", "no"))
    absent_shapes = [s for s in SHAPES if s not in scene.shapes()]
    present_combos = {(o.color, o.shape) for o in scene.objects}
    hard_combos = [(c, s) for s in SHAPES if s in scene.shapes() for c in COLORS if (c, s) not in present_combos]
    shape_only = rng.random() < 0.5 and (want == "yes" or bool(absent_shapes))
    if want == "yes":
        o = rng.choice(scene.objects)
        return {"shape": o.shape} if shape_only else {"shape": o.shape, "color": o.color}
    if shape_only:
        return {"shape": rng.choice(absent_shapes)}
    color, shape = rng.choice(hard_combos or [(c, s) for s in absent_shapes for c in COLORS])
    return {"shape": shape, "color": color}


def sample_question(rng: random.Random, scene: Scene, qtype: str) -> dict[str, Any]:
    """Sample well-posed params of ``qtype`` for ``scene`` (``qtype`` must be in ``available_qtypes``)."""
    if qtype == "existence":
        return _sample_existence(rng, scene)
    if qtype == "color":
        return {"shape": rng.choice(scene.unique_shapes())}
    if qtype == "count":
        kind = rng.choice(("all", "color", "shape"))
        if kind == "all":
            return {}
        # Half the time ask about a present attribute so non-zero counts are common, else any (may be 0).
        if kind == "color":
            pool = [o.color for o in scene.objects] if rng.random() < 0.5 else list(COLORS)
            return {"color": rng.choice(pool)}
        pool = [o.shape for o in scene.objects] if rng.random() < 0.5 else list(SHAPES)
        return {"shape": rng.choice(pool)}
    if qtype == "position":
        o = rng.choice(scene.identifiable())
        return {"shape": o.shape, "color": o.color}
    if qtype == "relation":
        a, b = rng.sample(scene.identifiable(), 2)
        want = rng.choice(("yes", "no"))
        rels = list(RELATIONS)
        rng.shuffle(rels)
        # Try to hit the wanted answer so yes/no stay roughly balanced; fall back to whatever comes.
        params = {"a_shape": a.shape, "a_color": a.color, "b_shape": b.shape, "b_color": b.color}
        for rel in rels:
            cand = {**params, "relation": rel}
            if answer_question(scene, "relation", cand) == want:
                return cand
        return {**params, "relation": rels[0]}
    if qtype == "shape":
        o = rng.choice(scene.objects)
        return {"row": o.row, "col": o.col}
    raise ValueError(f"cannot sample question type {qtype!r}")


def _wrong_answer(rng: random.Random, scene: Scene, qtype: str, params: dict[str, Any], right: str) -> str:
    """A plausible but wrong answer from the same answer domain (used for rejected preference answers)."""
    if right in ("yes", "no"):
        return "no" if right == "yes" else "yes"
    if qtype == "color":
        return rng.choice([c for c in COLORS if c != right])
    if qtype == "position":
        return rng.choice([p for p in _PHRASE_TO_CELL if p != right])
    if qtype == "shape":
        # Prefer an absent shape: naming a shape that is not there is the classic object hallucination.
        absent = [s for s in SHAPES if s not in scene.shapes()]
        return rng.choice(absent or [s for s in SHAPES if s != right])
    if qtype == "count":
        n = int(right)
        return str(n + 1 if n == 0 else n + rng.choice((-1, 1)))
    raise ValueError(f"no wrong answer for {qtype!r}")


def corrupt_scene(rng: random.Random, scene: Scene) -> tuple[Scene, str]:
    """Hallucinated variant of ``scene``: an added absent-shape object, a wrong colour or a wrong position."""
    free = [c for c in range(9) if c not in {o.cell for o in scene.objects}]
    absent = [s for s in SHAPES if s not in scene.shapes()]
    kinds = ["wrong_color", "wrong_position"] + (["absent_object"] * 2 if absent and free else [])
    kind = rng.choice(kinds)
    objs = list(scene.objects)
    if kind == "absent_object":
        cell = rng.choice(free)
        objs.append(Obj(rng.choice(absent), rng.choice(COLORS), rng.choice(SIZES), cell // 3, cell % 3))
    else:
        i = rng.randrange(len(objs))
        o = objs[i]
        if kind == "wrong_color":
            objs[i] = dataclasses.replace(o, color=rng.choice([c for c in COLORS if c != o.color]))
        else:
            cell = rng.choice(free)
            objs[i] = dataclasses.replace(o, row=cell // 3, col=cell % 3)
    return Scene(tuple(objs), image=scene.image), kind


# --------------------------------------------------------------------------------------------
# World building
# --------------------------------------------------------------------------------------------


@dataclass
class _Writer:
    """Collects output files so hashes and record counts land in the manifest."""

    root: Path
    counts: dict[str, int] = field(default_factory=dict)
    sha256: dict[str, str] = field(default_factory=dict)

    def _write(self, rel: str, data: bytes, n_records: int) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.counts[rel] = n_records
        self.sha256[rel] = hashlib.sha256(data).hexdigest()

    def jsonl(self, rel: str, records: Sequence[dict[str, Any]]) -> None:
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
        self._write(rel, data, len(records))

    def json(self, rel: str, obj: Any, n_records: int | None = None) -> None:
        # Lists get one record per line: valid JSON, compact, yet still greppable and diff-friendly.
        if isinstance(obj, list):
            text = "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in obj) + "\n]\n"
        else:
            text = json.dumps(obj, ensure_ascii=False, indent=1) + "\n"
        data = text.encode()
        self._write(rel, data, len(obj) if n_records is None else n_records)

    def lines(self, rel: str, lines: Sequence[str]) -> None:
        self._write(rel, "".join(line + "\n" for line in lines).encode(), len(lines))


def _image_rel(split: str, i: int) -> str:
    return f"{split}/{i:06d}.png"


RENDER_CHUNK = 1000
"""Fewest images per rendering process: a smaller split renders in this one (a fork costs more than it saves)."""


def _render_workers(n_images: int) -> int:
    """Processes to render ``n_images`` with: one per CPU this process may use, where ``fork`` is available."""
    if "fork" not in multiprocessing.get_all_start_methods():
        return 1
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cpus, n_images // RENDER_CHUNK))


def _render_images(root: Path, seed: int, split: str, image_size: int, items: Sequence[tuple[int, Scene]]) -> None:
    for i, scene in items:
        # Per-image jitter stream: rendering image i never depends on how many images precede it (or which
        # process renders it).
        img = render_scene(scene, image_size, derive_rng(seed, "render", split, i))
        # PIL writes no timestamps into PNGs, so identical pixels give identical bytes.
        img.save(root / "images" / scene.image, format="PNG")


def _render_split(root: Path, seed: int, split: str, scenes: Sequence[Scene], image_size: int) -> None:
    """Draw and write a split's images, spread over the CPUs (forked processes, which only draw and write PNGs):
    on 2 CPUs the demo's 12.2k images took 17 s in one process."""
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    items = list(enumerate(scenes))
    workers = _render_workers(len(items))
    render = functools.partial(_render_images, root, seed, split, image_size)
    if workers == 1:
        render(items)
        return
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        list(pool.map(render, [items[k::workers] for k in range(workers)]))


def _build_instruct(
    seed: int, scenes: Sequence[Scene], preset: WorldPreset
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rng = derive_rng(seed, "instruct")
    records, structs = [], []
    for i, scene in enumerate(scenes):
        n_turns = rng.randint(preset.min_turns, preset.max_turns)
        qtypes = available_qtypes(scene)
        turns: list[tuple[str, dict[str, Any]]] = []
        seen: set[str] = set()
        for _ in range(n_turns * 4):  # bounded retries: tiny scenes may have few distinct questions
            if len(turns) == n_turns:
                break
            qtype = rng.choice(qtypes)
            params = sample_question(rng, scene, qtype)
            q = question_text(qtype, params)
            if q not in seen:
                seen.add(q)
                turns.append((qtype, params))
        conv = []
        for t, (qtype, params) in enumerate(turns):
            q = question_text(qtype, params)
            conv.append({"from": "human", "value": ("<image>\n" + q) if t == 0 else q})
            conv.append({"from": "gpt", "value": answer_question(scene, qtype, params)})
        rid = f"ins-{i:06d}"
        records.append({"id": rid, "image": scene.image, "conversations": conv})
        structs.append({"id": rid, "image": scene.image, "turns": [{"qtype": q, "params": p} for q, p in turns]})

    n_text = max(1, round(len(scenes) * preset.text_only_fraction)) if scenes else 0
    fact_keys = list(WORLD_FACTS)
    for j in range(n_text):
        keys = rng.sample(fact_keys, rng.randint(1, 2))
        conv = []
        for k in keys:
            conv.append({"from": "human", "value": WORLD_FACTS[k][0]})
            conv.append({"from": "gpt", "value": WORLD_FACTS[k][1]})
        rid = f"ins-text-{j:06d}"
        records.append({"id": rid, "conversations": conv})
        structs.append({"id": rid, "image": None, "turns": [{"qtype": "fact", "params": {"fact": k}} for k in keys]})
    return records, structs


def _build_captions(seed: int, scenes: Sequence[Scene]) -> list[dict[str, Any]]:
    rng = derive_rng(seed, "captions")
    return [
        {
            "id": f"cap-{i:06d}",
            "image": scene.image,
            "conversations": [
                {"from": "human", "value": "<image>\n" + rng.choice(CAPTION_PROMPTS)},
                {"from": "gpt", "value": caption(scene)},
            ],
        }
        for i, scene in enumerate(scenes)
    ]


def _build_preference(
    seed: int, scenes: Sequence[Scene], n_pairs: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rng = derive_rng(seed, "preference")
    records, structs = [], []
    if not scenes:
        return records, structs
    for i in range(n_pairs):
        scene = scenes[rng.randrange(len(scenes))]
        rid = f"pref-{i:06d}"
        if rng.random() < 0.5:
            bad, kind = corrupt_scene(rng, scene)
            question, chosen, rejected = rng.choice(CAPTION_PROMPTS), caption(scene), caption(bad)
            struct: dict[str, Any] = {"style": "caption", "corruption": kind}
        else:
            qtype = rng.choice([q for q in available_qtypes(scene) if q != "relation"])
            # Existence pairs are balanced: an absent object (rejected "yes" is a hallucination) as often as a
            # present one (rejected "no"). All-absent pairs teach a policy to answer "no" to everything (seen on
            # the gpu preset: POPE yes-ratio 0 after preference training).
            params = sample_question(rng, scene, qtype)
            question = question_text(qtype, params)
            chosen = answer_question(scene, qtype, params)
            rejected = _wrong_answer(rng, scene, qtype, params, chosen)
            struct = {"style": "qa", "qtype": qtype, "params": params}
        records.append({"id": rid, "image": scene.image, "question": question, "chosen": chosen, "rejected": rejected})
        structs.append({"id": rid, "image": scene.image, **struct})
    return records, structs


def _build_vqa(seed: int, scenes: Sequence[Scene], per_image: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rng = derive_rng(seed, "vqa")
    records, structs = [], []
    qid = 0
    for i, scene in enumerate(scenes):
        avail = set(available_qtypes(scene))
        # Round-robin over question types (offset by image) so every type is covered across the split.
        order = [QTYPES[(i + k) % len(QTYPES)] for k in range(len(QTYPES))]
        picked = [q for q in order if q in avail][:per_image]
        for qtype in picked:
            params = sample_question(rng, scene, qtype)
            records.append(
                {
                    "question_id": qid,
                    "image": scene.image,
                    "question": question_text(qtype, params),
                    "answer": answer_question(scene, qtype, params),
                    "question_type": qtype,
                }
            )
            structs.append({"question_id": qid, "image": scene.image, "qtype": qtype, "params": params})
            qid += 1
    return records, structs


def shape_statistics(scenes: Iterable[Scene]) -> tuple[Counter[str], dict[str, Counter[str]]]:
    """Image-level shape frequency and shape co-occurrence counts (POPE popular/adversarial sampling)."""
    freq: Counter[str] = Counter()
    cooc: dict[str, Counter[str]] = {s: Counter() for s in SHAPES}
    for scene in scenes:
        present = scene.shapes()
        freq.update(present)
        for a in present:
            cooc[a].update(present - {a})
    return freq, cooc


def pope_negatives(
    variant: str,
    present: Sequence[str],
    k: int,
    freq: Counter[str],
    cooc: dict[str, Counter[str]],
    rng: random.Random | None = None,
) -> list[str]:
    """``k`` absent shapes: uniform (random), most frequent in train (popular), most co-occurring (adversarial)."""
    absent = [s for s in SHAPES if s not in present]
    if variant == "random":
        if rng is None:
            raise ValueError("random negatives need an rng")
        return rng.sample(absent, k)
    if variant == "popular":
        key = {s: freq[s] for s in absent}
    elif variant == "adversarial":
        key = {s: sum(cooc[p][s] for p in present) for s in absent}
    else:
        raise ValueError(f"unknown POPE variant {variant!r}")
    # Ties broken by SHAPES order so the choice is deterministic and re-derivable in tests.
    return sorted(absent, key=lambda s: (-key[s], SHAPES.index(s)))[:k]


def _build_pope(
    seed: int, eval_scenes: Sequence[Scene], train_scenes: Sequence[Scene], per_image: int
) -> dict[str, list[dict[str, Any]]]:
    freq, cooc = shape_statistics(train_scenes)
    out: dict[str, list[dict[str, Any]]] = {v: [] for v in POPE_VARIANTS}
    for i, scene in enumerate(eval_scenes):
        rng = derive_rng(seed, "pope", i)
        present = sorted(scene.shapes(), key=SHAPES.index)
        k = min(per_image, len(present), len(SHAPES) - len(present))
        if k == 0:
            continue
        # Same positives in every variant (as in POPE); only the negative sampling strategy differs.
        positives = rng.sample(present, k)
        for variant in POPE_VARIANTS:
            negatives = pope_negatives(variant, present, k, freq, cooc, rng)
            for pos, neg in zip(positives, negatives, strict=True):
                for shape, label in ((pos, "yes"), (neg, "no")):
                    recs = out[variant]
                    recs.append(
                        {
                            "question_id": len(recs),
                            "image": scene.image,
                            "text": f"Is there a {shape} in the image?",
                            "label": label,
                        }
                    )
    return out


def _build_corpus(captions: Sequence[dict[str, Any]], instruct: Sequence[dict[str, Any]]) -> list[str]:
    """One document per line: each caption as a sentence, each instruct record as 'Q: ... A: ...' turns."""
    lines = []
    for cap in captions:
        text = cap["conversations"][1]["value"]
        lines.append(text[0].upper() + text[1:])
    for rec in instruct:
        conv = rec["conversations"]
        parts = []
        for h, g in zip(conv[0::2], conv[1::2], strict=True):
            parts.append(f"Q: {h['value'].replace('<image>', '').strip()} A: {g['value']}")
        lines.append(" ".join(parts))
    return lines


_OUTPUT_DIRS = ("images", "scenes", "eval")
_OUTPUT_FILES = ("captions.json", "instruct.json", "preference.json", "corpus.txt", "manifest.json")


def _existing_manifest(out_dir: Path, expect: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest if it matches ``expect`` and every hashed file and image is intact, else ``None``."""
    path = out_dir / "manifest.json"
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if any(manifest.get(k) != v for k, v in expect.items()):
        return None
    for rel, digest in manifest.get("sha256", {}).items():
        f = out_dir / rel
        if not f.is_file() or hashlib.sha256(f.read_bytes()).hexdigest() != digest:
            return None
    for split in ("train", "eval"):
        d = out_dir / "images" / split
        n = manifest["counts"].get(f"images/{split}", -1)
        if not d.is_dir() or sum(1 for _ in d.glob("*.png")) != n:
            return None
    return manifest


def build_world(out_dir: Path | str, seed: int = 0, preset: str = "demo", **overrides: Any) -> dict[str, Any]:
    """Generate the Shapes world under ``out_dir`` and return its manifest.

    Idempotent: an intact world with the same seed, preset and overrides is returned as is. Otherwise the
    generator-owned paths (images/, scenes/, eval/ and the top-level files) are removed and rebuilt.
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    cfg = get_preset(preset, **overrides)
    overrides = dict(sorted(overrides.items()))
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "name"}
    expect = {"generator_version": GENERATOR_VERSION, "seed": seed, "preset": preset, "overrides": overrides}
    existing = _existing_manifest(out_dir, expect)
    if existing is not None:
        logger.info("shapes world at %s is up to date (seed=%d, preset=%s)", out_dir, seed, preset)
        return existing

    # Remove stale outputs first so a smaller rebuild never leaves extra images behind and a crash
    # mid-build leaves no manifest (hence no false "up to date").
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in _OUTPUT_FILES:
        (out_dir / name).unlink(missing_ok=True)
    for name in _OUTPUT_DIRS:
        if (out_dir / name).exists():
            shutil.rmtree(out_dir / name)

    splits: dict[str, list[Scene]] = {}
    for split, n in (("train", cfg.n_train_images), ("eval", cfg.n_eval_images)):
        rng = derive_rng(seed, "scenes", split)
        splits[split] = [
            generate_scene(rng, cfg.min_objects, cfg.max_objects, image=_image_rel(split, i)) for i in range(n)
        ]
        _render_split(out_dir, seed, split, splits[split], cfg.image_size)
    train, evals = splits["train"], splits["eval"]
    t_render = time.perf_counter() - t0

    w = _Writer(out_dir)
    w.counts["images/train"] = len(train)
    w.counts["images/eval"] = len(evals)
    w.jsonl("scenes/train.jsonl", [s.to_dict() for s in train])
    w.jsonl("scenes/eval.jsonl", [s.to_dict() for s in evals])

    captions = _build_captions(seed, train)
    w.json("captions.json", captions)
    instruct, instruct_struct = _build_instruct(seed, train, cfg)
    w.json("instruct.json", instruct)
    w.jsonl("scenes/instruct_struct.jsonl", instruct_struct)
    preference, preference_struct = _build_preference(seed, train, cfg.n_preference_pairs)
    w.json("preference.json", preference)
    w.jsonl("scenes/preference_struct.jsonl", preference_struct)

    vqa, vqa_struct = _build_vqa(seed, evals, cfg.vqa_per_eval_image)
    w.jsonl("eval/vqa.jsonl", vqa)
    w.jsonl("scenes/vqa_struct.jsonl", vqa_struct)
    for variant, recs in _build_pope(seed, evals, train, cfg.pope_per_image).items():
        w.jsonl(f"eval/pope_{variant}.jsonl", recs)
    chair = [{"image_id": i, "image": s.image, "objects": sorted(s.shapes())} for i, s in enumerate(evals)]
    w.jsonl("eval/chair.jsonl", chair)
    w.json("eval/chair_synonyms.json", CHAIR_SYNONYMS)
    w.lines("corpus.txt", _build_corpus(captions, instruct))

    manifest = {**expect, **fields, "counts": dict(sorted(w.counts.items())), "sha256": dict(sorted(w.sha256.items()))}
    # Written last: its presence marks a complete world.
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    logger.info(
        "built shapes world at %s: %d train / %d eval images, %dpx (render %.1fs, total %.1fs)",
        out_dir,
        len(train),
        len(evals),
        cfg.image_size,
        t_render,
        time.perf_counter() - t0,
    )
    return manifest


def load_scenes(path: Path | str) -> list[Scene]:
    """Read a ``scenes/*.jsonl`` file back into ``Scene`` objects."""
    with open(path) as f:
        return [Scene.from_dict(json.loads(line)) for line in f if line.strip()]


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    for conv in (int, float):
        try:
            return key, conv(value)
        except ValueError:
            pass
    return key, value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate the synthetic Shapes vision-language world.")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    parser.add_argument(
        "--set",
        dest="overrides",
        type=_parse_override,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a preset field, e.g. --set n_train_images=100 (repeatable)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    manifest = build_world(args.out, seed=args.seed, preset=args.preset, **dict(args.overrides))
    logger.info("records: %s", json.dumps(manifest["counts"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
