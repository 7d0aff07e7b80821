#!/usr/bin/env python
"""Generate images with a pipeline for a set of captions and score them: FID, CLIP score, ShapesEval.

    python examples/evaluate.py --pretrained_model_name_or_path PIPELINE \\
        --dataset_name user/data --caption_column text --image_column image --max_samples 10000 \\
        --inception_weights weights-inception-2015-12-05-6726825d.pth --clip_model clip-vit-large-patch14/ \\
        --num_inference_steps 30 --batch_size 16 --output_dir eval/

    python examples/evaluate.py --pretrained_model_name_or_path demo-output/pipeline --shapes_eval \\
        --num_inference_steps 10 --guidance_scale 2.0 --output_dir eval-shapes/

PIPELINE is any pipeline folder or Hub id of this package (or a training run's --output_dir). Captions come from
--captions (a .txt file, one caption a line, or a .jsonl file whose --caption_column field is the caption), from a
`datasets` dataset (--dataset_name: Hub id or `save_to_disk` folder; --caption_column, --image_column) or an image
folder with metadata.jsonl (--train_data_dir); with --shapes_eval and none of them, the held-out ShapesEval prompts
of the embedded shapes task (--shapes_per_category of each category).

Metrics, each computed when its flag is given:
  FID         --inception_weights: torchmetrics' FrechetInceptionDistance on torch-fidelity's InceptionV3 (2048-d
              pool features) from that local file, against the dataset's --image_column or --reference_dir
              (reference images are resized and centre-cropped to the generated size).
  CLIP score  --clip_model: 100 * max(cosine(image, caption), 0) with a transformers CLIPModel + CLIPProcessor
              folder (e.g. openai/clip-vit-large-patch14 saved locally), averaged over the images.
  ShapesEval  --shapes_eval: GenEval-style accuracy per category for captions of the shapes grammar.

FID needs `pip install torchmetrics torch-fidelity` (torch-fidelity needs a torchvision built for the installed
torch). Nothing is downloaded for the metrics: FID and CLIP read local files. Runs on CUDA when available.

Output in --output_dir: images/NNNNN.png with images/metadata.jsonl (file_name, text: an image folder that
--train_data_dir reads back) and metrics.json (the metrics and the sampling settings; null means the pipeline's
default).
"""

import argparse
import json
import pickle
import time
from pathlib import Path

import datasets
import numpy as np
import torch
from diffusers import DiffusionPipeline
from PIL import Image, ImageOps
from tqdm.auto import tqdm
from transformers import CLIPModel, CLIPProcessor

import diffusers_microdit  # noqa: F401  (registers the package's classes with diffusers)
from diffusers_microdit.data.shapes import held_out_prompts, parse_caption
from diffusers_microdit.data.shapes_eval import ShapesEval
from diffusers_microdit.integrity import check_local_folder
from diffusers_microdit.training.args import numeric_flag_problems, resolve_pipeline_path
from diffusers_microdit.training.sources import decode_image, load_image_caption_source

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
INCEPTION_WEIGHTS_HELP = (
    "Local InceptionV3 weights for FID: the file torch-fidelity downloads by default, "
    "weights-inception-2015-12-05-6726825d.pth (asset of torch-fidelity's v0.2.0 GitHub release; its URL is "
    "torch_fidelity.feature_extractor_inceptionv3.URL_INCEPTION_V3). Fetch it once on a machine with internet."
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--pretrained_model_name_or_path", required=True,
        help="Pipeline folder or Hub id to evaluate (or a training run's --output_dir).",
    )
    parser.add_argument("--output_dir", required=True, help="Where images/ and metrics.json are written.")
    source = parser.add_argument_group("captions and reference images")
    source.add_argument(
        "--captions", default=None,
        help="Caption file: .txt with one caption a line, or .jsonl whose --caption_column field is the caption.",
    )
    # The data flags of the training scripts, less their image-preparation ones (references are fitted to the
    # generated size instead).
    source.add_argument("--dataset_name", default=None, help="Hub dataset id, or a local `save_to_disk` folder.")
    source.add_argument("--dataset_config_name", default=None)
    source.add_argument("--dataset_split", default="train")
    source.add_argument("--train_data_dir", default=None, help="Image folder with metadata.jsonl captions.")
    source.add_argument("--image_column", default="image", help="Reference images for FID.")
    source.add_argument("--caption_column", default="text", help="Captions (also the field of a .jsonl --captions).")
    source.add_argument("--max_samples", type=int, default=None, help="Use only the first N captions.")
    source.add_argument("--cache_dir", default=None, help="Where `datasets` caches downloads.")
    source.add_argument(
        "--reference_dir", default=None,
        help="Folder of reference images for FID (instead of the dataset's --image_column).",
    )
    metrics = parser.add_argument_group("metrics")
    metrics.add_argument("--inception_weights", default=None, help=INCEPTION_WEIGHTS_HELP)
    metrics.add_argument(
        "--clip_model", default=None,
        help="CLIP score model: a local transformers CLIPModel + CLIPProcessor folder (save_pretrained of both).",
    )
    metrics.add_argument(
        "--shapes_eval", action="store_true",
        help="Score with ShapesEval (shapes-grammar captions; the held-out prompts if no captions are given).",
    )
    metrics.add_argument(
        "--shapes_per_category", type=int, default=20, help="Held-out ShapesEval prompts of each category."
    )
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--num_inference_steps", type=int, default=None, help="Default: the pipeline's.")
    sampling.add_argument("--guidance_scale", type=float, default=None, help="Default: the pipeline's.")
    sampling.add_argument(
        "--resolution", type=int, nargs="+", default=None, metavar="SIZE",
        help="HEIGHT [WIDTH] in pixels (one value: square); default: the pipeline's native size.",
    )
    sampling.add_argument("--batch_size", type=int, default=16, help="Captions per pipeline call.")
    sampling.add_argument("--seed", type=int, default=0, help="Seeds one torch.Generator for all the noise.")
    args = parser.parse_args(argv)

    errors = check_args(args)
    if errors:
        raise SystemExit("Invalid arguments:\n  " + "\n  ".join(errors))
    args.pretrained_model_name_or_path = resolve_pipeline_path(args.pretrained_model_name_or_path)
    check_local_folder(args.clip_model, "CLIP model folder")
    return args


def check_args(args: argparse.Namespace) -> list[str]:
    """Every problem with the flags that can be seen before loading anything, each saying what to pass."""
    errors = numeric_flag_problems(args)
    sources = [f"--{name}" for name in ("captions", "dataset_name", "train_data_dir") if getattr(args, name)]
    if len(sources) > 1:
        errors.append(f"Give one caption source, not {' and '.join(sources)}.")
    if not sources and not args.shapes_eval:
        errors.append("No captions: pass --captions, --dataset_name or --train_data_dir (or --shapes_eval alone for "
                      "the held-out shapes prompts).")
    if not (args.inception_weights or args.clip_model or args.shapes_eval):
        errors.append("Nothing to measure: pass --inception_weights (FID), --clip_model (CLIP score) and/or "
                      "--shapes_eval.")
    if args.captions and not Path(args.captions).is_file():
        errors.append(f"--captions {args.captions} is not a file.")
    elif args.captions and Path(args.captions).suffix not in (".txt", ".jsonl"):
        errors.append(f"--captions must be a .txt or .jsonl file, got {args.captions}.")
    for flag, path in (("--train_data_dir", args.train_data_dir), ("--reference_dir", args.reference_dir)):
        if path and not Path(path).is_dir():
            errors.append(f"{flag} {path} is not a folder.")
    if args.clip_model and not (Path(args.clip_model) / "config.json").is_file():
        errors.append(f"--clip_model {args.clip_model} is not a CLIP model folder (config.json, weights and the "
                      "processor files, as CLIPModel / CLIPProcessor.save_pretrained write them).")
    if args.reference_dir and not args.inception_weights:
        errors.append("--reference_dir is for FID, which needs --inception_weights. " + INCEPTION_WEIGHTS_HELP)
    if args.inception_weights:
        if not Path(args.inception_weights).is_file():
            errors.append(f"--inception_weights {args.inception_weights} is not a file. " + INCEPTION_WEIGHTS_HELP)
        if not (args.reference_dir or args.dataset_name or args.train_data_dir):
            errors.append("FID needs reference images: pass --reference_dir, or take captions and images from "
                          "--dataset_name / --train_data_dir (--image_column).")
    if args.resolution is not None and (len(args.resolution) > 2 or min(args.resolution) < 8):
        errors.append(f"--resolution takes HEIGHT [WIDTH] in pixels, got {args.resolution}.")
    for name in ("batch_size", "shapes_per_category", "num_inference_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            errors.append(f"--{name} must be >= 1.")
    if args.guidance_scale is not None and args.guidance_scale < 0:
        errors.append("--guidance_scale must be >= 0.")
    return errors


def read_caption_file(path: str, column: str) -> list[str]:
    """Captions of a .txt file (one a line, blank lines skipped) or of a .jsonl file (each row's `column`)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    if Path(path).suffix == ".txt":
        return [line.strip() for line in lines if line.strip()]
    captions = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row.get(column), str):
            raise SystemExit(f"{path} line {number} has no {column!r} caption; set --caption_column.")
        captions.append(row[column])
    return captions


def load_captions(args) -> tuple[list[str], list | None]:
    """(captions, the dataset's image cells for FID or None) from the caption source, the first --max_samples
    of them; dataset rows without a caption are left out."""
    if args.captions:
        return read_caption_file(args.captions, args.caption_column)[: args.max_samples], None
    if not (args.dataset_name or args.train_data_dir):
        return held_out_prompts(args.shapes_per_category), None
    dataset = load_image_caption_source(
        args.dataset_name, args.dataset_config_name, args.train_data_dir, args.dataset_split, False, args.cache_dir
    )
    if args.caption_column not in dataset.column_names:
        raise SystemExit(f"No caption column {args.caption_column!r} in the dataset (columns: "
                         f"{dataset.column_names}); set --caption_column.")
    if args.max_samples is not None:
        dataset = dataset.select(range(min(args.max_samples, len(dataset))))
    # The dataset's images are the FID references unless --reference_dir gives others.
    wants_images = args.inception_weights and not args.reference_dir
    if wants_images and args.image_column not in dataset.column_names:
        raise SystemExit(f"No image column {args.image_column!r} in the dataset for FID (columns: "
                         f"{dataset.column_names}); set --image_column or pass --reference_dir.")
    keep = [i for i, caption in enumerate(dataset[args.caption_column]) if isinstance(caption, str) and caption]
    dataset = dataset.select(keep)
    captions = list(dataset[args.caption_column])
    if not wants_images:
        return captions, None
    if isinstance(dataset.features[args.image_column], datasets.Image):
        # Undecoded cells (bytes or path): images are decoded one batch at a time, not all in memory at once.
        dataset = dataset.cast_column(args.image_column, datasets.Image(decode=False))
    return captions, list(dataset[args.image_column])


def reference_images(args, dataset_images: list | None) -> list:
    """The FID reference set as `decode_image` cells: the image files of --reference_dir (sorted paths), or the
    dataset's image cells."""
    if args.reference_dir:
        files = sorted(p for p in Path(args.reference_dir).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        return [str(path) for path in files]
    return dataset_images


def check_against_data(args, captions: list[str], references: list | None) -> None:
    """Refuse what the loaded captions and references cannot give, before any image is generated."""
    errors = []
    if not captions:
        errors.append("The caption source has no captions.")
    if args.inception_weights and len(captions) < 2:
        errors.append("FID needs at least 2 generated images: give more captions.")
    if references is not None and len(references) < 2:
        errors.append(f"FID needs at least 2 reference images, found {len(references)}.")
    if args.shapes_eval:
        for caption in captions:
            try:
                parse_caption(caption)
            except ValueError:
                errors.append(f"--shapes_eval scores shapes-grammar captions only; {caption!r} is not one.")
                break
    if errors:
        raise SystemExit("Cannot evaluate:\n  " + "\n  ".join(errors))


def build_fid(weights_path: str, device: str):
    """torchmetrics' FID on torch-fidelity's InceptionV3 loaded from `weights_path` (no download)."""
    try:
        import torch_fidelity  # noqa: F401  (the Inception network torchmetrics' FID runs)
        from torchmetrics.image.fid import FrechetInceptionDistance
    except (ImportError, RuntimeError) as error:  # RuntimeError: a torchvision built for another torch
        raise SystemExit(
            f"FID needs torchmetrics and torch-fidelity, and torch-fidelity a torchvision built for this torch "
            f"({error}): pip install torchmetrics torch-fidelity."
        ) from error
    try:
        fid = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=weights_path)
    except (RuntimeError, pickle.UnpicklingError, EOFError) as error:
        raise SystemExit(f"--inception_weights {weights_path} is not an InceptionV3 state dict of torch-fidelity: "
                         f"{error}\n{INCEPTION_WEIGHTS_HELP}") from error
    return fid.to(device)


def load_clip(path: str, device: str) -> tuple[CLIPModel, CLIPProcessor]:
    """The --clip_model CLIPModel (eval mode, on `device`) and its CLIPProcessor."""
    return CLIPModel.from_pretrained(path).to(device).eval(), CLIPProcessor.from_pretrained(path)


@torch.no_grad()
def clip_scores(model: CLIPModel, processor: CLIPProcessor, images: list, captions: list[str]) -> list[float]:
    """CLIP score of each image with its caption: 100 * max(cosine of the projected embeddings, 0) (Hessel et al.,
    2021). Computed on CLIPModel directly: torchmetrics' CLIPScore takes only Hub names, and reads
    `get_image_features` as a tensor where transformers 5 returns a model output."""
    inputs = processor(
        text=captions, images=images, return_tensors="pt", padding=True, truncation=True,
        max_length=model.config.text_config.max_position_embeddings,
    ).to(model.device)
    outputs = model(**inputs)  # image_embeds and text_embeds come L2-normalised
    cosine = (outputs.image_embeds * outputs.text_embeds).sum(dim=-1)
    return (100 * cosine.clamp(min=0)).tolist()


def to_uint8_batch(images: list[Image.Image], device: str) -> torch.Tensor:
    """(N, 3, H, W) uint8 tensor of same-size PIL images, the input torchmetrics' FID expects."""
    array = np.stack([np.asarray(image.convert("RGB")) for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2).to(device)


def add_references_to_fid(fid, references: list, size: tuple[int, int], batch_size: int, device: str) -> None:
    """Feed the reference images to FID as the real set, resized and centre-cropped to `size` (width, height)."""
    for first in tqdm(range(0, len(references), batch_size), desc="reference images", unit="batch"):
        batch = [decode_image(cell) for cell in references[first : first + batch_size]]
        # Inception sees both sets at the generated size, so resampling differences do not count as distance.
        fitted = [ImageOps.fit(image, size, Image.BICUBIC) for image in batch]
        fid.update(to_uint8_batch(fitted, device), real=True)


def generate(pipeline, captions: list[str], args, image_dir: Path):
    """Yield (captions, PIL images) batch by batch, saving each image as image_dir/NNNNN.png."""
    generator = torch.Generator().manual_seed(args.seed)  # a CPU generator draws the same noise on any device
    call = dict(num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale)
    if args.resolution:
        call.update(height=args.resolution[0], width=args.resolution[-1])
    call = {name: value for name, value in call.items() if value is not None}  # None: the pipeline's default
    with tqdm(total=len(captions), desc="generating", unit="img") as progress:
        for first in range(0, len(captions), args.batch_size):
            batch = captions[first : first + args.batch_size]
            images = pipeline(batch, generator=generator, **call).images
            for index, image in enumerate(images, first):
                image.save(image_dir / f"{index:05d}.png")
            progress.update(len(batch))
            yield batch, images


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.time()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    captions, dataset_images = load_captions(args)
    references = reference_images(args, dataset_images) if args.inception_weights else None
    check_against_data(args, captions, references)
    # The metric models load before generation, so a bad file fails in seconds, not after the images.
    fid = build_fid(args.inception_weights, device) if args.inception_weights else None
    clip = load_clip(args.clip_model, device) if args.clip_model else None

    pipeline = DiffusionPipeline.from_pretrained(args.pretrained_model_name_or_path).to(device)
    pipeline.set_progress_bar_config(disable=True)  # one bar over all images instead of one per call
    image_dir = Path(args.output_dir) / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    scores, shapes_images, size = [], [], None
    for batch, images in generate(pipeline, captions, args, image_dir):
        size = images[0].size
        if fid is not None:
            fid.update(to_uint8_batch(images, device), real=False)
        if clip is not None:
            scores += clip_scores(*clip, images, batch)
        if args.shapes_eval:
            shapes_images += images
    with open(image_dir / "metadata.jsonl", "w", encoding="utf-8") as file:
        for index, caption in enumerate(captions):
            file.write(json.dumps({"file_name": f"{index:05d}.png", "text": caption}) + "\n")

    report = {
        "pipeline": str(args.pretrained_model_name_or_path), "num_images": len(captions),
        "image_size": {"width": size[0], "height": size[1]}, "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale, "seed": args.seed,
    }
    if fid is not None:
        add_references_to_fid(fid, references, size, args.batch_size, device)
        report.update(fid=float(fid.compute()), num_reference_images=len(references))
    if clip is not None:
        report["clip_score"] = float(np.mean(scores))
    if args.shapes_eval:
        result = ShapesEval().score(shapes_images, captions)
        report["shapes_eval"] = {key: result[key] for key in ("overall", "per_category", "counts")}
    report["seconds"] = round(time.time() - start, 1)
    (Path(args.output_dir) / "metrics.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({key: report[key] for key in ("fid", "clip_score", "shapes_eval") if key in report}, indent=2))
    print(f"Images and metrics.json in {Path(args.output_dir).resolve()}")
    return report


if __name__ == "__main__":
    main()
