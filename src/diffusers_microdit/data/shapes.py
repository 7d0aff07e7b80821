"""Procedural compositional text-to-image data: the embedded default for training from scratch.

Every image holds 1-4 flat, saturated shapes (circle, square, triangle, diamond in six hues) on a dark,
low-saturation, sometimes faintly textured background, and its caption describes the *whole* scene in a small
fixed grammar that covers GenEval's categories:

=============  ==============================================================
category       caption forms
=============  ==============================================================
single_object  "a circle"
colors         "a red circle"
two_object     "a circle and a square"
color_attr     "a red circle and a blue square"
counting       "three circles", "three red circles" (two, three, four)
position       "a circle above a square", "a red circle to the left of a blue square"
               (relations: to the left of / to the right of / above / below)
three_object   "a circle, a square and a diamond", "a red circle, a blue square and a green diamond"
=============  ==============================================================

Its scorer, `ShapesEval`, lives in `diffusers_microdit.data.shapes_eval`.
"""

from __future__ import annotations

import colorsys
import json
import math
import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
from PIL import Image

SHAPES = ("circle", "square", "triangle", "diamond")
COLOR_HUES = {"red": 0.0, "yellow": 60.0, "green": 120.0, "cyan": 180.0, "blue": 240.0, "purple": 290.0}
COLORS = tuple(COLOR_HUES)
RELATIONS = ("to the left of", "to the right of", "above", "below")
COUNT_WORDS = {2: "two", 3: "three", 4: "four"}
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr", "three_object")
_OPTIONAL_COLOR = ("counting", "position", "three_object")  # categories with and without colour words
# Half of the captions name no colour (single_object, two_object and half of counting / position /
# three_object): prototypes trained with rarer shape-only captions drew empty images for them.
DEFAULT_CATEGORY_WEIGHTS = {
    "single_object": 0.14,
    "two_object": 0.14,
    "counting": 0.16,
    "colors": 0.14,
    "position": 0.16,
    "color_attr": 0.14,
    "three_object": 0.12,
}
# Bounding-box side as a fraction of the image side, by number of objects: large enough that a 32-px model
# still draws recognisable shapes (small objects collapse into blobs), small enough that four fit side by side.
# Multi-object scenes were 0.24-0.34 / 0.21-0.28 / 0.20-0.25 before: the present sizes raised the autoencoder's
# ShapesEval ceiling from 0.94 to 0.98 and make demo's score from 0.34 to 0.37.
_SIZE_RANGES = {1: (0.30, 0.45), 2: (0.28, 0.38), 3: (0.24, 0.31), 4: (0.22, 0.27)}
SUPERSAMPLE = 4  # sub-pixel samples per axis for anti-aliased coverage
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def article(word: str) -> str:
    """Indefinite article for `word`: "an" before a vowel, "a" otherwise."""
    return "an" if word[:1] in "aeiou" else "a"


def plural(shape: str) -> str:
    """Plural of a shape noun (all four are regular)."""
    return shape + "s"


@dataclass(frozen=True)
class Phrase:
    """One noun phrase of a caption: `count` objects of `shape`, all of `color` when it is named."""

    shape: str
    color: str | None = None
    count: int = 1

    def text(self) -> str:
        """The phrase as it appears in captions ("a red circle", "an ...", "three circles")."""
        noun = self.shape if self.count == 1 else plural(self.shape)
        words = f"{self.color} {noun}" if self.color else noun
        determiner = article(words) if self.count == 1 else COUNT_WORDS[self.count]
        return f"{determiner} {words}"


@dataclass(frozen=True)
class Caption:
    """A parsed caption: its noun phrases and, for position captions, the relation of the first to the second."""

    phrases: tuple[Phrase, ...]
    relation: str | None = None

    @property
    def category(self) -> str:
        """GenEval-style category of the caption."""
        if self.relation is not None:
            return "position"
        if self.phrases[0].count > 1:
            return "counting"
        colored = any(phrase.color for phrase in self.phrases)
        if len(self.phrases) == 1:
            return "colors" if colored else "single_object"
        if len(self.phrases) == 2:
            return "color_attr" if colored else "two_object"
        return "three_object"

    def text(self) -> str:
        """The caption string, in exactly the grammar `parse_caption` accepts."""
        parts = [phrase.text() for phrase in self.phrases]
        if self.relation is not None:
            return f"{parts[0]} {self.relation} {parts[1]}"
        if len(parts) == 1:
            return parts[0]
        return ", ".join(parts[:-1]) + " and " + parts[-1]

    def objects(self) -> list[tuple[str, str | None]]:
        """(shape, colour or None) of every object the caption asks for, counts expanded."""
        return [(phrase.shape, phrase.color) for phrase in self.phrases for _ in range(phrase.count)]


def _alternatives(words: Iterable[str]) -> str:
    """Regex alternation matching exactly one of `words`."""
    return "|".join(re.escape(word) for word in words)


_PHRASE = rf"(a|an) (?:({_alternatives(COLORS)}) )?({_alternatives(SHAPES)})"
_GRAMMAR = (
    ("relation", re.compile(rf"{_PHRASE} ({_alternatives(RELATIONS)}) {_PHRASE}")),
    ("list", re.compile(rf"{_PHRASE}, {_PHRASE} and {_PHRASE}")),
    ("list", re.compile(rf"{_PHRASE} and {_PHRASE}")),
    ("list", re.compile(_PHRASE)),
    (
        "count",
        re.compile(
            rf"({_alternatives(COUNT_WORDS.values())}) (?:({_alternatives(COLORS)}) )?"
            rf"({_alternatives(plural(s) for s in SHAPES)})"
        ),
    ),
)
_GRAMMAR_HELP = (
    "expected one of the forms 'a red circle', 'a circle', 'a red circle and a blue square', "
    "'a red circle, a blue square and a green diamond', 'three red circles', 'three circles', "
    "'a red circle to the left of a blue square' (relations: to the left of, to the right of, above, below) "
    f"with colours {', '.join(COLORS)}, shapes {', '.join(SHAPES)} and counts two, three, four"
)


def parse_caption(prompt: str) -> Caption:
    """Parse a caption of the shapes grammar (case and repeated spaces are ignored); ValueError otherwise."""
    text = " ".join(prompt.lower().split())
    for form, pattern in _GRAMMAR:
        match = pattern.fullmatch(text)
        if match is None:
            continue
        groups = match.groups()
        if form == "count":
            count = next(number for number, word in COUNT_WORDS.items() if word == groups[0])
            return Caption((Phrase(groups[2][: -len("s")], groups[1], count),))
        if form == "relation":
            groups = groups[:3] + groups[4:]
        phrases = []
        for det, color, shape in zip(groups[0::3], groups[1::3], groups[2::3]):
            expected = article(color or shape)
            if det != expected:
                raise ValueError(f"prompt {prompt!r}: use '{expected} {color or shape}', not '{det} {color or shape}'")
            phrases.append(Phrase(shape, color))
        return Caption(tuple(phrases), match.group(4) if form == "relation" else None)
    raise ValueError(f"prompt {prompt!r} is outside the shapes caption grammar; {_GRAMMAR_HELP}")


# ---------------------------------------------------------------------------------------------------------------
# Generation


def _pick(rng: np.random.Generator, items: Sequence):
    """One uniformly drawn element of `items`."""
    return items[int(rng.integers(len(items)))]


def _pick_distinct(rng: np.random.Generator, items: Sequence, n: int) -> list:
    """`n` distinct elements of `items` in random order."""
    return [items[int(i)] for i in rng.permutation(len(items))[:n]]


def sample_caption(rng: np.random.Generator, category: str, colored: bool | None = None) -> Caption:
    """Draw a caption of `category`.

    `colored` chooses whether counting, position and three_object captions name colours (None: with
    probability 1/2); the other categories fix it (colors and color_attr always do, the rest never).
    """
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")
    if colored is not None and category not in _OPTIONAL_COLOR:
        raise ValueError(f"category {category!r} fixes whether colours are named; pass colored=None")
    if category == "single_object":
        return Caption((Phrase(_pick(rng, SHAPES)),))
    if category == "colors":
        return Caption((Phrase(_pick(rng, SHAPES), _pick(rng, COLORS)),))
    if colored is None:
        colored = category == "color_attr" or (category in _OPTIONAL_COLOR and rng.random() < 0.5)
    if category == "counting":
        count = int(rng.integers(2, 5))
        return Caption((Phrase(_pick(rng, SHAPES), _pick(rng, COLORS) if colored else None, count),))
    # Distinct shapes (and colours when named), as GenEval's multi-object prompts: every named object is
    # then identifiable on its own, which keeps attribute binding and relations unambiguous.
    n = 3 if category == "three_object" else 2
    shapes = _pick_distinct(rng, SHAPES, n)
    colors = _pick_distinct(rng, COLORS, n) if colored else [None] * n
    relation = _pick(rng, RELATIONS) if category == "position" else None
    return Caption(tuple(Phrase(s, c) for s, c in zip(shapes, colors)), relation)


def shape_coverage(
    shape: str, cx: float, cy: float, width: float, height: float, rows: int, cols: int, supersample: int = 4
) -> np.ndarray:
    """Anti-aliased coverage (rows, cols) in [0, 1] of `shape` with bounding box centred on (cx, cy).

    Pixel (i, j) covers [j, j + 1) x [i, i + 1). Triangles point up with their base at the bottom of the box;
    diamonds touch the middle of each side of the box.
    """
    offsets = (np.arange(supersample) + 0.5) / supersample
    u = ((np.arange(cols)[:, None] + offsets).ravel() - cx) / (width / 2)
    v = ((np.arange(rows)[:, None] + offsets).ravel() - cy) / (height / 2)
    u, v = u[None, :], v[:, None]
    if shape == "circle":
        inside = u**2 + v**2 <= 1
    elif shape == "square":
        inside = (np.abs(u) <= 1) & (np.abs(v) <= 1)
    elif shape == "diamond":
        inside = np.abs(u) + np.abs(v) <= 1
    elif shape == "triangle":
        inside = (v <= 1) & (np.abs(u) <= (v + 1) / 2)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return inside.reshape(rows, supersample, cols, supersample).mean(axis=(1, 3))


def _centroid(shape: str, center: tuple[float, float], size: float) -> tuple[float, float]:
    """Centre of mass of a shape from its box centre (ShapesEval judges relations on centroids)."""
    # A triangle's mass sits a sixth of its height below its box centre.
    return center[0], center[1] + (size / 6 if shape == "triangle" else 0.0)


def relation_margin(relation: str, a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    """(offset along the relation's axis in its direction, absolute offset across it) of `a` relative to `b`."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    primary, secondary = {
        "to the left of": (dx, dy),
        "to the right of": (-dx, dy),
        "above": (dy, dx),
        "below": (-dy, dx),
    }[relation]
    return primary, abs(secondary)


def _layout(
    rng: np.random.Generator, shapes: list[str], side: int, relation: str | None
) -> list[tuple[tuple[float, float], float]]:
    """Centres and box sizes for `shapes`: inside the image, boxes apart, and the relation (if any) clear."""
    low, high = _SIZE_RANGES[len(shapes)]
    margin = max(1.0, 0.03 * side)
    # Two pixels of clean background between boxes keep objects in separate 4-connected components.
    gap = max(2.0, 0.05 * side)
    for _ in range(10_000):
        sizes = rng.uniform(low, high, len(shapes)) * side
        centers = [tuple(rng.uniform(margin + s / 2, side - margin - s / 2, 2)) for s in sizes]
        apart = all(
            max(abs(centers[i][0] - centers[j][0]), abs(centers[i][1] - centers[j][1]))
            >= (sizes[i] + sizes[j]) / 2 + gap
            for i in range(len(shapes))
            for j in range(i)
        )
        if not apart:
            continue
        if relation is not None:
            # Unambiguous position: a clear offset along the relation's axis, at most 0.4 of it across.
            a, b = (_centroid(shapes[k], centers[k], sizes[k]) for k in (0, 1))
            primary, secondary = relation_margin(relation, a, b)
            if primary < 0.25 * side or secondary > 0.4 * primary:
                continue
        return [(center, float(size)) for center, size in zip(centers, sizes)]
    raise RuntimeError(f"no layout found for {shapes} at {side} px")


def _hsv_to_rgb(hue_degrees: float, saturation: float, value: float) -> np.ndarray:
    """RGB in [0, 1] of an HSV colour with the hue in degrees."""
    return np.array(colorsys.hsv_to_rgb((hue_degrees % 360) / 360, saturation, value))


def _background(rng: np.random.Generator, side: int) -> np.ndarray:
    """Dark low-saturation background (side, side, 3) in [0, 1], flat or with a faint luminance texture."""
    base = _hsv_to_rgb(rng.uniform(0, 360), rng.uniform(0.0, 0.3), rng.uniform(0.08, 0.35))
    kind = _pick(rng, ("flat", "flat", "stripes", "checker", "noise", "gradient"))
    y, x = np.mgrid[0:side, 0:side].astype(np.float64)
    scale = side / 32  # texture periods are set for 32 px and grow with the image
    if kind == "stripes":
        angle = _pick(rng, (0.0, 45.0, 90.0, 135.0)) * math.pi / 180
        period = rng.uniform(3, 8) * scale
        pattern = np.sin(2 * math.pi * (x * math.cos(angle) + y * math.sin(angle)) / period)
    elif kind == "checker":
        cell = rng.uniform(2, 6) * scale
        pattern = np.where((np.floor(x / cell) + np.floor(y / cell)) % 2 == 0, 1.0, -1.0)
    elif kind == "noise":
        pattern = rng.uniform(-1, 1, (side, side))
    elif kind == "gradient":
        angle, middle = rng.uniform(0, 2 * math.pi), (side - 1) / 2
        pattern = ((x - middle) * math.cos(angle) + (y - middle) * math.sin(angle)) / (side / 2)
    else:
        pattern = np.zeros((side, side))
    amplitude = rng.uniform(0.02, 0.05)
    return np.clip(base + amplitude * pattern[..., None], 0, 1)


def generate_example(rng_or_seed: np.random.Generator | int, size: int = 32, category: str | None = None) -> dict:
    """One image-caption pair, deterministic for a seed (or drawn from a numpy Generator).

    Returns `dict(image=PIL RGB size x size, caption=str, category=str, objects=[dict(shape, color,
    center=(x, y) of the bounding box in pixels, size=box side in pixels)])`. The caption is true for the image:
    it names every object, counts are exact, and named relations hold with a clear margin between centroids.
    Without `category` one is drawn with `DEFAULT_CATEGORY_WEIGHTS`.
    """
    rng = rng_or_seed if isinstance(rng_or_seed, np.random.Generator) else np.random.default_rng(rng_or_seed)
    if category is None:
        names, cumulative = _resolve_weights(None, None)
        category = names[int(np.searchsorted(cumulative, rng.random(), side="right"))]
    caption = sample_caption(rng, category)
    # Objects whose colour the caption leaves open get any of the six colours, independently.
    wanted = [(shape, color or _pick(rng, COLORS)) for shape, color in caption.objects()]
    placement = _layout(rng, [shape for shape, _ in wanted], size, caption.relation)
    canvas = _background(rng, size)
    objects = []
    for (shape, color), (center, box) in zip(wanted, placement):
        rgb = _hsv_to_rgb(COLOR_HUES[color] + rng.uniform(-6, 6), rng.uniform(0.8, 1.0), rng.uniform(0.85, 1.0))
        alpha = shape_coverage(shape, center[0], center[1], box, box, size, size, SUPERSAMPLE)[..., None]
        canvas = canvas * (1 - alpha) + rgb * alpha
        center = (round(center[0], 3), round(center[1], 3))
        objects.append({"shape": shape, "color": color, "center": center, "size": round(box, 3)})
    image = Image.fromarray(np.round(canvas * 255).astype(np.uint8), "RGB")
    return {"image": image, "caption": caption.text(), "category": category, "objects": objects}


def _resolve_weights(
    categories: Sequence[str] | None, category_weights: Mapping[str, float] | None
) -> tuple[list[str], np.ndarray]:
    """Categories with positive weight and their cumulative normalised weights."""
    weights = dict(DEFAULT_CATEGORY_WEIGHTS if category_weights is None else category_weights)
    unknown = set(weights) - set(CATEGORIES)
    if categories is not None:
        unknown |= set(categories) - set(CATEGORIES)
        weights = {name: weights.get(name, 0.0) for name in categories}
    if unknown:
        raise ValueError(f"unknown categories {sorted(unknown)}; expected some of {CATEGORIES}")
    if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(f"category weights must be non-negative with a positive sum, got {weights}")
    names = [name for name in CATEGORIES if weights.get(name, 0.0) > 0]
    values = np.array([weights[name] for name in names], dtype=np.float64)
    return names, np.cumsum(values) / values.sum()


def sample_categories(
    num: int,
    seed: int = 0,
    categories: Sequence[str] | None = None,
    category_weights: Mapping[str, float] | None = None,
) -> list[str]:
    """Category of each of `num` examples, balanced to the weights in every prefix and interleaved.

    A golden-ratio (Weyl) sequence stratifies [0, 1) evenly, so the first k categories match the weights to
    within a couple of examples for every k (i.i.d. draws drift by ~sqrt(k)), and consecutive examples cycle
    through the categories, so even unshuffled batches are balanced. The seed shifts the sequence.
    `categories` restricts to a subset; `category_weights` (category -> weight) replaces the defaults.
    """
    names, cumulative = _resolve_weights(categories, category_weights)
    u = (np.random.default_rng(seed).random() + np.arange(num) * _GOLDEN) % 1.0
    return [names[i] for i in np.searchsorted(cumulative, u, side="right")]


def build_shapes_dataset(
    num_examples: int,
    size: int = 32,
    seed: int = 0,
    categories: Sequence[str] | None = None,
    category_weights: Mapping[str, float] | None = None,
):
    """A `datasets.Dataset` of `num_examples` shapes examples with columns image, text, category and objects.

    `image` is a datasets `Image` feature, `objects` the JSON list described in `generate_example`. Categories
    follow `sample_categories`; example i is generated from seed (seed, i), so a larger dataset extends a
    smaller one with the same seed.
    """
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    columns = {"image": [], "text": [], "category": [], "objects": []}
    for index, category in enumerate(sample_categories(num_examples, seed, categories, category_weights)):
        example = generate_example(np.random.default_rng([seed, index]), size, category)
        columns["image"].append(example["image"])
        columns["text"].append(example["caption"])
        columns["category"].append(category)
        columns["objects"].append(json.dumps(example["objects"]))
    features = Features(
        {"image": ImageFeature(), "text": Value("string"), "category": Value("string"), "objects": Value("string")}
    )
    return Dataset.from_dict(columns, features=features)


def held_out_prompts(num_per_category: int = 20, seed: int = 1234) -> list[str]:
    """A fixed evaluation caption list: `num_per_category` captions for every category, grouped by category.

    Counting, position and three_object alternate between naming colours and not. Captions are distinct
    within a category while it has enough of them, then repeat in order (single_object has only four). The
    caption space is small, so this is a fixed evaluation set, like GenEval's prompt list, rather than captions
    unseen in training.
    """
    prompts = []
    for index, category in enumerate(CATEGORIES):
        rng = np.random.default_rng([seed, index])
        captions: list[str] = []
        for j in range(num_per_category):
            colored = j % 2 == 0 if category in _OPTIONAL_COLOR else None
            for _ in range(1000):
                text = sample_caption(rng, category, colored).text()
                if text not in captions:
                    break
            else:
                # Every caption of the category is taken already: repeat them in order.
                text = captions[j % len(set(captions))]
            captions.append(text)
        prompts += captions
    return prompts
