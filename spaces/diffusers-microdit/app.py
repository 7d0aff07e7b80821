"""Gradio demo (a Hugging Face Space) for the diffusers-microdit text-to-image pipelines.

Models are pipeline folders or Hub repo ids, given with `--model_dir` (repeatable) or the environment variable
`MICRODIT_SPACE_MODELS` (separated by `os.pathsep`, i.e. `:` on Linux). Without either, the app serves
`demo-output/pipeline` of this repository, which `make demo` writes:

    python spaces/diffusers-microdit/app.py --model_dir demo-output/pipeline

On a ZeroGPU Space the generation runs inside `spaces.GPU`; anywhere else (CPU included) it runs as is.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

# `spaces` (Hugging Face Spaces' package, not this repo's `spaces/` folder) must come before CUDA is initialised.
try:
    from spaces import GPU

    on_gpu = GPU(duration=120)  # a ZeroGPU Space attaches a GPU only while such a function runs
except ImportError:  # not on a Space

    def on_gpu(function):
        """No GPU scheduling to do: run the function as it is."""
        return function


import gradio as gr  # noqa: E402
import torch  # noqa: E402
from diffusers import DiffusionPipeline  # noqa: E402
from PIL import Image  # noqa: E402

import diffusers_microdit  # noqa: E402, F401  (registers the package's pipelines with diffusers)

MODELS_ENV = "MICRODIT_SPACE_MODELS"
# `make demo`'s output in a checkout of the repository (`.parent` chains never fail, wherever the app is copied).
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent.parent / "demo-output" / "pipeline"
STYLES = (  # the paper's prompt set
    "Origami",
    "Pixel art",
    "Line art",
    "Cyberpunk",
    "Van Gogh Starry Night",
    "Animation",
    "Watercolor",
    "Stained glass",
)
EXAMPLE_PROMPTS = [f"Image of an astronaut riding a horse in {style} style" for style in STYLES]

# Request bounds: a public demo must not let one request occupy the machine for minutes.
MAX_PROMPT_CHARS = 500
MAX_STEPS = 50
MAX_GUIDANCE = 15.0
MIN_SIZE, MAX_SIZE, SIZE_STEP = 32, 1024, 16
MAX_IMAGES = 4
MAX_SEED = 2**31 - 1
MAX_QUEUE = 16

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def inference_dtype(device: str) -> torch.dtype:
    """bfloat16 on GPUs that have it, float16 on older ones (T4, V100), float32 on the CPU."""
    if device != "cuda":
        return torch.float32
    try:
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    except RuntimeError:  # ZeroGPU: no device in the main process yet, and its GPUs (A100/H200) all have bfloat16
        return torch.bfloat16


DTYPE = inference_dtype(DEVICE)


def load_pipelines(model_dirs: dict[str, str]) -> dict[str, DiffusionPipeline]:
    """Load every served model now: on ZeroGPU the GPU runs in a fork of this process, so whatever that fork
    loaded itself would be lost with it."""
    pipelines = {}
    for label, spec in model_dirs.items():
        try:
            pipelines[label] = DiffusionPipeline.from_pretrained(spec, dtype=DTYPE).to(DEVICE)
        except Exception as error:  # noqa: BLE001 - one clear line for the operator instead of a loader traceback
            raise RuntimeError(f"Could not load the model {label!r} from {spec!r}: {error}") from error
    return pipelines


def natural_size(pipe: DiffusionPipeline) -> int:
    """The resolution the model was trained at, within the UI's bounds."""
    size = pipe.transformer.config.sample_size * pipe.vae_scale_factor
    return max(MIN_SIZE, min(MAX_SIZE, size // SIZE_STEP * SIZE_STEP))


def find_models(specs: list[str] | None = None) -> dict[str, str]:
    """Label -> folder or Hub repo id of the models to serve: `specs`, else `$MICRODIT_SPACE_MODELS`, else the
    `make demo` pipeline if it exists. Labels are the specs as given."""
    specs = specs or [s for s in os.environ.get(MODELS_ENV, "").split(os.pathsep) if s]
    if not specs:
        return {"demo-output/pipeline": str(DEFAULT_MODEL_DIR)} if DEFAULT_MODEL_DIR.is_dir() else {}
    return {spec: spec for spec in specs}


def no_model_message() -> str:
    """What to do when there is nothing to serve."""
    return (
        f"No model to serve: `{DEFAULT_MODEL_DIR}` does not exist. Run `make demo` to create it, or pass "
        f"`--model_dir FOLDER_OR_REPO_ID` (repeatable) or set `{MODELS_ENV}`."
    )


def check_inputs(prompt, negative_prompt, steps, guidance_scale, seed, width, height, num_images) -> None:
    """Raise a `gr.Error` naming the first input outside the demo's bounds."""
    if not prompt or not prompt.strip():
        raise gr.Error("Enter a prompt.")
    for name, text in (("prompt", prompt), ("negative prompt", negative_prompt or "")):
        if len(text) > MAX_PROMPT_CHARS:
            raise gr.Error(f"The {name} has {len(text)} characters; the limit is {MAX_PROMPT_CHARS}.")
    bounds = (
        ("Steps", steps, 1, MAX_STEPS),
        ("Guidance scale", guidance_scale, 1.0, MAX_GUIDANCE),
        ("Seed", seed, 0, MAX_SEED),
        ("Width", width, MIN_SIZE, MAX_SIZE),
        ("Height", height, MIN_SIZE, MAX_SIZE),
        ("Number of images", num_images, 1, MAX_IMAGES),
    )
    for name, value, low, high in bounds:
        if value is None or not low <= value <= high:
            raise gr.Error(f"{name} must be between {low} and {high}; got {value}.")
    for name, value in (("Width", width), ("Height", height)):
        if value % SIZE_STEP:
            raise gr.Error(f"{name} must be a multiple of {SIZE_STEP}; got {value}.")


def generate(
    pipelines: dict[str, DiffusionPipeline],
    prompt: str,
    negative_prompt: str,
    model: str,
    steps: int,
    guidance_scale: float,
    seed: int,
    width: int,
    height: int,
    num_images: int,
) -> list[Image.Image]:
    """Generate `num_images` images with `pipelines[model]`; every problem surfaces as a readable `gr.Error`."""
    if not pipelines:
        raise gr.Error(no_model_message())
    if model not in pipelines:
        raise gr.Error(f"Unknown model {model!r}; choose one of {list(pipelines)}.")
    check_inputs(prompt, negative_prompt, steps, guidance_scale, seed, width, height, num_images)
    pipe = pipelines[model]
    # An empty negative prompt is left out: each pipeline then uses its own default (MicroDiT: the zero caption).
    negative = {"negative_prompt": negative_prompt.strip()} if negative_prompt and negative_prompt.strip() else {}
    try:
        return pipe(
            prompt=prompt.strip(),
            **negative,
            num_inference_steps=int(steps),
            guidance_scale=float(guidance_scale),
            width=int(width),
            height=int(height),
            num_images_per_prompt=int(num_images),
            generator=torch.Generator(DEVICE).manual_seed(int(seed)),
        ).images
    except torch.OutOfMemoryError as error:
        raise gr.Error("Out of memory: use a smaller size or fewer images.") from error
    except ValueError as error:  # the pipeline's own input checks
        raise gr.Error(f"The model refused these inputs: {error}") from error


def build_demo(model_dirs: dict[str, str]) -> gr.Blocks:
    """The demo UI serving `model_dirs` (label -> folder or Hub repo id), queued one generation at a time."""
    pipelines = load_pipelines(model_dirs)
    labels = list(pipelines)
    size = natural_size(pipelines[labels[0]]) if labels else 256

    @on_gpu
    def generate_images(*inputs, progress=gr.Progress(track_tqdm=True)):
        """The pipeline's own progress bar (steps) is shown on the page while it runs."""
        return generate(pipelines, *inputs)

    def size_updates(model: str):
        """Width and height follow the chosen model's training resolution."""
        return (natural_size(pipelines[model]),) * 2

    with gr.Blocks(title="diffusers-microdit", analytics_enabled=False) as demo:
        gr.Markdown(
            "# diffusers-microdit\nMicro-budget text-to-image diffusion transformers (MicroDiT, KV-compressed "
            f"PixArt-Σ) running in diffusers, on {DEVICE.upper()}."
        )
        if not labels:
            gr.Markdown(f"**{no_model_message()}**", elem_id="no-model")
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="Prompt", value=EXAMPLE_PROMPTS[0], lines=2, max_length=MAX_PROMPT_CHARS)
                negative_prompt = gr.Textbox(label="Negative prompt", max_length=MAX_PROMPT_CHARS)
                model = gr.Dropdown(labels, value=labels[0] if labels else None, label="Model")
                with gr.Row():
                    steps = gr.Slider(1, MAX_STEPS, value=20, step=1, label="Steps")
                    guidance_scale = gr.Slider(1.0, MAX_GUIDANCE, value=5.0, step=0.5, label="Guidance scale")
                with gr.Row():
                    width = gr.Slider(MIN_SIZE, MAX_SIZE, value=size, step=SIZE_STEP, label="Width")
                    height = gr.Slider(MIN_SIZE, MAX_SIZE, value=size, step=SIZE_STEP, label="Height")
                with gr.Row():
                    seed = gr.Number(0, precision=0, minimum=0, maximum=MAX_SEED, label="Seed")
                    num_images = gr.Slider(1, MAX_IMAGES, value=1, step=1, label="Images")
                run = gr.Button("Generate", variant="primary", interactive=bool(labels))
            gallery = gr.Gallery(label="Images", columns=2, height=512, format="png")
        gr.Examples([[p] for p in EXAMPLE_PROMPTS], inputs=[prompt], label="The paper's prompts")
        run.click(
            generate_images,
            inputs=[prompt, negative_prompt, model, steps, guidance_scale, seed, width, height, num_images],
            outputs=gallery,
            api_name="generate",
        )
        model.change(size_updates, inputs=model, outputs=[width, height], api_name=False)
    return demo.queue(max_size=MAX_QUEUE, default_concurrency_limit=1)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", action="append", default=[], help="Pipeline folder or Hub repo id.")
    parser.add_argument("--host", default=None, help="Interface to listen on (default: $GRADIO_SERVER_NAME).")
    parser.add_argument("--port", type=int, default=None, help="Port (default: $GRADIO_SERVER_PORT or 7860).")
    args = parser.parse_args(argv)
    build_demo(find_models(args.model_dir)).launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
