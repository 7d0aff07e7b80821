"""ShapesEval: an automatic GenEval-style scorer for the embedded shapes task (`diffusers_microdit.data.shapes`).

It parses a caption of the shapes grammar back, finds the shapes in an image with classical image analysis
(background from the border, connected components, hue, template fit) and checks the caption against them,
GenEval-style: the whole scene must match, extra objects fail.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass
from itertools import permutations
from typing import Sequence

import numpy as np
from PIL import Image

from .shapes import (
    CATEGORIES,
    COLOR_HUES,
    COLORS,
    SUPERSAMPLE,
    Caption,
    parse_caption,
    relation_margin,
    shape_coverage,
)

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
                template = shape_coverage(shape, cx, box_cy, width, height, *alpha.shape, SUPERSAMPLE)
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
            primary, secondary = relation_margin(caption.relation, order[0].center, order[1].center)
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
