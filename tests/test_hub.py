"""Publishing: model cards, the Hub-loadable folder layout, and push -> `DiffusionPipeline.from_pretrained(repo_id)`
in a fresh process against a local stand-in for the Hub HTTP API."""

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest
import torch
from helpers import PIPELINE_FAMILIES, REPO_ROOT, tiny_family_call_kwargs, tiny_family_pipeline
from huggingface_hub import ModelCard
from PIL import Image

from diffusers_microdit.hub import INSTALL_COMMAND, push_folder_to_hub, save_pipeline_with_card

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one intra-op thread
LICENCES = {
    "microdit": ("apache-2.0", "Apache-2.0"),
    "pixart_kv": ("openrail++", "Open RAIL++-M"),
    "lit": ("openrail++", "Open RAIL++-M"),
}
LOAD_SCRIPT = """
import json, sys
import numpy as np, torch
import diffusers_microdit
from diffusers import DiffusionPipeline

for repo_id, kwargs, out in json.loads(sys.argv[1]):
    pipe = DiffusionPipeline.from_pretrained(repo_id)
    pipe.set_progress_bar_config(disable=True)
    np.save(out, pipe(generator=torch.manual_seed(0), **kwargs).images)
    print(repo_id, type(pipe).__name__, type(pipe.transformer).__name__)
"""


class FakeHubHandler(BaseHTTPRequestHandler):
    """Just enough of the Hub HTTP API for `create_repo` + `upload_folder` and diffusers' `download()`: repos are
    dicts of file contents in `server.repos`, every file is a regular (non-LFS) upload, one branch per repo."""

    def log_message(self, *args):
        pass

    def send_body(self, body: bytes, status=200, content_type="application/json", headers=None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_json(self, payload, status=200):
        self.send_body(json.dumps(payload).encode(), status)

    def not_found(self):
        self.send_body(b'{"error": "not found"}', 404, headers={"X-Error-Code": "EntryNotFound"})

    def repo(self, repo_id):
        return self.server.repos.get(repo_id)

    def do_POST(self):
        path = unquote(urlsplit(self.path).path)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if path == "/api/repos/create":
            request = json.loads(body)
            repo_id = f"{request['organization']}/{request['name']}"
            self.server.repos.setdefault(repo_id, {"sha": "0" * 40, "files": {}})
            return self.send_json({"url": f"{self.server.url}/{repo_id}", "name": repo_id, "id": repo_id})
        if path == "/api/validate-yaml":
            return self.send_json({"errors": [], "warnings": []})
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit)/[^/]+", path)
        if not match or self.repo(match[1]) is None:
            return self.not_found()
        repo = self.repo(match[1])
        if match[2] == "preupload":
            files = json.loads(body)["files"]
            return self.send_json(
                {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
            )
        for line in body.splitlines():
            item = json.loads(line)
            if item["key"] == "file":
                repo["files"][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
        repo["sha"] = hashlib.sha1(repr(sorted(repo["files"].items())).encode()).hexdigest()
        commit_url = f"{self.server.url}/{match[1]}/commit/{repo['sha']}"
        self.send_json({"commitUrl": commit_url, "commitOid": repo["sha"], "pullRequestUrl": None})

    def do_GET(self):
        path = unquote(urlsplit(self.path).path)
        info = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/[^/]+)?", path)
        tree = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/[^/]+", path)
        resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/[^/]+/(.+)", path)
        match = info or tree or resolve
        repo = self.repo(match[1]) if match else None
        if repo is None:
            return self.not_found()
        if info:
            siblings = [{"rfilename": name} for name in sorted(repo["files"])]
            return self.send_json({"id": match[1], "sha": repo["sha"], "siblings": siblings, "private": False})
        if tree:
            return self.send_json(
                [
                    {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                    for name, data in sorted(repo["files"].items())
                ]
            )
        data = repo["files"].get(resolve[2])
        if data is None:
            return self.not_found()
        etag = f'"{hashlib.sha1(data).hexdigest()}"'
        headers = {"X-Repo-Commit": repo["sha"], "ETag": etag}
        self.send_body(data, content_type="application/octet-stream", headers=headers)

    do_HEAD = do_GET


@pytest.fixture(scope="module")
def fake_hub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHubHandler)
    server.url = f"http://127.0.0.1:{server.server_port}"
    server.repos = {}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


def hub_env(fake_hub, tmp_path) -> dict:
    """Environment of a fresh process that talks to the fake Hub with an empty cache."""
    return {
        **os.environ,
        "HF_ENDPOINT": fake_hub.url,
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_TOKEN": "hf_fake",
        "OMP_NUM_THREADS": "1",  # tiny models: extra intra-op threads only contend for the 2 cores
    }


def sample_image(seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """family -> (folder written by save_pipeline_with_card, images of the in-memory pipeline)."""
    folders = {}
    for family in PIPELINE_FAMILIES:
        pipe = tiny_family_pipeline(family)
        images = pipe(generator=torch.manual_seed(0), **tiny_family_call_kwargs(family)).images
        folder = save_pipeline_with_card(
            pipe,
            tmp_path_factory.mktemp(family) / "published",
            repo_id=f"someone/tiny-{family}",
            base_model="someone/base-model",
            training_data="Embedded shapes dataset, 1k synthetic images.",
            cost={"hardware": "1x CPU", "GPU hours": 0.0, "USD": 0},
            sample_images=[sample_image(0), sample_image(1)],
            sample_prompts=["a red circle", "a blue square"],
        )
        folders[family] = (folder, images)
    return folders


@pytest.mark.parametrize("family", PIPELINE_FAMILIES)
def test_card_states_licences_data_cost_and_samples(published, family):
    folder, _ = published[family]
    card = ModelCard.load(folder / "README.md")
    hub_licence, licence_name = LICENCES[family]
    assert card.data.license == hub_licence
    assert card.data.base_model == "someone/base-model"
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "text-to-image"
    assert {"diffusers", "diffusers-microdit", "text-to-image"} <= set(card.data.tags)
    assert card.data.widget[1] == {"text": "a blue square", "output": {"url": "samples/sample_1.png"}}
    expected = (
        licence_name,
        "Embedded shapes dataset",
        "| GPU hours | 0.0 |",
        "![a red circle](samples/sample_0.png)",
        'DiffusionPipeline.from_pretrained("someone/tiny-',
    )
    for text in expected:
        assert text in card.text, text
    assert Image.open(folder / "samples" / "sample_1.png").size == (16, 16)
    assert not list(folder.rglob("*.bin")), "weights must be safetensors"


@pytest.mark.parametrize("family", PIPELINE_FAMILIES)
def test_card_code_starts_with_the_import_and_gives_the_install_that_works(published, family):
    card = ModelCard.load(published[family][0] / "README.md")
    first_code_line = card.text.split("```python\n", 1)[1].splitlines()[0]
    assert first_code_line.startswith("import diffusers_microdit  #")
    assert INSTALL_COMMAND in card.text and "git+https://" in INSTALL_COMMAND
    assert "pip install diffusers-microdit\n" not in card.text  # not on PyPI
    assert card.data.inference is False  # the Hub's hosted inference cannot run these classes
    assert "torch_dtype" not in card.text


REMOTE_CODE_LOAD = """
import sys
from diffusers import DiffusionPipeline  # no `import diffusers_microdit`

try:
    DiffusionPipeline.from_pretrained(sys.argv[1])
except ValueError as error:
    print("refused:", error)
pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
print(type(pipe).__name__, type(pipe.transformer).__name__)
"""


def test_remote_code_option_loads_without_the_import(tmp_path):
    folder = save_pipeline_with_card(tiny_family_pipeline("microdit"), tmp_path / "rc", remote_code=True)
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == ["pipeline", "MicroDiTPipeline"]
    assert "trust_remote_code=True" in (folder / "README.md").read_text()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_CODE_LOAD, str(folder)], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "refused:" in result.stdout and "trust_remote_code=True" in result.stdout
    assert "MicroDiTPipeline MicroDiTTransformer2DModel" in result.stdout


@pytest.mark.parametrize("family", PIPELINE_FAMILIES)
def test_package_components_are_recorded_under_diffusers(published, family):
    index = json.loads((published[family][0] / "model_index.json").read_text())
    libraries = {name: entry[0] for name, entry in index.items() if isinstance(entry, list)}
    assert libraries["transformer"] == "diffusers"
    assert not [lib for lib in libraries.values() if lib.startswith("diffusers_microdit")]


def test_push_refuses_what_the_hub_could_not_load(tmp_path):
    plain = tmp_path / "plain"
    tiny_family_pipeline("microdit").save_pretrained(plain)
    with pytest.raises(ValueError, match="save_pipeline_with_card"):
        push_folder_to_hub(plain, "someone/never-created")
    with pytest.raises(FileNotFoundError, match="Nothing to upload"):
        push_folder_to_hub(tmp_path / "missing", "someone/never-created")


def test_unknown_pipeline_needs_an_explicit_licence(tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(
        sample_size=8,
        block_out_channels=(8, 8),
        norm_num_groups=4,
        layers_per_block=1,
        down_block_types=("DownBlock2D",) * 2,
        up_block_types=("UpBlock2D",) * 2,
    )
    with pytest.raises(ValueError, match="pass `license=`"):
        save_pipeline_with_card(DDPMPipeline(unet, DDPMScheduler()), tmp_path)


def test_pushed_repos_load_with_diffusion_pipeline_in_a_fresh_process(published, fake_hub, tmp_path):
    plain = tmp_path / "plain"
    tiny_family_pipeline("microdit").save_pretrained(plain)
    push_script = [sys.executable, str(REPO_ROOT / "scripts" / "push_to_hub.py")]
    commands = [  # a plain pipeline folder through --card, and a folder already written with its card as it is
        [*push_script, str(plain), "--repo_id", "someone/tiny-microdit", "--card", "--cost", "USD=0",
         "--sample_prompt", "a red circle", "--num_inference_steps", "2"],
        *([*push_script, str(published[family][0]), "--repo_id", f"someone/tiny-{family}"]
          for family in PIPELINE_FAMILIES if family != "microdit"),
    ]  # fmt: skip
    env = hub_env(fake_hub, tmp_path)
    pushes = [
        subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for command in commands
    ]
    for push in pushes:
        output = push.communicate(timeout=120)[0]
        assert push.returncode == 0, output
    for family in PIPELINE_FAMILIES:
        stored = fake_hub.repos[f"someone/tiny-{family}"]["files"]
        assert {"README.md", "model_index.json", "samples/sample_0.png"} <= set(stored)
        assert any(name.startswith("transformer/") and name.endswith(".safetensors") for name in stored)
    assert b"| USD | 0 |" in fake_hub.repos["someone/tiny-microdit"]["files"]["README.md"]

    jobs = [(f"someone/tiny-{f}", tiny_family_call_kwargs(f), str(tmp_path / f"{f}.npy")) for f in PIPELINE_FAMILIES]
    result = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, json.dumps(jobs)], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "someone/tiny-microdit MicroDiTPipeline MicroDiTTransformer2DModel" in result.stdout
    assert "someone/tiny-pixart_kv PixArtSigmaKVPipeline PixArtSigmaKVTransformer2DModel" in result.stdout
    for family in PIPELINE_FAMILIES:
        np.testing.assert_allclose(np.load(tmp_path / f"{family}.npy"), published[family][1], atol=1e-5, rtol=0)


LORA_LOAD_SCRIPT = """
import sys
import numpy as np, torch
import diffusers_microdit
from diffusers import DiffusionPipeline

base, repo_id, out = sys.argv[1:]
pipe = DiffusionPipeline.from_pretrained(base)
pipe.set_progress_bar_config(disable=True)
pipe.load_lora_weights(repo_id)
np.save(out, pipe(generator=torch.manual_seed(0), prompt="a red circle", num_inference_steps=2, output_type="np").images)
"""


def test_lora_folder_publishes_and_loads_by_repo_id(fake_hub, tmp_path):
    from peft import LoraConfig

    from diffusers_microdit.hub import save_lora_with_card

    pipe = tiny_family_pipeline("microdit")
    pipe.save_pretrained(tmp_path / "base")
    pipe.transformer.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_v"], init_lora_weights=False))
    images = pipe(generator=torch.manual_seed(0), prompt="a red circle", num_inference_steps=2, output_type="np").images
    folder = save_lora_with_card(
        pipe, tmp_path / "lora", repo_id="someone/tiny-lora", base_model="someone/tiny-microdit",
        training_data="Three origami photos.", sample_images=[sample_image(0)], sample_prompts=["an origami crane"],
    )
    card = ModelCard.load(folder / "README.md")
    assert card.data.license == "apache-2.0" and "lora" in card.data.tags
    assert "Rank 2, alpha 4" in card.text and 'pipe.load_lora_weights("someone/tiny-lora")' in card.text

    env = hub_env(fake_hub, tmp_path)
    push = [sys.executable, str(REPO_ROOT / "scripts" / "push_to_hub.py"), str(folder), "--repo_id", "someone/tiny-lora"]
    result = subprocess.run(push, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "pytorch_lora_weights.safetensors" in fake_hub.repos["someone/tiny-lora"]["files"]
    out = tmp_path / "lora.npy"
    load = [sys.executable, "-c", LORA_LOAD_SCRIPT, str(tmp_path / "base"), "someone/tiny-lora", str(out)]
    result = subprocess.run(load, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    np.testing.assert_allclose(np.load(out), images, atol=1e-5, rtol=0)
