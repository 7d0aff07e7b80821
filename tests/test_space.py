"""The Gradio Space: generation, input bounds as readable errors, the no-model message, a gradio_client round trip
against the app served on 127.0.0.1, and a screenshot of the page with headless Chromium."""

import importlib.util
import inspect
import shutil
import socket
import subprocess

import gradio as gr
import pytest
import torch
from gradio_client import Client
from gradio_client.exceptions import AppError
from helpers import PIPELINE_FAMILIES, REPO_ROOT, tiny_family_pipeline
from PIL import Image

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one intra-op thread
APP_PATH = REPO_ROOT / "spaces" / "diffusers-microdit" / "app.py"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
# prompt, negative prompt, model, steps, guidance, seed, width, height, images
VALID = ["a red circle", "", "microdit", 2, 5.0, 0, 32, 48, 2]


@pytest.fixture(scope="module")
def app():
    """app.py imported from its file (the Space folder is not a package)."""
    spec = importlib.util.spec_from_file_location("diffusers_microdit_space_app", APP_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("space_models")
    for family in PIPELINE_FAMILIES:
        tiny_family_pipeline(family).save_pretrained(root / family)
    return {family: str(root / family) for family in PIPELINE_FAMILIES}


@pytest.fixture(scope="module")
def pipelines(app, model_dirs):
    return app.load_pipelines(model_dirs)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def served(app, model_dirs, tmp_path_factory):
    """URL of the demo served in this process on 127.0.0.1; closed after the module's tests."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio")))  # keep output files out of /tmp
        demo = app.build_demo(model_dirs)
        _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
        yield url
        demo.close()


@pytest.mark.parametrize("family", PIPELINE_FAMILIES)
def test_generate_returns_the_requested_images(app, pipelines, family):
    images = app.generate(pipelines, "a red cat", "blue", family, 2, 5.0, 0, 32, 48, 2)
    assert [image.size for image in images] == [(32, 48)] * 2


@pytest.mark.parametrize(
    "position, value, message",
    [
        (0, "   ", "Enter a prompt"),
        (0, "x" * 501, "The prompt has 501 characters; the limit is 500"),
        (1, "y" * 600, "The negative prompt has 600 characters"),
        (2, "someone/else", "Unknown model 'someone/else'"),
        (3, 51, "Steps must be between 1 and 50; got 51"),
        (4, 0.5, "Guidance scale must be between"),
        (5, -1, "Seed must be between 0"),
        (6, 2048, "Width must be between 32 and 1024"),
        (7, 40, "Height must be a multiple of 16; got 40"),
        (8, 5, "Number of images must be between 1 and 4"),
    ],
)
def test_out_of_bounds_inputs_are_readable_errors(app, pipelines, position, value, message):
    inputs = list(VALID)
    inputs[position] = value
    with pytest.raises(gr.Error, match=message):
        app.generate(pipelines, *inputs)


def test_without_a_model_the_app_says_what_to_do(app, tmp_path, monkeypatch):
    monkeypatch.setattr(app, "DEFAULT_MODEL_DIR", tmp_path / "demo-output" / "pipeline")
    monkeypatch.delenv(app.MODELS_ENV, raising=False)
    assert app.find_models([]) == {}
    assert "make demo" in app.no_model_message() and str(tmp_path) in app.no_model_message()

    demo = app.build_demo({})
    shown = [block.value for block in demo.blocks.values() if isinstance(block, gr.Markdown)]
    assert any(app.no_model_message() in text for text in shown)
    with pytest.raises(gr.Error, match="make demo"):
        app.generate({}, *VALID)


def test_dtype_follows_the_hardware(app, monkeypatch):
    assert app.inference_dtype("cpu") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert app.inference_dtype("cuda") == torch.float16  # a T4: float16, not emulated bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert app.inference_dtype("cuda") == torch.bfloat16


def test_generation_reports_the_pipelines_progress(app, model_dirs):
    """The click handler asks Gradio to follow tqdm, and the pipelines' progress bars are on to be followed."""
    demo = app.build_demo(model_dirs)
    (handler,) = [fn for fn in demo.fns.values() if fn.api_name == "generate"]
    progress = inspect.signature(handler.fn).parameters["progress"].default
    assert isinstance(progress, gr.Progress) and progress.track_tqdm
    pipelines = app.load_pipelines(model_dirs)
    assert all(not getattr(pipe, "_progress_bar_config", {}).get("disable") for pipe in pipelines.values())


def test_models_come_from_flags_then_environment(app, monkeypatch):
    monkeypatch.setenv(app.MODELS_ENV, "a/one:b/two")
    assert app.find_models([]) == {"a/one": "a/one", "b/two": "b/two"}
    assert app.find_models(["c/three"]) == {"c/three": "c/three"}


def test_client_gets_images_and_readable_errors(served, tmp_path):
    client = Client(served, verbose=False, download_files=str(tmp_path))
    assert list(client.view_api(return_format="dict")["named_endpoints"]) == ["/generate"]
    gallery = client.predict(*VALID, api_name="/generate")
    assert [Image.open(item["image"]).size for item in gallery] == [(32, 48)] * 2

    with pytest.raises(AppError, match="greater than maximum value 50"):
        client.predict(*VALID[:3], 500, *VALID[4:], api_name="/generate")
    with pytest.raises(AppError, match="the limit is 500"):
        client.predict("x" * 501, *VALID[1:], api_name="/generate")


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed (apt-get install chromium)")
def test_page_screenshot_with_headless_chromium(served, tmp_path):
    shot = tmp_path / "space.png"
    command = ["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,1000",
               "--virtual-time-budget=10000", f"--screenshot={shot}", served]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, timeout=60)
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 1000)
    # A rendered page, not a blank one: the orange Generate button is on it.
    assert any(r > 200 and 80 < g < 160 and b < 80 for _, (r, g, b) in image.getcolors(1 << 20))
