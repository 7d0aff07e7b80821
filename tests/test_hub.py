"""Publishing: model cards, the Hub-loadable folder layout, and push -> `DiffusionPipeline.from_pretrained(repo_id)`
in a fresh process against a local stand-in for the Hub HTTP API."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from fake_hub import hub_env
from helpers import PIPELINE_FAMILIES, REPO_ROOT, tiny_family_call_kwargs, tiny_family_pipeline
from huggingface_hub import ModelCard
from PIL import Image

from diffusers_microdit.hub import INSTALL_COMMAND, push_folder_to_hub, save_lora_with_card, save_pipeline_with_card

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


# Files a training output folder may hold that a push must leave out: secrets, pickles, training state at any depth,
# tracker logs, encoded-data caches.
JUNK = (
    ".env",
    ".huggingface/token",
    "sub/checkpoint-5/x.safetensors",
    "optimizer.bin",
    "logs/events",
    "cache/latents.safetensors",
    "transformer/.cache/config.json",
)


def with_junk(folder, copy_to):
    """Copy `folder` to `copy_to` and add the `JUNK` files; return (the copy, the files of `folder`)."""
    needed = {path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()}
    shutil.copytree(folder, copy_to)
    for name in JUNK:
        (copy_to / name).parent.mkdir(parents=True, exist_ok=True)
        (copy_to / name).write_text("not for the Hub")
    return copy_to, needed


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
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("no pipeline here")
    with pytest.raises(ValueError, match="neither a pipeline folder"):
        push_folder_to_hub(tmp_path / "other", "someone/never-created")


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
    # Folders already written with their card, pushed as they are, next to files that must stay local.
    junky = {f: with_junk(published[f][0], tmp_path / f) for f in PIPELINE_FAMILIES if f != "microdit"}
    push_script = [sys.executable, str(REPO_ROOT / "scripts" / "push_to_hub.py")]
    commands = [  # a plain pipeline folder through --card, and the folders above as they are
        [*push_script, str(plain), "--repo_id", "someone/tiny-microdit", "--card", "--cost", "USD=0",
         "--sample_prompt", "a red circle", "--num_inference_steps", "2"],
        *([*push_script, str(folder), "--repo_id", f"someone/tiny-{family}"]
          for family, (folder, _) in junky.items()),
    ]  # fmt: skip
    env = hub_env(fake_hub, tmp_path)
    pushes = [
        subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for command in commands
    ]
    outputs = [push.communicate(timeout=120)[0] for push in pushes]
    for push, output in zip(pushes, outputs):
        assert push.returncode == 0, output
    for output in outputs[1:]:
        assert f"Not uploading {len(JUNK)} file(s)" in output, output
    for family, (_, needed) in junky.items():  # every file the pipeline needs, nothing else
        assert set(fake_hub.repos[f"someone/tiny-{family}"]["files"]) == needed
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
    folder, needed = with_junk(folder, tmp_path / "lora-with-junk")
    push = [sys.executable, str(REPO_ROOT / "scripts" / "push_to_hub.py"), str(folder), "--repo_id", "someone/tiny-lora"]
    result = subprocess.run(push, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    assert needed == {"pytorch_lora_weights.safetensors", "README.md", "samples/sample_0.png"}
    assert set(fake_hub.repos["someone/tiny-lora"]["files"]) == needed
    out = tmp_path / "lora.npy"
    load = [sys.executable, "-c", LORA_LOAD_SCRIPT, str(tmp_path / "base"), "someone/tiny-lora", str(out)]
    result = subprocess.run(load, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    np.testing.assert_allclose(np.load(out), images, atol=1e-5, rtol=0)


def test_cards_hold_no_local_paths(tmp_path):
    from peft import LoraConfig

    local = tmp_path / "runs" / "base-pipeline"
    local.mkdir(parents=True)
    card_inputs = dict(
        base_model=str(local),
        training_data=f"precomputed caches: {tmp_path}/cache/part-0, {tmp_path}/cache/part-1 (https://x.org/a/b).",
        description=f"Finetuned from `{local}` on image / text pairs.",
        cost={"outputs": f"{tmp_path}/runs"},
    )
    pipe = tiny_family_pipeline("microdit")
    written = [save_pipeline_with_card(pipe, tmp_path / "pipeline", **card_inputs)]
    pipe.transformer.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_v"]))
    written.append(save_lora_with_card(pipe, tmp_path / "lora", **card_inputs))
    for folder in written:
        text = (folder / "README.md").read_text()
        assert str(tmp_path) not in text and "/runs" not in text
        card = ModelCard.load(folder / "README.md")
        assert card.data.base_model is None  # metadata takes Hub ids only
        for reduced in ("Base model: base-pipeline.", "caches: part-0, part-1", "`base-pipeline` on image / text"):
            assert reduced in card.text, reduced
        assert "https://x.org/a/b" in card.text  # URLs are no local paths
    assert 'from_pretrained("path/to/the/base/pipeline")' in (tmp_path / "lora" / "README.md").read_text()
