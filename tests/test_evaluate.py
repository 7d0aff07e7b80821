"""examples/evaluate.py end to end on tiny random-weight models: images, metrics.json, FID / CLIP score / ShapesEval
wiring and the up-front argument checks. Every model is built in code and saved to tmp, nothing is downloaded."""

import json
import math
from unittest import mock

import datasets
import numpy as np
import pytest
import torch
from helpers import load_example, tiny_clip_tokenizer, tiny_pipeline
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from diffusers_microdit.data.shapes import CATEGORIES

pytestmark = pytest.mark.usefixtures("single_thread")

evaluate = load_example("evaluate")
FAST = ["--num_inference_steps", "2", "--batch_size", "4"]


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipeline")
    tiny_pipeline().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A random-weight CLIPModel + CLIPProcessor folder with the tests' character-level tokenizer."""
    path = tmp_path_factory.mktemp("clip")
    tokenizer = tiny_clip_tokenizer()
    vocab_size = len(tokenizer)
    text = dict(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=vocab_size - 2,
                eos_token_id=vocab_size - 1, pad_token_id=0)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


def fid_unavailable() -> str | None:
    """Why torch-fidelity cannot be imported here (it needs a torchvision built for the installed torch), or None."""
    try:
        import torch_fidelity  # noqa: F401
    except (ImportError, RuntimeError) as error:
        return f"{type(error).__name__}: {error}"
    return None


# torch-fidelity imports torchvision, and PyPI's torchvision is built against CUDA torch: where only a CPU torch is
# installed (as on CI) FID cannot run, and this test skips.
FID_UNAVAILABLE = fid_unavailable()


def random_inception_weights(path) -> None:
    """Save torch-fidelity's InceptionV3 with its random initial weights, in the state-dict format its
    `feature_extractor_weights_path` loads (the pretrained file cannot be downloaded here)."""
    from torch_fidelity import feature_extractor_inceptionv3 as inception

    # Constructing the network loads weights; skip that to keep the random initialisation.
    with mock.patch.object(inception, "load_state_dict_from_url", return_value={}), \
            mock.patch.object(inception.FeatureExtractorInceptionV3, "load_state_dict"):
        network = inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(network.state_dict(), path)


def read_metrics(output_dir) -> dict:
    return json.loads((output_dir / "metrics.json").read_text())


def test_clip_score_from_a_caption_file(tmp_path, pipeline_dir, clip_dir):
    captions = tmp_path / "captions.jsonl"
    rows = [{"text": "a red circle"}, {"text": "two blue squares"}, {"text": "a green triangle"}]
    captions.write_text("".join(json.dumps(row) + "\n" for row in rows))
    output = tmp_path / "eval"
    evaluate.main([
        "--pretrained_model_name_or_path", str(pipeline_dir), "--captions", str(captions),
        "--clip_model", str(clip_dir), "--output_dir", str(output), "--seed", "3", *FAST,
    ])
    metrics = read_metrics(output)
    assert metrics["num_images"] == 3 and 0 <= metrics["clip_score"] <= 100 and math.isfinite(metrics["clip_score"])
    assert "fid" not in metrics and "shapes_eval" not in metrics
    files = sorted(p.name for p in (output / "images").glob("*.png"))
    assert files == ["00000.png", "00001.png", "00002.png"]
    metadata = [json.loads(line) for line in (output / "images" / "metadata.jsonl").read_text().splitlines()]
    assert [m["text"] for m in metadata] == [row["text"] for row in rows]
    size = metrics["image_size"]
    assert Image.open(output / "images" / "00000.png").size == (size["width"], size["height"])


@pytest.mark.skipif(FID_UNAVAILABLE is not None, reason=f"torch-fidelity unusable here: {FID_UNAVAILABLE}")
def test_fid_and_clip_score_against_dataset_images(tmp_path, pipeline_dir, clip_dir):
    rng = np.random.default_rng(0)
    # Reference images of another size than the generated ones: evaluate.py fits them to the generated size.
    images = [Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)) for _ in range(4)]
    dataset = datasets.Dataset.from_dict({"image": images, "caption": ["a red circle", "", "a blue square",
                                                                        "a green diamond"]})
    dataset = dataset.cast_column("image", datasets.Image())
    dataset.save_to_disk(tmp_path / "data")
    random_inception_weights(tmp_path / "inception.pth")
    output = tmp_path / "eval"
    evaluate.main([
        "--pretrained_model_name_or_path", str(pipeline_dir), "--dataset_name", str(tmp_path / "data"),
        "--caption_column", "caption", "--inception_weights", str(tmp_path / "inception.pth"),
        "--clip_model", str(clip_dir), "--output_dir", str(output), *FAST,
    ])
    metrics = read_metrics(output)
    # The caption-less row is left out, with its image.
    assert metrics["num_images"] == 3 and metrics["num_reference_images"] == 3
    assert math.isfinite(metrics["fid"]) and metrics["fid"] >= 0 and math.isfinite(metrics["clip_score"])
    assert len(list((output / "images").glob("*.png"))) == 3


def test_shapes_eval_on_held_out_prompts(tmp_path, pipeline_dir):
    output = tmp_path / "eval"
    report = evaluate.main([
        "--pretrained_model_name_or_path", str(pipeline_dir), "--shapes_eval", "--shapes_per_category", "2",
        "--output_dir", str(output), "--guidance_scale", "2.0", *FAST,
    ])
    metrics = read_metrics(output)
    assert metrics == report and metrics["num_images"] == 2 * len(CATEGORIES)
    shapes = metrics["shapes_eval"]
    assert list(shapes["per_category"]) == list(CATEGORIES)
    assert all(0 <= value <= 1 for value in shapes["per_category"].values())
    assert shapes["overall"] == pytest.approx(np.mean(list(shapes["per_category"].values())))
    assert 0 <= shapes["overall"] <= 1 and shapes["counts"] == {category: 2 for category in CATEGORIES}
    assert len(list((output / "images").glob("*.png"))) == 2 * len(CATEGORIES)


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "No captions"),
        (["--shapes_eval", "--reference_dir", "{tmp}"], "needs --inception_weights"),
        (["--captions", "{tmp}/captions.txt", "--inception_weights", "{tmp}/inception.pth"], "--reference_dir"),
        (["--captions", "{tmp}/captions.txt"], "Nothing to measure"),
        (["--captions", "{tmp}/captions.txt", "--clip_model", "{tmp}"], "is not a CLIP model folder"),
        (["--shapes_eval", "--inception_weights", "{tmp}/missing.pth", "--reference_dir", "{tmp}"],
         "weights-inception-2015-12-05"),
        (["--captions", "{tmp}/captions.txt", "--dataset_name", "user/data", "--shapes_eval"], "one caption source"),
        (["--shapes_eval", "--resolution", "32", "32", "32"], "HEIGHT [WIDTH]"),
        (["--shapes_eval", "--batch_size", "0"], "--batch_size must be >= 1"),
    ],
)
def test_invalid_arguments_say_what_to_pass(tmp_path, pipeline_dir, extra, message):
    (tmp_path / "captions.txt").write_text("a red circle\n")
    (tmp_path / "inception.pth").write_bytes(b"")
    extra = [value.format(tmp=tmp_path) for value in extra]
    with pytest.raises(SystemExit, match=message.replace("[", r"\[")):
        evaluate.parse_args(["--pretrained_model_name_or_path", str(pipeline_dir), "--output_dir", "out", *extra])


def test_shapes_eval_refuses_other_captions_before_generating(tmp_path, pipeline_dir):
    (tmp_path / "captions.txt").write_text("a red circle\na photo of an astronaut\n")
    with pytest.raises(SystemExit, match="astronaut"):
        evaluate.main([
            "--pretrained_model_name_or_path", str(pipeline_dir), "--captions", str(tmp_path / "captions.txt"),
            "--shapes_eval", "--output_dir", str(tmp_path / "eval"),
        ])
    assert not (tmp_path / "eval").exists()
