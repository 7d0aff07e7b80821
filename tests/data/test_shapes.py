"""The embedded shapes dataset (generator, captions, datasets wrapper) and the ShapesEval scorer's calibration."""

import json
from collections import Counter
from dataclasses import replace
from functools import lru_cache

import numpy as np
import pytest
from PIL import Image, ImageFilter

from diffusers_microdit.data.shapes import (
    CATEGORIES,
    COLORS,
    DEFAULT_CATEGORY_WEIGHTS,
    RELATIONS,
    SHAPES,
    Caption,
    Phrase,
    article,
    build_shapes_dataset,
    generate_example,
    held_out_prompts,
    parse_caption,
    sample_categories,
)
from diffusers_microdit.data.shapes_eval import ShapesEval

NUM_CALIBRATION = 300  # examples per image size, category-balanced
OPPOSITE = {
    "to the left of": "to the right of",
    "to the right of": "to the left of",
    "above": "below",
    "below": "above",
}


@lru_cache(maxsize=None)
def calibration_examples(size: int) -> tuple[dict, ...]:
    """Category-balanced own examples at `size`, shared by the calibration tests."""
    categories = sample_categories(NUM_CALIBRATION, seed=size)
    return tuple(generate_example(np.random.default_rng([2024, size, i]), size, c) for i, c in enumerate(categories))


def counterfactual(caption: Caption) -> Caption:
    """A minimal edit of `caption` that is false for every image the caption is true for."""
    first = caption.phrases[0]
    if caption.relation is not None:
        return replace(caption, relation=OPPOSITE[caption.relation])
    if first.count > 1:
        return Caption((replace(first, count=(first.count - 1) % 3 + 2),))  # 2 -> 3 -> 4 -> 2
    if first.color is not None and len(caption.phrases) > 1:
        # Named colours are distinct, so rotating them binds every colour to a different shape.
        colors = [phrase.color for phrase in caption.phrases]
        return Caption(tuple(replace(p, color=c) for p, c in zip(caption.phrases, colors[1:] + colors[:1])))
    if first.color is not None:
        return Caption((replace(first, color=COLORS[(COLORS.index(first.color) + 1) % len(COLORS)]),))
    unused = next(shape for shape in SHAPES if shape not in {phrase.shape for phrase in caption.phrases})
    return Caption((replace(first, shape=unused),) + caption.phrases[1:])


def test_generate_example_is_deterministic_per_seed():
    """Same seed (int or Generator), same image, caption and objects; different seeds differ."""
    for size in (32, 64):
        a, b = generate_example(7, size), generate_example(np.random.default_rng(7), size)
        assert a["image"].mode == "RGB" and a["image"].size == (size, size)
        assert a["image"].tobytes() == b["image"].tobytes()
        assert (a["caption"], a["category"], a["objects"]) == (b["caption"], b["category"], b["objects"])
    images = {generate_example(seed, 32)["image"].tobytes() for seed in range(20)}
    assert len(images) == 20


def test_caption_forms_are_exact():
    """The caption strings of every form, exactly as outside scorers and evaluations prompt with them."""
    red_circle, blue_square = Phrase("circle", "red"), Phrase("square", "blue")
    green_diamond = Phrase("diamond", "green")
    expected = {
        "a red circle": (Caption((red_circle,)), "colors"),
        "a circle": (Caption((Phrase("circle"),)), "single_object"),
        "a red circle and a blue square": (Caption((red_circle, blue_square)), "color_attr"),
        "a circle and a square": (Caption((Phrase("circle"), Phrase("square"))), "two_object"),
        "three red circles": (Caption((Phrase("circle", "red", 3),)), "counting"),
        "three circles": (Caption((Phrase("circle", None, 3),)), "counting"),
        "two squares": (Caption((Phrase("square", None, 2),)), "counting"),
        "four blue diamonds": (Caption((Phrase("diamond", "blue", 4),)), "counting"),
        "a red circle to the left of a blue square": (Caption((red_circle, blue_square), "to the left of"), "position"),
        "a red circle to the right of a blue square": (
            Caption((red_circle, blue_square), "to the right of"),
            "position",
        ),
        "a circle above a square": (Caption((Phrase("circle"), Phrase("square")), "above"), "position"),
        "a circle below a square": (Caption((Phrase("circle"), Phrase("square")), "below"), "position"),
        "a red circle, a blue square and a green diamond": (
            Caption((red_circle, blue_square, green_diamond)),
            "three_object",
        ),
        "a circle, a square and a diamond": (
            Caption((Phrase("circle"), Phrase("square"), Phrase("diamond"))),
            "three_object",
        ),
    }
    for text, (caption, category) in expected.items():
        assert caption.text() == text
        assert parse_caption(text) == caption
        assert caption.category == category
    assert parse_caption("  A Red   circle ") == Caption((red_circle,))


def test_article_helper():
    """'an' before vowels exists even though no colour or shape word needs it."""
    assert article("orange") == "an" and article("red") == "a" and article("circle") == "a"
    assert Phrase("circle", "orange").text() == "an orange circle"
    with pytest.raises(ValueError, match="use 'a circle', not 'an circle'"):
        parse_caption("an circle")


def test_every_generated_caption_parses_and_is_true():
    """Generated captions round-trip through the parser and describe their objects and layout truly."""
    seen_categories, seen_relations = Counter(), Counter()
    for size in (32, 64):
        for i, category in enumerate(sample_categories(350, seed=size)):
            example = generate_example(np.random.default_rng([size, i]), size, category)
            caption = parse_caption(example["caption"])
            assert caption.text() == example["caption"] and caption.category == category == example["category"]
            seen_categories[category] += 1
            seen_relations[caption.relation] += 1
            objects = example["objects"]
            # The caption names every object, with exact counts, shapes and colours where named.
            assert len(objects) == len(caption.objects())
            assert Counter(o["shape"] for o in objects) == Counter(shape for shape, _ in caption.objects())
            for phrase in caption.phrases:
                if phrase.color is not None:
                    named = [o for o in objects if o["shape"] == phrase.shape and o["color"] == phrase.color]
                    assert len(named) == phrase.count
            assert all(o["color"] in COLORS for o in objects)
            for o in objects:
                (x, y), half = o["center"], o["size"] / 2
                assert half <= x <= size - half and half <= y <= size - half
                assert o["size"] >= 0.19 * size  # recognisable at 32 px
            for j, a in enumerate(objects):
                for b in objects[:j]:
                    gap = max(abs(a["center"][0] - b["center"][0]), abs(a["center"][1] - b["center"][1]))
                    assert gap >= (a["size"] + b["size"]) / 2 + 2 - 1e-3
            if caption.relation is not None:
                (ax, ay), (bx, by) = objects[0]["center"], objects[1]["center"]
                along, across = {
                    "to the left of": (bx - ax, by - ay),
                    "to the right of": (ax - bx, by - ay),
                    "above": (by - ay, bx - ax),
                    "below": (ay - by, bx - ax),
                }[caption.relation]
                assert along >= 0.2 * size and abs(across) < 0.5 * along
    assert set(seen_categories) == set(CATEGORIES)
    assert set(seen_relations) == set(RELATIONS) | {None}


@pytest.mark.parametrize(
    "prompt",
    [
        "a photo of a red circle",
        "a red circle left of a blue square",
        "a red circle to the left a blue square",
        "five circles",
        "one circle",
        "two circle",
        "a pink circle",
        "a red hexagon",
        "a circle, a square",
        "a circle, a square, and a diamond",
        "red circle",
        "",
    ],
)
def test_prompts_outside_the_grammar_raise(prompt):
    """Prompts outside the grammar fail loudly, in the parser and in the scorer."""
    with pytest.raises(ValueError, match="outside the shapes caption grammar; expected one of the forms"):
        parse_caption(prompt)
    with pytest.raises(ValueError, match="outside the shapes caption grammar"):
        ShapesEval().score([generate_example(0)["image"]], [prompt])


def test_dataset_columns_and_features():
    """The datasets wrapper: columns, features, category filter, and prefix stability."""
    from datasets import Image as ImageFeature
    from datasets import Value

    dataset = build_shapes_dataset(21, size=32, seed=3, category_weights=dict.fromkeys(CATEGORIES, 1.0))
    assert dataset.column_names == ["image", "text", "category", "objects"]
    assert isinstance(dataset.features["image"], ImageFeature)
    assert all(dataset.features[name] == Value("string") for name in ("text", "category", "objects"))
    assert Counter(dataset["category"]) == Counter({category: 3 for category in CATEGORIES})
    row = dataset[5]
    assert row["image"].size == (32, 32) and row["image"].mode == "RGB"
    assert parse_caption(row["text"]).category == row["category"]
    assert len(json.loads(row["objects"])) == len(parse_caption(row["text"]).objects())
    # Example i depends only on (seed, i): a smaller dataset is a prefix of a larger one.
    prefix = build_shapes_dataset(5, size=32, seed=3, category_weights=dict.fromkeys(CATEGORIES, 1.0))
    assert prefix["text"] == dataset["text"][:5]
    assert np.array_equal(np.asarray(prefix[4]["image"]), np.asarray(dataset[4]["image"]))
    only = build_shapes_dataset(6, size=64, seed=1, categories=["counting", "position"])
    assert set(only["category"]) == {"counting", "position"} and only[0]["image"].size == (64, 64)


def test_sample_categories_balanced_to_weights():
    """Category schedule: balanced to the weights in every prefix, interleaved, validated."""
    categories = sample_categories(1000, seed=5)
    assert categories == sample_categories(1000, seed=5) != sample_categories(1000, seed=6)
    for k in (70, 333, 1000):
        counts = Counter(categories[:k])
        for name, weight in DEFAULT_CATEGORY_WEIGHTS.items():
            assert abs(counts[name] - weight * k) <= 2.5, (k, name, counts)
    # Consecutive examples interleave the categories, so unshuffled batches are balanced too.
    assert all(len(set(categories[i : i + 8])) >= 5 for i in range(0, 992, 8))
    weighted = Counter(sample_categories(300, category_weights={"single_object": 2, "colors": 1}))
    assert set(weighted) == {"single_object", "colors"} and abs(weighted["colors"] - 100) <= 2
    assert set(sample_categories(50, categories=["position"])) == {"position"}
    with pytest.raises(ValueError, match="unknown categories"):
        sample_categories(5, categories=["spatial"])
    with pytest.raises(ValueError, match="non-negative"):
        sample_categories(5, category_weights={"colors": -1.0, "counting": 2.0})


def test_held_out_prompts_cover_every_category():
    """The evaluation prompt list: fixed per seed, every category, distinct prompts where possible."""
    prompts = held_out_prompts(12, seed=0)
    assert prompts == held_out_prompts(12, seed=0) and prompts != held_out_prompts(12, seed=1)
    by_category = {}
    for prompt in prompts:
        by_category.setdefault(parse_caption(prompt).category, []).append(prompt)
    assert list(by_category) == list(CATEGORIES)
    assert all(len(group) == 12 for group in by_category.values())
    # Only four single_object captions exist: they repeat in order.
    first = by_category["single_object"][:4]
    assert sorted(first) == sorted(f"a {shape}" for shape in SHAPES) and by_category["single_object"] == first * 3
    for category in ("two_object", "counting", "colors", "position", "color_attr", "three_object"):
        assert len(set(by_category[category])) == 12, category
    for category in ("counting", "position", "three_object"):
        named = [any(p.color for p in parse_caption(prompt).phrases) for prompt in by_category[category]]
        assert named == [True, False] * 6, category


@pytest.mark.parametrize("size", [32, 64])
def test_scorer_accepts_own_images(size):
    """Calibration: the dataset's own images score >= 0.97 overall and in every category."""
    examples = calibration_examples(size)
    result = ShapesEval().score([e["image"] for e in examples], [e["caption"] for e in examples])
    print(f"own images {size}px: {result['overall']:.4f} {result['per_category']}")
    assert set(result["per_category"]) == set(CATEGORIES) == set(result["counts"])
    assert sum(result["counts"].values()) == NUM_CALIBRATION == len(result["correct"])
    assert result["overall"] == pytest.approx(np.mean(list(result["per_category"].values())))
    assert result["overall"] >= 0.97
    assert min(result["per_category"].values()) >= 0.97, result["per_category"]


@pytest.mark.parametrize("size", [32, 64])
def test_scorer_rejects_noise_images(size):
    """Calibration: noise images (uniform, blurred, flat colour) score <= 0.05 with the dataset's prompts."""
    rng = np.random.default_rng(size)
    prompts = [e["caption"] for e in calibration_examples(size)[:100]]

    def noise() -> Image.Image:
        """Uniform RGB noise."""
        return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))

    kinds = {
        "uniform": [noise() for _ in prompts],
        "blurred": [noise().filter(ImageFilter.GaussianBlur(float(r))) for r in rng.uniform(0.5, 3.0, len(prompts))],
        "flat": [Image.new("RGB", (size, size), tuple(rng.integers(0, 256, 3).tolist())) for _ in prompts],
    }
    for kind, images in kinds.items():
        overall = ShapesEval().score(images, prompts)["overall"]
        print(f"{kind} noise {size}px: {overall:.3f}")
        assert overall <= 0.05, kind


@pytest.mark.parametrize("size", [32, 64])
def test_scorer_rejects_wrong_prompts(size):
    """Real images with shuffled prompts score low, and with minimally edited false prompts near zero."""
    examples = calibration_examples(size)
    images = [e["image"] for e in examples]
    order = np.random.default_rng(0).permutation(len(examples))
    mismatched = ShapesEval().score(images, [examples[j]["caption"] for j in order])
    counterfactuals = [counterfactual(parse_caption(e["caption"])).text() for e in examples]
    edited = ShapesEval().score(images, counterfactuals)
    print(f"mismatched {size}px: {mismatched['overall']:.3f}, counterfactual: {edited['overall']:.3f}")
    assert mismatched["overall"] <= 0.1
    assert edited["overall"] <= 0.05, edited["per_category"]


def test_score_one_and_detect_on_arrays():
    """score_one / detect on PIL, uint8 and float arrays; detections sit on the generated objects."""
    example = generate_example(11, 64, "position")
    evaluator = ShapesEval()
    array = np.asarray(example["image"])
    assert evaluator.score_one(example["image"], example["caption"]) is True
    assert evaluator.score_one(array, example["caption"]) is True
    assert evaluator.score_one(array.astype(np.float32) / 255, example["caption"]) is True
    detections = evaluator.detect(array)
    expected = sorted((o["shape"], o["color"]) for o in example["objects"])
    assert sorted((d.shape, d.color) for d in detections) == expected
    for detection in detections:
        nearest = min(example["objects"], key=lambda o: np.hypot(*np.subtract(o["center"], detection.center)))
        assert np.hypot(*np.subtract(nearest["center"], detection.center)) < nearest["size"] / 4
    with pytest.raises(ValueError, match="2 prompts"):
        evaluator.score([example["image"]], [example["caption"]] * 2)


def test_detector_rejects_non_shapes_and_tolerates_mild_blur():
    """Multi-coloured patches and irregular or elongated blobs are no shapes; slight blur is fine."""
    size, evaluator = 64, ShapesEval()
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    canvas = np.full((size, size, 3), 0.15)
    # A patch of colour noise is an object, but not one of a single colour.
    patch = canvas.copy()
    patch[16:40, 20:44] = np.random.default_rng(0).uniform(0, 1, (24, 24, 3))
    # A five-pointed blob and a 2:1 ellipse of a clean colour are objects of no shape.
    angle = np.arctan2(yy - 32, xx - 32)
    blob, ellipse = canvas.copy(), canvas.copy()
    blob[np.hypot(xx - 32, yy - 32) <= 12 * (1 + 0.4 * np.sin(5 * angle))] = (1.0, 0.1, 0.1)
    ellipse[((xx - 32) / 20) ** 2 + ((yy - 32) / 10) ** 2 <= 1] = (1.0, 0.1, 0.1)
    for name, image, attribute in (("patch", patch, "color"), ("blob", blob, "shape"), ("ellipse", ellipse, "shape")):
        (detection,) = evaluator.detect(image)
        assert getattr(detection, attribute) is None, (name, detection)
    # Soft edges as from a generator: a Gaussian blur of half a pixel at 32 px keeps every own image correct.
    examples = calibration_examples(32)[:100]
    blurred = [e["image"].filter(ImageFilter.GaussianBlur(0.5)) for e in examples]
    assert evaluator.score(blurred, [e["caption"] for e in examples])["overall"] >= 0.97


def test_shipped_autoencoder_reconstructs_shapes_with_calibrated_latents():
    """The package's shapes autoencoder (examples/train_shapes_autoencoder.py): 32 px -> 8x8x8 latents of std about
    sigma_data = 0.5 once scaled, reconstructions that ShapesEval still reads."""
    import torch
    from diffusers.image_processor import VaeImageProcessor

    from diffusers_microdit.training.autoencoder import load_shapes_autoencoder, psnr_from_mse
    from diffusers_microdit.training.sources import encode_images_to_latents, image_to_pixels

    vae = load_shapes_autoencoder()
    dataset = build_shapes_dataset(64, size=32, seed=7)
    pixels = torch.stack([image_to_pixels(image, 32) for image in dataset["image"]])
    latents = encode_images_to_latents(vae, pixels)
    assert latents.shape == (64, 8, 8, 8)
    assert 0.4 < latents.std().item() < 0.6
    with torch.no_grad():
        decoded = vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1)
    assert psnr_from_mse(torch.mean((decoded - pixels) ** 2).item()) > 28
    images = VaeImageProcessor().postprocess(decoded, output_type="pil")
    assert ShapesEval().score(images, dataset["text"])["overall"] > 0.75
