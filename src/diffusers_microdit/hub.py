"""Publishing to the Hugging Face Hub: a complete pipeline folder with a model card, and a folder upload.

A published repo loads with `DiffusionPipeline.from_pretrained(repo_id)` once `diffusers_microdit` is imported, with
no remote code. diffusers 0.42 downloads a Hub repo only if every component library in `model_index.json` is one
it knows (`diffusers`, `transformers`, ...) or a `<component>/<library>.py` file in the repo; plain
`save_pretrained` records the package's components under their module path (e.g.
`diffusers_microdit.models.transformer_microdit`), which that check rejects. [`save_pipeline_with_card`] therefore
records them under `diffusers`, the namespace where `import diffusers_microdit` registers them; local loading is
unchanged.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
from pathlib import Path

import diffusers
from diffusers import DiffusionPipeline, PixArtSigmaPipeline
from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE
from diffusers.pipelines.pipeline_loading_utils import LOADABLE_CLASSES
from diffusers.utils.hub_utils import populate_model_card
from huggingface_hub import ModelCard, ModelCardData, constants, create_repo, get_token, upload_folder
from huggingface_hub.utils import HFValidationError, filter_repo_objects, validate_repo_id
from PIL import Image

from .integrity import local_folder_problems
from .pipelines.pipeline_microdit import MicroDiTPipeline

logger = logging.getLogger(__name__)

PACKAGE = __name__.split(".")[0]
_PROJECT_URL = "https://github.com/diffusers-microdit/diffusers-microdit"
# The package is not on PyPI: the one install command that works, for cards and error messages.
INSTALL_COMMAND = f'pip install "diffusers-microdit @ git+{_PROJECT_URL}"'
# `remote_code=True`: the module diffusers runs (with `trust_remote_code=True`) to find the pipeline class.
REMOTE_CODE_MODULE = "pipeline"
_IMPORT_LINE = (
    "import diffusers_microdit  # first: it registers the package's classes with diffusers (without it, loading "
    'fails with "module diffusers has no attribute ...")'
)
SAMPLES_DIR = "samples"
# What a component folder's `save_pretrained` writes (configs, safetensors weights and their index, tokenizer
# vocabularies, merges, sentencepiece models and chat templates); pickled `.bin`/`.pt` weights are not among them.
_COMPONENT_SUFFIXES = (".json", ".safetensors", ".txt", ".model", ".jinja")
_SAMPLE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif")
# Never uploaded, at any depth (`*` crosses `/` in upload_folder's patterns): dotfiles and dot-folders (`.env`,
# `.huggingface/token`, ...), accelerate checkpoints (optimizer states, several times the model size), tracker logs and
# (train_lora.py) the encoded training data.
NEVER_UPLOADED = (".*", "*/.*", "checkpoint-*", "*/checkpoint-*", "logs/*", "*/logs/*", "cache/*", "*/cache/*")
_LISTED_LEFT_OUT = 5  # names shown in the log of what was left out
# Card text: a token with a path separator may be a local path (quotes, brackets, commas and semicolons end a token);
# it is one if it starts as an absolute path does, or exists.
_PATH_TOKEN = re.compile(r"[^\s'\"`()\[\]<>,;]*[/\\][^\s'\"`()\[\]<>,;]*")
_ABSOLUTE_PATH = re.compile(r"(?:[/\\~]|file:|[A-Za-z]:[/\\])")

# (pipeline base class, Hub licence id, statement) for the weights each family starts from.
_FAMILY_LICENCES = (
    (
        MicroDiTPipeline,
        "apache-2.0",
        "The official MicroDiT checkpoints (SonyResearch/micro_diffusion) are released under the Apache-2.0 licence.",
    ),
    (
        PixArtSigmaPipeline,
        "openrail++",
        "PixArt-Σ weights are released under the CreativeML Open RAIL++-M licence, whose use-based restrictions "
        "carry over to weights derived from them.",
    ),
)


def save_pipeline_with_card(
    pipeline: DiffusionPipeline,
    output_dir: str | os.PathLike,
    *,
    repo_id: str | None = None,
    base_model: str | None = None,
    license: str | None = None,
    training_data: str | None = None,
    cost: dict[str, object] | None = None,
    sample_images: list[Image.Image] | None = None,
    sample_prompts: list[str] | None = None,
    description: str | None = None,
    tags: list[str] | None = None,
    remote_code: bool = False,
) -> Path:
    """Write a complete, Hub-loadable pipeline folder: safetensors weights, configs, samples and `README.md`.

    Args:
        pipeline: any pipeline of this package (or another diffusers pipeline whose classes diffusers can resolve).
        output_dir: the folder to write (created; existing files with the same names are overwritten).
        repo_id: the Hub repo the folder is meant for, used in the card's usage snippet.
        base_model: Hub id of the checkpoint this one was finetuned from (card metadata `base_model`).
        license: Hub licence id of these weights. Default: the licence of the family's weights (`apache-2.0` for
            MicroDiT, `openrail++` for PixArt-Σ derivatives); required for other pipelines.
        training_data: a sentence or two on the data (name, size, licence).
        cost: training cost figures shown as a table, e.g. `{"GPU": "8x H100", "GPU hours": 21.5, "USD": 54}`.
        sample_images: saved as `samples/sample_<i>.png` and shown in the card.
        sample_prompts: one prompt per sample image: captions, and the Hub widget's gallery.
        description: the card's opening paragraph.
        tags: extra Hub tags.
        remote_code: also write `pipeline.py`, a two-line module that imports the installed package, and name it in
            `model_index.json`, so `DiffusionPipeline.from_pretrained(repo, trust_remote_code=True)` works without
            `import diffusers_microdit` (and says what to install when the package is missing). The trade-off:
            loading then runs code from the repo, which users must trust: diffusers refuses the folder without
            `trust_remote_code=True`, even where the package is imported; and the package must still be installed.
            Off by default.

    Returns:
        `output_dir` as a `Path`.
    """
    output_dir = Path(output_dir)
    sample_images = sample_images or []
    license, licence_statement = _check_card_inputs(pipeline, license, sample_images, sample_prompts)
    pipeline.save_pretrained(output_dir, safe_serialization=True)
    _record_package_components_under_diffusers(output_dir / "model_index.json")
    if remote_code:
        _write_remote_code_module(output_dir, type(pipeline).__name__)
    load_kwargs = ", trust_remote_code=True" if remote_code else ""
    components = "\n".join(
        f"| `{name}` | `{type(component).__name__}` |"
        for name, component in pipeline.components.items()
        if component is not None
    )
    _write_card(
        output_dir,
        title=repo_id.split("/")[-1] if repo_id else type(pipeline).__name__,
        description=description
        or f"A text-to-image `{type(pipeline).__name__}` from [diffusers-microdit]({_PROJECT_URL}).",
        usage=f"{_IMPORT_LINE}\nfrom diffusers import DiffusionPipeline\n\n"
        f'pipe = DiffusionPipeline.from_pretrained("{repo_id or "path/to/this/folder"}"{load_kwargs})\n'
        'image = pipe("Image of an astronaut riding a horse in Origami style").images[0]',
        details=f"## Components\n\n| component | class |\n| --- | --- |\n{components}",
        license=license,
        licence_statement=licence_statement,
        base_model=base_model,
        training_data=training_data,
        cost=cost,
        sample_images=sample_images,
        sample_prompts=sample_prompts,
        tags=tags,
    )
    return output_dir


def save_lora_with_card(
    pipeline: DiffusionPipeline,
    output_dir: str | os.PathLike,
    *,
    repo_id: str | None = None,
    base_model: str | None = None,
    license: str | None = None,
    training_data: str | None = None,
    cost: dict[str, object] | None = None,
    sample_images: list[Image.Image] | None = None,
    sample_prompts: list[str] | None = None,
    description: str | None = None,
    tags: list[str] | None = None,
) -> Path:
    """Write the transformer's active peft LoRA adapter as `pytorch_lora_weights.safetensors` (diffusers' LoRA
    format, loadable with `pipe.load_lora_weights`) with samples and a model card; arguments as for
    [`save_pipeline_with_card`], `base_model` being the pipeline the adapter goes on."""
    from peft.utils import get_peft_model_state_dict

    output_dir = Path(output_dir)
    sample_images = sample_images or []
    license, licence_statement = _check_card_inputs(pipeline, license, sample_images, sample_prompts)
    transformer = pipeline.transformer
    adapter = transformer.active_adapters()[0]
    config = transformer.peft_config[adapter]
    type(pipeline).save_lora_weights(
        output_dir,
        transformer_lora_layers=get_peft_model_state_dict(transformer, adapter_name=adapter),
        transformer_lora_adapter_metadata=config.to_dict(),  # keeps lora_alpha and the target modules
    )
    pipeline_class = type(pipeline).__name__
    targets = ", ".join(f"`{name}`" for name in sorted(config.target_modules))
    _write_card(
        output_dir,
        title=repo_id.split("/")[-1] if repo_id else f"{pipeline_class} LoRA",
        description=description or f"A peft LoRA for `{pipeline_class}` from [diffusers-microdit]({_PROJECT_URL}).",
        usage=f"{_IMPORT_LINE}\nfrom diffusers_microdit import {pipeline_class}\n\n"
        f'pipe = {pipeline_class}.from_pretrained("{_hub_id(base_model) or "path/to/the/base/pipeline"}")\n'
        f'pipe.load_lora_weights("{repo_id or "path/to/this/folder"}")\n'
        'image = pipe("Image of an astronaut riding a horse in Origami style").images[0]',
        details=f"## LoRA\n\nRank {config.r}, alpha {config.lora_alpha}, on the transformer's {targets} layers.",
        license=license,
        licence_statement=licence_statement,
        base_model=base_model,
        training_data=training_data,
        cost=cost,
        sample_images=sample_images,
        sample_prompts=sample_prompts,
        tags=["lora", *(tags or [])],
    )
    return output_dir


def create_hub_repo(repo_id: str, *, token: str | None = None, private: bool = False) -> str:
    """Create `repo_id` if needed and return its full id, or raise `RuntimeError` saying what to fix (offline mode,
    no token, a refused id). Training runs call it before their first step, as the diffusers examples do, so a push
    that cannot happen fails in seconds instead of after the whole run."""
    if constants.HF_HUB_OFFLINE:
        raise RuntimeError("Pushing to the Hub needs a connection, but HF_HUB_OFFLINE is set: unset it or drop the push.")
    if token is None and get_token() is None:
        raise RuntimeError("No Hugging Face token: log in with `hf auth login` or set HF_TOKEN, or drop the push.")
    try:
        return create_repo(repo_id, token=token, private=private, exist_ok=True).repo_id
    except (HFValidationError, OSError) as error:  # HTTP and connection errors are OSErrors
        raise RuntimeError(f"Cannot create the Hub repo {repo_id!r} ({error}); check the id and the token's rights.") from None


def push_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    commit_message: str = "Upload with diffusers-microdit",
) -> str:
    """Create `repo_id` if needed and upload what `folder` needs on the Hub in one commit; return the repo id.

    `folder` is a pipeline folder written by [`save_pipeline_with_card`] (with `model_index.json`) or a LoRA folder
    (with `pytorch_lora_weights.safetensors`). Only an allow-list is uploaded (see [`files_to_upload`]); what is left
    out is logged. A pipeline folder that `DiffusionPipeline.from_pretrained(repo_id)` could not download is refused
    before anything is uploaded. The endpoint and offline mode follow `HF_ENDPOINT` / `HF_HUB_OFFLINE`; `token`
    defaults to the logged-in token.
    """
    folder = Path(folder)
    if not folder.is_dir() or not any(folder.iterdir()):
        raise FileNotFoundError(f"Nothing to upload: {folder} is not a non-empty folder.")
    problems = local_folder_problems(folder)
    if problems:
        raise ValueError(f"Not uploading {folder}, it has damaged or missing files:\n  " + "\n  ".join(problems))
    if (folder / "model_index.json").is_file():
        _check_hub_loadable(folder / "model_index.json")
    files = files_to_upload(folder)
    _log_left_out(folder, files)
    repo_id = create_hub_repo(repo_id, token=token, private=private)
    upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        commit_message=commit_message,
        token=token,
        # Escaped: the names are exact paths, not patterns.
        allow_patterns=[glob.escape(file) for file in files],
        ignore_patterns=list(NEVER_UPLOADED),
    )
    return repo_id


def files_to_upload(folder: str | os.PathLike) -> list[str]:
    """The files of a pipeline or LoRA folder that the Hub repo needs, as sorted paths relative to `folder`.

    A pipeline folder: `model_index.json`, `README.md`, the config, weight and tokenizer files of each component
    subfolder named in `model_index.json`, the code modules `model_index.json` names (`pipeline.py` of
    `remote_code=True`), and the `samples/` images. A LoRA folder: `pytorch_lora_weights.safetensors`, `README.md` and
    the `samples/` images. Never a [`NEVER_UPLOADED`] path. Raises `ValueError` for any other folder.
    """
    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        files = _pipeline_files(folder)
    elif (folder / LORA_WEIGHT_NAME_SAFE).is_file():
        files = [LORA_WEIGHT_NAME_SAFE]
    else:
        raise ValueError(
            f"{folder} is neither a pipeline folder (model_index.json) nor a LoRA folder ({LORA_WEIGHT_NAME_SAFE}): "
            "write it with `save_pipeline_with_card` or `save_lora_with_card`."
        )
    if (folder / "README.md").is_file():
        files.append("README.md")
    files += _direct_files(folder, SAMPLES_DIR, _SAMPLE_SUFFIXES)
    return sorted(filter_repo_objects(set(files), ignore_patterns=list(NEVER_UPLOADED)))


def _pipeline_files(folder: Path) -> list[str]:
    """`model_index.json`, the files of the components it names and the code modules it names, where present."""
    index = json.loads((folder / "model_index.json").read_text())
    files = ["model_index.json"]
    for name, entry in index.items():
        if not (isinstance(entry, list) and entry[0]):
            continue  # a config value, or a component the pipeline was saved without
        if name != "_class_name":
            files += _direct_files(folder, name, _COMPONENT_SUFFIXES)
        # A library may be a module shipped in the folder (custom code): `pipeline.py` of `remote_code=True` for
        # `_class_name`, `<component>/<library>.py` for a component.
        module = f"{entry[0]}.py" if name == "_class_name" else f"{name}/{entry[0]}.py"
        if (folder / module).is_file():
            files.append(module)
    return files


def _direct_files(folder: Path, subfolder: str, suffixes: tuple[str, ...]) -> list[str]:
    """`subfolder/<name>` of the files directly in `folder/subfolder` with one of `suffixes` (save_pretrained writes a
    component flat into its subfolder, so deeper files are never needed)."""
    directory = folder / subfolder
    if not directory.is_dir():
        return []
    return [
        f"{subfolder}/{path.name}"
        for path in directory.iterdir()
        if path.is_file() and path.suffix.lower() in suffixes
    ]


def _log_left_out(folder: Path, files: list[str]) -> None:
    """Log how many files of `folder` will not be uploaded, naming a few, so a missing file is noticed."""
    present = {path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()}
    left_out = sorted(present - set(files))
    if left_out:
        more = f" and {len(left_out) - _LISTED_LEFT_OUT} more" if len(left_out) > _LISTED_LEFT_OUT else ""
        logger.warning(
            "Not uploading %d file(s) of %s that the Hub repo does not need: %s%s.",
            len(left_out),
            folder,
            ", ".join(left_out[:_LISTED_LEFT_OUT]),
            more,
        )


def _check_card_inputs(
    pipeline: DiffusionPipeline, license: str | None, sample_images: list, sample_prompts: list[str] | None
) -> tuple[str, str]:
    """(Hub licence id, statement on the family's weights): `license`, or the licence of the weights the pipeline's
    family starts from. Refuses an unknown licence and prompts that do not match the samples."""
    if sample_prompts is not None and len(sample_prompts) != len(sample_images):
        raise ValueError(f"Got {len(sample_prompts)} sample prompts for {len(sample_images)} sample images.")
    for family, family_license, statement in _FAMILY_LICENCES:
        if isinstance(pipeline, family):
            return license or family_license, statement
    if license is None:
        raise ValueError(
            f"No default licence is known for {type(pipeline).__name__}; pass `license=` (a Hub licence id such as "
            "'apache-2.0')."
        )
    return license, ""


def _record_package_components_under_diffusers(model_index: Path) -> None:
    """Rewrite `model_index.json` so the package's components are looked up in the `diffusers` namespace."""
    index = json.loads(model_index.read_text())
    for name, entry in index.items():
        if not (isinstance(entry, list) and entry[0] and entry[0].split(".")[0] == PACKAGE):
            continue
        library, class_name = entry
        registered = getattr(diffusers, class_name, None)
        if registered is None or registered.__module__ != library:
            raise ValueError(
                f"{class_name} ({library}) is not registered with diffusers, so a Hub repo could not load it: add it "
                f"to `_DIFFUSERS_VISIBLE` in {PACKAGE}/__init__.py."
            )
        index[name] = ["diffusers", class_name]
    model_index.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _write_remote_code_module(output_dir: Path, pipeline_class: str) -> None:
    """`pipeline.py` + `_class_name: ["pipeline", <class>]`: diffusers' custom-pipeline lookup runs the module,
    whose import registers the package; the class it names is the package's own."""
    (output_dir / f"{REMOTE_CODE_MODULE}.py").write_text(
        '"""Loaded by `DiffusionPipeline.from_pretrained(..., trust_remote_code=True)`: imports the installed '
        'diffusers-microdit,\nwhich registers its classes with diffusers."""\n\n'
        "try:\n    import diffusers_microdit\nexcept ImportError as error:\n"
        f"    raise ImportError('This pipeline needs the diffusers-microdit package: {INSTALL_COMMAND}') from error\n\n"
        f"{pipeline_class} = diffusers_microdit.{pipeline_class}\n"
    )
    model_index = output_dir / "model_index.json"
    index = json.loads(model_index.read_text())
    index["_class_name"] = [REMOTE_CODE_MODULE, pipeline_class]
    model_index.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _check_hub_loadable(model_index: Path) -> None:
    """Refuse a pipeline folder whose components diffusers' Hub download would reject (see the module docstring)."""
    index = json.loads(model_index.read_text())
    rejected = [
        f"{name}: {entry[0]}"
        for name, entry in index.items()
        if isinstance(entry, list)
        and entry[0]
        and entry[0] not in LOADABLE_CLASSES
        and not hasattr(diffusers.pipelines, entry[0])
        and not (model_index.parent / name / f"{entry[0]}.py").is_file()
    ]
    if rejected:
        raise ValueError(
            f"`DiffusionPipeline.from_pretrained` could not download this folder from the Hub: the component "
            f"libraries {rejected} in {model_index} are unknown to diffusers. Write the folder with "
            "`diffusers_microdit.hub.save_pipeline_with_card` (or `scripts/push_to_hub.py --card`) instead."
        )


def _without_local_paths(text: str) -> str:
    """`text` with each local path in it (absolute, or existing relative to the working directory) reduced to its
    base name: a card is public, and the layout of the machine that wrote it is nobody's business (and useless to
    readers). URLs and Hub ids are kept."""
    return _PATH_TOKEN.sub(lambda match: _public_name(match[0]), text)


def _public_name(token: str) -> str:
    """The base name of `token` if it is a local path (a trailing `.` or `:` is punctuation), else `token`."""
    path = token.rstrip(".:")
    # A lone `/` is prose ("image / text pairs"), not a path.
    if not path.strip("/\\") or not (_ABSOLUTE_PATH.match(path) or _exists(path)):
        return token
    name = re.split(r"[/\\]", path.rstrip("/\\"))[-1]
    # `~/`, `C:\` or `file:///` have no base name worth showing.
    return (name if name and not name.endswith(("~", ":")) else "a local folder") + token[len(path) :]


def _exists(path: str) -> bool:
    """Whether `path` names an existing file or folder (an over-long or malformed name does not)."""
    try:
        return Path(path).expanduser().exists()
    except (OSError, ValueError):
        return False


def _hub_id(base_model: str | None) -> str | None:
    """`base_model` if it can be a Hub repo id and is no local path, else None: card metadata takes Hub ids only."""
    if base_model is None or _exists(base_model):
        return None
    try:
        validate_repo_id(base_model)
    except HFValidationError:
        return None
    return base_model


def _save_samples(images: list[Image.Image], output_dir: Path) -> list[str]:
    """Save the images as PNGs under `output_dir/samples/`; return their paths relative to `output_dir`."""
    files = [f"{SAMPLES_DIR}/sample_{i}.png" for i in range(len(images))]
    if images:
        (output_dir / SAMPLES_DIR).mkdir(parents=True, exist_ok=True)
    for image, file in zip(images, files):
        image.save(output_dir / file)
    return files


def _write_card(
    output_dir: Path,
    *,
    title: str,
    description: str,
    usage: str,
    details: str,
    license: str,
    licence_statement: str,
    base_model: str | None,
    training_data: str | None,
    cost: dict[str, object] | None,
    sample_images: list[Image.Image],
    sample_prompts: list[str] | None,
    tags: list[str] | None,
) -> None:
    """Save the samples and write `README.md`: metadata, then title, description, usage, `details`, licence,
    training data, cost table and samples. Local paths in the caller's free text are reduced to base names."""
    sample_files = _save_samples(sample_images, output_dir)
    hub_base_model = _hub_id(base_model)
    if hub_base_model:
        base_model_line = f"Base model: [{base_model}](https://huggingface.co/{base_model})."
    else:
        base_model_line = f"Base model: {_without_local_paths(base_model)}." if base_model else ""
    sample_prompts = [_without_local_paths(prompt) for prompt in sample_prompts] if sample_prompts else None
    sections = [
        f"# {_without_local_paths(title)}",
        _without_local_paths(description),
        f"## Usage\n\n```python\n{usage}\n```\n\nThe package is not on PyPI; install it with `{INSTALL_COMMAND}`.",
        details,
        "## Licence\n\n"
        + " ".join(
            part
            for part in (
                f"These weights: `{license}`.",
                licence_statement,
                base_model_line,
                "The text encoder and VAE keep the licences of the checkpoints they come from; see their model cards.",
            )
            if part
        ),
        f"## Training data\n\n{_without_local_paths(training_data or 'Not stated.')}",
    ]
    if cost:
        rows = "\n".join(
            f"| {_without_local_paths(str(item))} | {_without_local_paths(str(value))} |"
            for item, value in cost.items()
        )
        sections.append(f"## Training cost\n\n| item | value |\n| --- | --- |\n{rows}")
    if sample_files:
        captions = sample_prompts or [f"sample {i}" for i in range(len(sample_files))]
        images = "\n".join(f"![{caption}]({file})" for caption, file in zip(captions, sample_files))
        sections.append(f"## Samples\n\n{images}")
    widget = [{"text": prompt, "output": {"url": file}} for prompt, file in zip(sample_prompts or [], sample_files)]
    # inference: false - the Hub's hosted inference cannot run classes from outside diffusers.
    card_data = ModelCardData(
        license=license, base_model=hub_base_model, pipeline_tag="text-to-image", widget=widget or None, inference=False
    )
    # diffusers' `load_or_create_model_card` needs a Hub repo id (a local folder without README raises) and its
    # training template is a TODO skeleton, so the card is built here; `populate_model_card` adds diffusers' metadata.
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")
    tags = ["text-to-image", "diffusers", PACKAGE.replace("_", "-"), *map(_without_local_paths, tags or [])]
    card = populate_model_card(card, tags=tags)
    card.save(output_dir / "README.md")
