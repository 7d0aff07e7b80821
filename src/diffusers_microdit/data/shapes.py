"""Procedural compositional text-to-image data (the embedded default for training from scratch) and ShapesEval.

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

`ShapesEval` parses that grammar back, finds the shapes in an image with classical image analysis (background
from the border, connected components, hue, template fit) and checks the caption, GenEval-style.
"""

from __future__ import annotations

import colorsys
import json
import math
import re
from dataclasses import dataclass
from itertools import permutations
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
_SIZE_RANGES = {1: (0.30, 0.45), 2: (0.24, 0.34), 3: (0.21, 0.28), 4: (0.20, 0.25)}
_SUPERSAMPLE = 4  # sub-pixel samples per axis for anti-aliased coverage
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


def _relation_margin(relation: str, a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
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
            primary, secondary = _relation_margin(relation, a, b)
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
        alpha = shape_coverage(shape, center[0], center[1], box, box, size, size, _SUPERSAMPLE)[..., None]
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


# ---------------------------------------------------------------------------------------------------------------
# Evaluation

# Second moments of each shape's coverage per unit box side, (x, y): a box of width w has var_x = KX * w^2.
_SHAPE_MOMENTS = {
    "circle": (1 / 16, 1 / 16),
    "square": (1 / 12, 1 / 12),
    "diamond": (1 / 24, 1 / 24),
    "triangle": (1 / 24, 1 / 18),  # the width grows linearly downwards: var_y of a density 2t on [0, 1]
}
_HUE_NAMES = np.array(COLORS)
_HUE_VALUES = np.array(list(COLOR_HUES.values()))


@dataclass(frozen=True)
class Detection:
    """A foreground component: shape and colour (None when none fits), centroid and area in pixels, template IoU."""

    shape: str | None
    color: str | None
    center: tuple[float, float]
    area: float
    fit: float


def _to_rgb_array(image) -> np.ndarray:
    """(H, W, 3) float64 in [0, 1] from a PIL image or an (H, W, 3) uint8 / [0, 1] float array."""
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got {array.shape}")
    return array.astype(np.float64) / 255.0 if array.dtype == np.uint8 else array.astype(np.float64)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, each as an array of flat pixel indices (iterative flood fill)."""
    rows, cols = mask.shape
    todo = bytearray(mask.ravel().tobytes())  # plain bytes index much faster than numpy scalars here
    last_row = (rows - 1) * cols
    components = []
    for start in np.flatnonzero(mask).tolist():
        if not todo[start]:
            continue
        todo[start] = 0
        stack, members = [start], []
        while stack:
            p = stack.pop()
            members.append(p)
            x = p % cols
            neighbours = ((p - 1, x > 0), (p + 1, x < cols - 1), (p - cols, p >= cols), (p + cols, p < last_row))
            for q, inside in neighbours:
                if inside and todo[q]:
                    todo[q] = 0
                    stack.append(q)
        components.append(np.array(members))
    return components


def _gaussian_matrix(n: int, sigma: float) -> np.ndarray:
    """(n, n) matrix that blurs a length-n signal with a Gaussian of `sigma` pixels (zero outside)."""
    offsets = np.arange(n)[:, None] - np.arange(n)[None, :]
    radius = math.ceil(3 * sigma)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2) * (np.abs(offsets) <= radius)
    return kernel / np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2).sum()


def _is_object(detection: Detection, shape: str, color: str | None) -> bool:
    """Whether a detection is a recognised `shape` of one of the six colours, of `color` when it is named."""
    return detection.shape == shape and detection.color is not None and color in (None, detection.color)


class ShapesEval:
    """GenEval-style automatic scorer for images generated from shapes captions.

    An image passes when the caption describes the whole scene: the detected objects match the named ones
    one-to-one (shape, and colour where named; counts exact, no extra objects) and a named relation holds
    between the centroids of the matched pair, along its axis by more than `relation_margin` of the image side
    and by more than the offset across it.

    Detection: the background colour is the median of the border; foreground pixels are farther from it than
    `min_contrast` (more when the border itself is noisy); 4-connected foreground components of at least
    `min_area` of the image are objects. Each object gets a coverage map (projection of its pixels on the line
    from the background to its own colour), its colour (nearest of the six hues; None when the saturation is
    below `min_saturation` or the pixels stray from that line by more than `max_color_spread` of the contrast)
    and its shape: the template (optionally Gaussian-blurred, up to `max_blur` of the image side and a tenth of
    the object) with the same centroid and second moments that overlaps the coverage best, as soft IoU; None
    below `min_fit` or beyond `max_aspect`.
    """

    def __init__(
        self,
        min_contrast: float = 0.2,
        min_area: float = 0.005,
        min_fit: float = 0.75,
        max_aspect: float = 1.5,
        max_blur: float = 1 / 32,
        min_saturation: float = 0.35,
        max_color_spread: float = 0.25,
        relation_margin: float = 0.05,
    ):
        """Detection and matching thresholds, as described in the class docstring (fractions of the image side
        or area, RGB distances in [0, 1]); the defaults are calibrated on the dataset and on noise images."""
        self.min_contrast = min_contrast
        self.min_area = min_area
        self.min_fit = min_fit
        self.max_aspect = max_aspect
        self.max_blur = max_blur
        self.min_saturation = min_saturation
        self.max_color_spread = max_color_spread
        self.relation_margin = relation_margin

    def detect(self, image) -> list[Detection]:
        """All foreground objects of an image (PIL or (H, W, 3) array), in raster order of their first pixel."""
        rgb = _to_rgb_array(image)
        rows, cols = rgb.shape[:2]
        ring = max(1, round(min(rows, cols) / 32))
        edges = (rgb[:ring], rgb[-ring:], rgb[:, :ring], rgb[:, -ring:])
        border = np.concatenate([edge.reshape(-1, 3) for edge in edges])
        background = np.median(border, axis=0)
        # A noisy border (textured, or no background at all as in noise images) raises the foreground bar.
        spread = np.median(np.linalg.norm(border - background, axis=1))
        distance = np.linalg.norm(rgb - background, axis=2)
        foreground = distance > max(self.min_contrast, 4 * spread)
        return [
            self._describe(rgb, background, distance, members)
            for members in _components(foreground)
            if len(members) >= self.min_area * rows * cols
        ]

    def _describe(
        self, rgb: np.ndarray, background: np.ndarray, distance: np.ndarray, members: np.ndarray
    ) -> Detection:
        """Colour, coverage-weighted centroid and area, and best shape of one component."""
        rows, cols = distance.shape
        ys, xs = np.divmod(members, cols)
        # The most distant pixels are the least mixed with the background: they give the object's colour.
        core = distance.ravel()[members] >= 0.8 * distance.ravel()[members].max()
        color_rgb = np.median(rgb.reshape(-1, 3)[members[core]], axis=0)
        # Window one pixel beyond the component, whose faint anti-aliased rim fell below the threshold.
        y0, y1 = max(ys.min() - 1, 0), min(ys.max() + 2, rows)
        x0, x1 = max(xs.min() - 1, 0), min(xs.max() + 2, cols)
        owned = np.zeros((y1 - y0, x1 - x0), dtype=bool)
        owned[ys - y0, xs - x0] = True
        rim = owned.copy()
        rim[1:] |= owned[:-1]
        rim[:-1] |= owned[1:]
        rim[:, 1:] |= owned[:, :-1]
        rim[:, :-1] |= owned[:, 1:]
        contrast = color_rgb - background
        offset = rgb[y0:y1, x0:x1] - background
        alpha = np.clip(offset @ contrast / (contrast @ contrast), 0, 1) * rim
        # A single flat colour blended with the background stays on the background-to-colour line.
        stray = np.linalg.norm(offset - alpha[..., None] * contrast, axis=2)[owned].mean() / np.linalg.norm(contrast)
        area = alpha.sum()
        wy, wx = np.mgrid[y0:y1, x0:x1] + 0.5  # pixel centres
        cx, cy = (alpha * wx).sum() / area, (alpha * wy).sum() / area
        # Coverage sampled at pixel centres adds a pixel's own variance (1/12) to the shape's.
        var_x = (alpha * (wx - cx) ** 2).sum() / area - 1 / 12
        var_y = (alpha * (wy - cy) ** 2).sum() / area - 1 / 12
        shape, fit = self._fit_shape(alpha, cx - x0, cy - y0, var_x, var_y, min(rows, cols))
        return Detection(
            shape=shape if fit >= self.min_fit else None,
            color=self._color_name(color_rgb) if stray <= self.max_color_spread else None,
            center=(float(cx), float(cy)),
            area=float(area),
            fit=fit,
        )

    def _fit_shape(
        self, alpha: np.ndarray, cx: float, cy: float, var_x: float, var_y: float, side: int
    ) -> tuple[str | None, float]:
        """Best (shape, soft IoU) over templates matched to the coverage's centroid and second moments.

        Blurred templates (sigma 0, half and all of `max_blur` * side) let soft-edged generated shapes fit; a
        blur adds sigma^2 to both variances, so the box shrinks accordingly.
        """
        best_shape, best_fit = None, 0.0
        for sigma in (0.0, 0.5 * self.max_blur * side, self.max_blur * side):
            if min(var_x, var_y) <= sigma**2:
                continue
            for shape, (kx, ky) in _SHAPE_MOMENTS.items():
                width, height = math.sqrt((var_x - sigma**2) / kx), math.sqrt((var_y - sigma**2) / ky)
                # Beyond a tenth of the object, blur would make any blob fit any shape.
                if max(width / height, height / width) > self.max_aspect or sigma > 0.1 * min(width, height):
                    continue
                box_cy = cy - (height / 6 if shape == "triangle" else 0.0)
                template = shape_coverage(shape, cx, box_cy, width, height, *alpha.shape, _SUPERSAMPLE)
                if sigma > 0:
                    rows, cols = alpha.shape
                    template = _gaussian_matrix(rows, sigma) @ template @ _gaussian_matrix(cols, sigma).T
                fit = float(np.minimum(alpha, template).sum() / np.maximum(alpha, template).sum())
                if fit > best_fit:
                    best_shape, best_fit = shape, fit
        return best_shape, best_fit

    def _color_name(self, rgb: np.ndarray) -> str | None:
        """Nearest of the six hues, or None for a grey-ish colour."""
        hue, saturation, _ = colorsys.rgb_to_hsv(*np.clip(rgb, 0, 1))
        if saturation < self.min_saturation:
            return None
        circular = np.abs((hue * 360 - _HUE_VALUES + 180) % 360 - 180)
        return str(_HUE_NAMES[np.argmin(circular)])

    def matches(self, caption: Caption, detections: Sequence[Detection], side: float) -> bool:
        """Whether detections realise the caption exactly (see the class docstring); `side` scales the margin."""
        wanted = caption.objects()
        if len(detections) != len(wanted):
            return False
        for order in permutations(detections):
            if not all(_is_object(d, shape, color) for d, (shape, color) in zip(order, wanted)):
                continue
            if caption.relation is None:
                return True
            primary, secondary = _relation_margin(caption.relation, order[0].center, order[1].center)
            if primary > self.relation_margin * side and primary > secondary:
                return True
        return False

    def score_one(self, image, prompt: str) -> bool:
        """Whether `image` is correct for `prompt` (ValueError for a prompt outside the caption grammar)."""
        return self._check(image, parse_caption(prompt))

    def _check(self, image, caption: Caption) -> bool:
        """Detect the objects of `image` and match them against `caption`."""
        rgb = _to_rgb_array(image)
        return self.matches(caption, self.detect(rgb), min(rgb.shape[:2]))

    def score(self, images: Sequence, prompts: Sequence[str]) -> dict:
        """Accuracy of images against their prompts.

        Returns `dict(overall=mean of the per-category accuracies, per_category={category: accuracy},
        counts={category: number of images}, correct=[bool per image])`; categories without images are left out.
        """
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images for {len(prompts)} prompts")
        captions = [parse_caption(prompt) for prompt in prompts]  # fail on a bad prompt before any work
        correct, totals, hits = [], {}, {}
        for image, caption in zip(images, captions):
            ok = self._check(image, caption)
            correct.append(ok)
            totals[caption.category] = totals.get(caption.category, 0) + 1
            hits[caption.category] = hits.get(caption.category, 0) + int(ok)
        per_category = {name: hits[name] / totals[name] for name in CATEGORIES if name in totals}
        overall = float(np.mean(list(per_category.values()))) if per_category else 0.0
        counts = {name: totals[name] for name in per_category}
        return {"overall": overall, "per_category": per_category, "counts": counts, "correct": correct}
