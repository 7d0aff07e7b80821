"""The Gradio Space: generation, input bounds and types as readable errors, the cost budget, the no-model message,
no server paths in pages or errors, gradio_client round trips against the app served on 127.0.0.1 (cancelled and
abandoned requests stop), and a screenshot of the page with headless Chromium."""

import importlib.util
import inspect
import shutil
import socket
import subprocess
import time

import gradio as gr
import httpx
import pytest
import torch
from gradio_client import Client
from gradio_client.exceptions import AppError
from helpers import PIPELINE_FAMILIES, REPO_ROOT, tiny_family_pipeline
from PIL import Image

from diffusers_microdit import LiTPipeline, MicroDiTTransformer2DModel

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
        env.setenv("GRADIO_HEARTBEAT_INTERVAL", "0.5")  # notice a client's session end within a second
        demo = app.build_demo(model_dirs)
        _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
        yield url
        demo.close()


@pytest.fixture(scope="module")
def client(served, tmp_path_factory):
    """A gradio_client session shared by the tests that only make requests."""
    client = Client(served, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))
    yield client
    client.close()


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
    assert "make demo" in app.no_model_message() and str(tmp_path) not in app.no_model_message()

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


def test_folders_are_named_not_shown_as_paths(app, tmp_path):
    for folder in ("x/model", "y/model"):
        (tmp_path / folder).mkdir(parents=True)
    specs = [str(tmp_path / "x" / "model"), str(tmp_path / "y" / "model"), "org/repo"]
    assert app.find_models(specs) == {"model": specs[0], "model (2)": specs[1], "org/repo": "org/repo"}


def test_client_gets_images_and_readable_errors(served, tmp_path):
    client = Client(served, verbose=False, download_files=str(tmp_path))
    assert list(client.view_api(return_format="dict")["named_endpoints"]) == ["/generate"]
    gallery = client.predict(*VALID, api_name="/generate")
    assert [Image.open(item["image"]).size for item in gallery] == [(32, 48)] * 2

    with pytest.raises(AppError, match="Steps must be between 1 and 50; got 500"):
        client.predict(*VALID[:3], 500, *VALID[4:], api_name="/generate")
    with pytest.raises(AppError, match="the limit is 500"):
        client.predict("x" * 501, *VALID[1:], api_name="/generate")


@pytest.mark.parametrize(
    "position, value, message",
    [
        (3, "abc", "Steps must be a whole number; got 'abc'"),
        (6, None, "Width must be a whole number; got None"),
        (5, 1.5, "Seed must be a whole number; got 1.5"),
        (0, 123, "The prompt must be text; got 123"),
        (4, "x", "Guidance scale must be a number; got 'x'"),
        (8, True, "Number of images must be a whole number; got True"),
        (2, 5, "Unknown model 5"),
    ],
)
def test_wrong_typed_api_inputs_name_the_field(client, position, value, message):
    inputs = list(VALID)
    inputs[position] = value
    with pytest.raises(AppError, match=message):
        client.predict(*inputs, api_name="/generate")


def test_integral_floats_count_as_whole_numbers(app, pipelines):
    images = app.generate(pipelines, "a red cat", None, "microdit", 1.0, 2, 3.0, 32.0, 32, 1)
    assert [image.size for image in images] == [(32, 32)]


def test_request_over_the_time_budget_is_refused(app, pipelines):
    """The issue's request: 1024x1024 at 1 step on a patch-2, VAE-factor-2 model is 65,536 tokens."""
    inputs = app.parse_inputs(pipelines, "a cat", "", "microdit", 1, 5.0, 0, 1024, 1024, 1)
    assert app.latent_tokens(pipelines["microdit"], 1024, 1024) == 65536
    predicted = app.predicted_seconds(pipelines["microdit"], inputs)
    assert predicted > app.DEFAULT_MAX_REQUEST_SECONDS
    message = rf"about {predicted:,.1f} s .*the limit is 60 s\. Lower the size \(1024x1024\), the steps \(1\)"
    with pytest.raises(gr.Error, match=message):
        app.generate(pipelines, "a cat", "", "microdit", 1, 5.0, 0, 1024, 1024, 1)
    with pytest.raises(gr.Error, match="the limit is 1e-06 s"):  # a budget follows the operator's setting
        app.generate(pipelines, *VALID, max_seconds=1e-6)


@pytest.mark.parametrize("family", PIPELINE_FAMILIES)
def test_predicted_cost_follows_the_work(app, pipelines, family):
    pipe = pipelines[family]
    cost = app.forward_cost(pipe)
    assert cost.seconds > 0 and 0 < cost.attention_share < 1 and app.forward_cost(pipe) is cost  # measured once

    def seconds(**changes):
        fields = dict(prompt="a", negative_prompt="", model=family, steps=4, guidance_scale=1.0, seed=0,
                      width=32, height=32, num_images=1) | changes  # fmt: skip
        return app.predicted_seconds(pipe, app.Inputs(**fields))

    evaluations = app.network_evaluations(pipe, 4)
    assert evaluations == (7 if family == "microdit" else 4)  # Heun: 2N - 1 forwards
    assert seconds(steps=8) / seconds() == pytest.approx(app.network_evaluations(pipe, 8) / evaluations)
    assert seconds(guidance_scale=5.0) == pytest.approx(2 * seconds())  # guidance doubles the batch
    assert seconds(num_images=3) == pytest.approx(3 * seconds())
    if family == "microdit":  # attention makes four times the tokens cost more than four times as much
        assert seconds(width=128, height=128) / seconds(width=64, height=64) > 4


def test_budget_comes_from_flag_then_environment(app, monkeypatch):
    monkeypatch.delenv(app.MAX_SECONDS_ENV, raising=False)
    assert app.request_budget() == app.DEFAULT_MAX_REQUEST_SECONDS
    monkeypatch.setenv(app.MAX_SECONDS_ENV, "12.5")
    assert app.request_budget() == 12.5 and app.request_budget(3.0) == 3.0
    with pytest.raises(ValueError, match="positive number of seconds"):
        app.request_budget(0.0)


@pytest.fixture
def slow_microdit(monkeypatch):
    """Counts MicroDiT transformer forwards and makes each take at least 50 ms, so a run lasts seconds."""
    forwards = []
    original = MicroDiTTransformer2DModel.forward

    def slow_forward(self, *args, **kwargs):
        forwards.append(time.monotonic())
        time.sleep(0.05)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MicroDiTTransformer2DModel, "forward", slow_forward)
    return forwards


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.parametrize("leave", ["cancel", "close"])
def test_abandoned_requests_stop_computing(served, slow_microdit, leave):
    """50 Heun steps are 99 forwards (~5 s here); cancelling the job, or closing the client's session, stops it."""
    client = Client(served, verbose=False)
    job = client.submit("a red circle", "", "microdit", 50, 1.0, 0, 32, 32, 1, api_name="/generate")
    wait_for(lambda: len(slow_microdit) >= 5)  # under way (counting the calibration forwards of a first use)
    if leave == "cancel":
        job.cancel()
    else:
        client.close()  # ends the session's heartbeat, as closing the page does
    wait_for(lambda: time.monotonic() - slow_microdit[-1] > 1.0)  # no forward for a second: it has stopped
    assert len(slow_microdit) < 30
    client.close()


def test_no_server_paths_in_the_config_or_errors(app, served, client, model_dirs, tmp_path, monkeypatch):
    config = httpx.get(f"{served}config").text
    assert '"microdit"' in config and all(path not in config for path in model_dirs.values())

    def fails(*args, **kwargs):
        raise ValueError(f"no file {model_dirs['lit']}/model_index.json")

    monkeypatch.setattr(LiTPipeline, "__call__", fails)
    with pytest.raises(AppError, match="no file <server path>") as refused:
        client.predict("a cat", "", "lit", 2, 5.0, 0, 32, 32, 1, api_name="/generate")
    assert model_dirs["lit"] not in str(refused.value)
    with pytest.raises(RuntimeError, match="Could not load the model 'missing'") as failed:
        app.load_pipelines({"missing": str(tmp_path / "missing")})
    assert str(tmp_path) not in str(failed.value)


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
