"""Gradio demo (a Hugging Face Space) for the diffusers-microdit text-to-image pipelines.

Models are pipeline folders or Hub repo ids, given with `--model_dir` (repeatable) or the environment variable
`MICRODIT_SPACE_MODELS` (separated by `os.pathsep`, i.e. `:` on Linux). Without either, the app serves
`demo-output/pipeline` of this repository, which `make demo` writes:

    python spaces/diffusers-microdit/app.py --model_dir demo-output/pipeline

A request whose predicted run time (from a transformer forward timed on the serving device) exceeds
`--max_request_seconds` / `$MICRODIT_SPACE_MAX_SECONDS` (default 60) is refused before it starts.

On a ZeroGPU Space the generation runs inside `spaces.GPU`; anywhere else (CPU included) it runs as is.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import math
import os
import re
import reprlib
import threading
import time
import uuid
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

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
MAX_SECONDS_ENV = "MICRODIT_SPACE_MAX_SECONDS"
# `make demo`'s output in a checkout of the repository (`.parent` chains never fail, wherever the app is copied).
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent.parent / "demo-output" / "pipeline"
DEFAULT_MODEL_SHOWN = "demo-output/pipeline"  # how pages name it: the repository-relative path, not the server's
DEFAULT_MODEL_LABEL = "demo"
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
DEFAULT_MAX_REQUEST_SECONDS = 60.0  # predicted run time per request; the static bounds alone allow minutes
CALIBRATION_STEPS = 3  # forwards timed once per model (the fastest counts: the first pays one-off allocations)
# An absolute POSIX path inside a message (not the `/` of "height/width" or of a URL's scheme).
ABSOLUTE_PATH = re.compile(r"(?<![\w.:/])(?:/[\w.@+~-]+)+/?")

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


def without_paths(text: str) -> str:
    """`text` with absolute paths replaced, for messages a browser sees: the server's layout is not theirs to know."""
    return ABSOLUTE_PATH.sub("<server path>", text)


def load_pipelines(model_dirs: dict[str, str]) -> dict[str, DiffusionPipeline]:
    """Load every served model now: on ZeroGPU the GPU runs in a fork of this process, so whatever that fork
    loaded itself would be lost with it."""
    pipelines = {}
    for label, spec in model_dirs.items():
        try:
            pipelines[label] = DiffusionPipeline.from_pretrained(spec, dtype=DTYPE).to(DEVICE)
        except Exception as error:  # noqa: BLE001 - one clear line; the chained traceback keeps the details
            raise RuntimeError(f"Could not load the model {label!r}: {without_paths(str(error))}") from error
    return pipelines


def natural_size(pipe: DiffusionPipeline) -> int:
    """The resolution the model was trained at, within the UI's bounds."""
    size = pipe.transformer.config.sample_size * pipe.vae_scale_factor
    return max(MIN_SIZE, min(MAX_SIZE, size // SIZE_STEP * SIZE_STEP))


def model_label(spec: str) -> str:
    """What the model menu shows for `spec`: a folder's name (never its path on the server), or the Hub repo id."""
    return Path(spec).name if Path(spec).is_dir() else spec


def find_models(specs: list[str] | None = None) -> dict[str, str]:
    """Label -> folder or Hub repo id of the models to serve: `specs`, else `$MICRODIT_SPACE_MODELS`, else the
    `make demo` pipeline if it exists. Folders sharing a name get numbered labels."""
    specs = specs or [s for s in os.environ.get(MODELS_ENV, "").split(os.pathsep) if s]
    if not specs:
        return {DEFAULT_MODEL_LABEL: str(DEFAULT_MODEL_DIR)} if DEFAULT_MODEL_DIR.is_dir() else {}
    models = {}
    for spec in specs:
        label = base = model_label(spec)
        number = 1
        while label in models:
            number += 1
            label = f"{base} ({number})"
        models[label] = spec
    return models


def request_budget(seconds: float | None = None) -> float:
    """The longest predicted run time a request may have: `seconds`, else `$MICRODIT_SPACE_MAX_SECONDS`, else 60."""
    if seconds is None:
        seconds = float(os.environ.get(MAX_SECONDS_ENV) or DEFAULT_MAX_REQUEST_SECONDS)
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"The request budget must be a positive number of seconds; got {seconds}.")
    return seconds


def no_model_message() -> str:
    """What to do when there is nothing to serve."""
    return (
        f"No model to serve: `{DEFAULT_MODEL_SHOWN}` does not exist. Run `make demo` to create it, or pass "
        f"`--model_dir FOLDER_OR_REPO_ID` (repeatable) or set `{MODELS_ENV}`."
    )


class Inputs(NamedTuple):
    """One generation request, typed and within the demo's bounds."""

    prompt: str
    negative_prompt: str
    model: str
    steps: int
    guidance_scale: float
    seed: int
    width: int
    height: int
    num_images: int


def as_text(name: str, value, optional: bool = False) -> str:
    """`value` if it is a string (an optional one may be missing), else a `gr.Error` naming `name`."""
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise gr.Error(f"The {name} must be text; got {reprlib.repr(value)}.")
    return value


def as_number(name: str, value, whole: bool = False) -> float | int:
    """`value` as a finite number (an int when `whole`), else a `gr.Error` naming `name`. JSON clients may send
    20.0 for 20, so integral floats count as whole; strings and booleans are refused rather than guessed at."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not is_number or (whole and not float(value).is_integer()):
        raise gr.Error(f"{name} must be {'a whole number' if whole else 'a number'}; got {reprlib.repr(value)}.")
    return int(value) if whole else float(value)


def parse_inputs(
    models, prompt, negative_prompt, model, steps, guidance_scale, seed, width, height, num_images
) -> Inputs:
    """The request as `Inputs`, or a `gr.Error` naming the first input of the wrong type or outside the bounds.
    The handler gets the raw API payloads (`preprocess=False`), so every check is here and names its field."""
    prompt = as_text("prompt", prompt)
    negative_prompt = as_text("negative prompt", negative_prompt, optional=True)
    if not prompt.strip():
        raise gr.Error("Enter a prompt.")
    for name, text in (("prompt", prompt), ("negative prompt", negative_prompt)):
        if len(text) > MAX_PROMPT_CHARS:
            raise gr.Error(f"The {name} has {len(text)} characters; the limit is {MAX_PROMPT_CHARS}.")
    if not isinstance(model, str) or model not in models:
        raise gr.Error(f"Unknown model {reprlib.repr(model)}; choose one of {list(models)}.")
    bounds = (
        ("Steps", steps, 1, MAX_STEPS, True),
        ("Guidance scale", guidance_scale, 1.0, MAX_GUIDANCE, False),
        ("Seed", seed, 0, MAX_SEED, True),
        ("Width", width, MIN_SIZE, MAX_SIZE, True),
        ("Height", height, MIN_SIZE, MAX_SIZE, True),
        ("Number of images", num_images, 1, MAX_IMAGES, True),
    )
    numbers = []
    for name, value, low, high, whole in bounds:
        number = as_number(name, value, whole)
        if not low <= number <= high:
            raise gr.Error(f"{name} must be between {low} and {high}; got {number}.")
        numbers.append(number)
    for name, value in (("Width", numbers[3]), ("Height", numbers[4])):
        if value % SIZE_STEP:
            raise gr.Error(f"{name} must be a multiple of {SIZE_STEP}; got {value}.")
    return Inputs(prompt.strip(), negative_prompt.strip(), model, *numbers)


class ForwardCost(NamedTuple):
    """One transformer forward (batch of one) timed on the serving device at the model's natural size."""

    seconds: float
    tokens: int
    attention_share: float


_forward_costs: weakref.WeakKeyDictionary[DiffusionPipeline, ForwardCost] = weakref.WeakKeyDictionary()


def latent_tokens(pipe: DiffusionPipeline, height: int, width: int) -> int:
    """Tokens the transformer sees for a `height` x `width` request; the PixArt family first moves the size to
    its nearest trained aspect-ratio bin (`use_resolution_binning`, on in this app), so that size is the one run."""
    if hasattr(pipe, "binned_size"):
        height, width = pipe.binned_size(height, width)
    cell = pipe.vae_scale_factor * pipe.transformer.config.patch_size
    return (height // cell) * (width // cell)


def network_evaluations(pipe: DiffusionPipeline, steps: int) -> int:
    """Transformer forwards of a `steps`-step run: a second-order scheduler (MicroDiT's Heun) makes 2N-1. Asked
    of a copy of the scheduler, so the pipeline's own is left as it is."""
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(steps)
    return len(scheduler.timesteps)


def attention_share(pipe: DiffusionPipeline, tokens: int) -> float:
    """Share of a forward's FLOPs that grows with the square of the tokens: per token and layer, a dense transformer
    of width d spends ~24·d² FLOPs in projections and MLP and ~4·n·d in softmax attention, so n / (n + 6·d). An
    upper bound for LiT (linear attention) and PixArt-KV (compressed keys), whose attention grows more slowly."""
    config = pipe.transformer.config
    width = config.get("hidden_size") or config["num_attention_heads"] * config["attention_head_dim"]
    return tokens / (tokens + 6 * width)


def device_clock() -> float:
    """Seconds, after the device has finished the work queued so far (CUDA kernels run asynchronously)."""
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def measure_forward_cost(pipe: DiffusionPipeline) -> ForwardCost:
    """Time the transformer's forwards during a short unguided run at the natural size (latents only, no decode)."""
    size = natural_size(pipe)
    starts, seconds = [], []
    before = pipe.transformer.register_forward_pre_hook(lambda *_: starts.append(device_clock()))
    after = pipe.transformer.register_forward_hook(lambda *_: seconds.append(device_clock() - starts[-1]))
    try:
        pipe(prompt="calibration", num_inference_steps=CALIBRATION_STEPS, guidance_scale=1.0, height=size,
             width=size, output_type="latent")  # fmt: skip
    finally:
        before.remove()
        after.remove()
    tokens = latent_tokens(pipe, size, size)
    return ForwardCost(min(seconds), tokens, attention_share(pipe, tokens))


def forward_cost(pipe: DiffusionPipeline) -> ForwardCost:
    """`pipe`'s forward cost, measured on first use (inside the GPU function on ZeroGPU, where the GPU is)."""
    if pipe not in _forward_costs:
        _forward_costs[pipe] = measure_forward_cost(pipe)
    return _forward_costs[pipe]


def predicted_seconds(pipe: DiffusionPipeline, inputs: Inputs) -> float:
    """Predicted transformer time of a request: forwards x batch x the cost of one forward at its tokens.

    Above the natural size, the measured forward is split into a part linear in the tokens and the attention
    share (`attention_share`), which grows with their square; below it a forward is taken to cost as much as at the
    natural size (fixed overheads dominate there). The batch is images x 2 when classifier-free guidance doubles it
    (both families guide when guidance_scale > 1), costed linearly, which is conservative on parallel hardware."""
    cost = forward_cost(pipe)
    growth = max(latent_tokens(pipe, inputs.height, inputs.width) / cost.tokens, 1.0)
    share = cost.attention_share
    per_forward = cost.seconds * ((1 - share) * growth + share * growth**2)
    batch = inputs.num_images * (2 if inputs.guidance_scale > 1 else 1)
    return per_forward * batch * network_evaluations(pipe, inputs.steps)


def check_cost(pipe: DiffusionPipeline, inputs: Inputs, max_seconds: float) -> None:
    """Refuse, before any work, a request predicted to run longer than `max_seconds`."""
    seconds = predicted_seconds(pipe, inputs)
    if seconds > max_seconds:
        raise gr.Error(
            f"This request would take about {seconds:,.1f} s on this {DEVICE.upper()}; the limit is {max_seconds:g} s. "
            f"Lower the size ({inputs.width}x{inputs.height}), the steps ({inputs.steps}) or the number of images "
            f"({inputs.num_images}), or set the guidance scale to 1 (no guidance halves the work)."
        )


class RequestAbandoned(Exception):
    """The client cancelled or left: the generation stops between two steps."""


def stop_when(stop: threading.Event):
    """A `callback_on_step_end` that ends the run as soon as `stop` is set. It raises instead of setting the
    pipeline's `interrupt`, which would still decode the unfinished latents for nobody."""

    def on_step_end(pipe, step, timestep, callback_kwargs):
        if stop.is_set():
            raise RequestAbandoned
        return {}

    return on_step_end


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
    *,
    max_seconds: float = DEFAULT_MAX_REQUEST_SECONDS,
    stop: threading.Event | None = None,
) -> list[Image.Image]:
    """Generate `num_images` images with `pipelines[model]`, unless predicted to take over `max_seconds`; stop
    between steps once `stop` is set. Every problem surfaces as a readable `gr.Error` without server paths."""
    if not pipelines:
        raise gr.Error(no_model_message())
    inputs = parse_inputs(
        pipelines, prompt, negative_prompt, model, steps, guidance_scale, seed, width, height, num_images
    )
    pipe = pipelines[inputs.model]
    # An empty negative prompt is left out: each pipeline then uses its own default (MicroDiT: the zero caption).
    negative = {"negative_prompt": inputs.negative_prompt} if inputs.negative_prompt else {}
    try:
        check_cost(pipe, inputs, max_seconds)
        return pipe(
            prompt=inputs.prompt,
            **negative,
            num_inference_steps=inputs.steps,
            guidance_scale=inputs.guidance_scale,
            width=inputs.width,
            height=inputs.height,
            num_images_per_prompt=inputs.num_images,
            generator=torch.Generator(DEVICE).manual_seed(inputs.seed),
            callback_on_step_end=stop_when(stop or threading.Event()),
        ).images
    except gr.Error:  # already readable (and a ValueError, so it must not reach the clause below)
        raise
    except torch.OutOfMemoryError as error:
        raise gr.Error("Out of memory: use a smaller size or fewer images.") from error
    except ValueError as error:  # the pipeline's own input checks
        raise gr.Error(f"The model refused these inputs: {without_paths(str(error))}") from error
    except RuntimeError as error:  # torch's failures; the log keeps the traceback, the page gets no paths
        raise gr.Error(f"The generation failed: {without_paths(str(error))}") from error


class Runs:
    """Stop flags of the generations in progress, by run id, with the session each belongs to: a cancelled request
    stops its run, an ended session (tab closed, client gone) all of its runs."""

    def __init__(self):
        self._lock = threading.Lock()  # the queue's event loop and the unload handler's thread both use it
        self._runs: dict[str, tuple[str | None, threading.Event]] = {}

    @contextmanager
    def start(self, session_hash: str | None) -> Iterator[str]:
        """Register a run for the duration of the block; yields its id."""
        run_id = uuid.uuid4().hex
        with self._lock:
            self._runs[run_id] = (session_hash, threading.Event())
        try:
            yield run_id
        finally:
            with self._lock:
                del self._runs[run_id]

    def flag(self, run_id: str) -> threading.Event:
        """The stop flag of `run_id`. A ZeroGPU worker forked before the run started does not know the id, and gets
        a flag nothing sets: there the run goes on to its end."""
        with self._lock:
            return self._runs[run_id][1] if run_id in self._runs else threading.Event()

    def stop(self, run_id: str | None = None, session_hash: str | None = None) -> None:
        """Set the flag of `run_id`, or of every run of `session_hash`."""
        with self._lock:
            for key, (session, flag) in self._runs.items():
                if key == run_id or (session_hash is not None and session == session_hash):
                    flag.set()


def build_demo(model_dirs: dict[str, str], max_seconds: float | None = None) -> gr.Blocks:
    """The demo UI serving `model_dirs` (label -> folder or Hub repo id), queued one generation at a time, refusing
    requests predicted to take over `max_seconds` (see `request_budget`) and stopping those whose client left."""
    pipelines = load_pipelines(model_dirs)
    labels = list(pipelines)
    size = natural_size(pipelines[labels[0]]) if labels else 256
    budget = request_budget(max_seconds)
    runs = Runs()

    @on_gpu
    def run_generation(run_id: str, *inputs):
        """The generation itself; it gets the run's id, a string, as ZeroGPU sends the arguments to a worker."""
        return generate(pipelines, *inputs, max_seconds=budget, stop=runs.flag(run_id))

    async def generate_images(
        prompt, negative_prompt, model, steps, guidance_scale, seed, width, height, num_images,
        request: gr.Request, progress=gr.Progress(track_tqdm=True),
    ):  # fmt: skip
        """Run the generation in a worker thread, the pipeline's progress bar (steps) shown on the page. Gradio
        cancels this coroutine when the client cancels (`/cancel`), never the thread, so the thread is told to stop
        through its flag, and the queue's slot is held until it has."""
        inputs = (prompt, negative_prompt, model, steps, guidance_scale, seed, width, height, num_images)
        with runs.start(request.session_hash) as run_id:
            work = asyncio.ensure_future(asyncio.to_thread(run_generation, run_id, *inputs))
            try:
                return await asyncio.shield(work)
            except asyncio.CancelledError:
                runs.stop(run_id)
                await asyncio.wait([work])
                raise
            except RequestAbandoned as error:
                raise gr.Error("The request was abandoned.", print_exception=False) from error

    def end_session(request: gr.Request):
        """The page was closed (or a client ended its session): stop that session's generations."""
        runs.stop(session_hash=request.session_hash)

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
            preprocess=False,  # raw payloads: `parse_inputs` names the field of a wrong-typed API input
        )
        model.change(size_updates, inputs=model, outputs=[width, height], api_name=False)
        demo.unload(end_session)
    return demo.queue(max_size=MAX_QUEUE, default_concurrency_limit=1)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", action="append", default=[], help="Pipeline folder or Hub repo id.")
    parser.add_argument("--host", default=None, help="Interface to listen on (default: $GRADIO_SERVER_NAME).")
    parser.add_argument("--port", type=int, default=None, help="Port (default: $GRADIO_SERVER_PORT or 7860).")
    parser.add_argument(
        "--max_request_seconds",
        type=float,
        default=None,
        help=f"Refuse requests predicted to run longer (default: ${MAX_SECONDS_ENV} or "
        f"{DEFAULT_MAX_REQUEST_SECONDS:g}).",
    )
    args = parser.parse_args(argv)
    demo = build_demo(find_models(args.model_dir), args.max_request_seconds)
    demo.launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
