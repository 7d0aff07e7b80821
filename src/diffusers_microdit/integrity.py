"""Is a folder on disk complete and readable? Training checkpoints carry a manifest (every file's size and CRC-32,
written last) that is verified before a run resumes from them; local pipeline and model folders are checked before
diffusers loads them, because diffusers answers a damaged local file with advice about the internet connection.

A problem is reported as one line naming the file and what is wrong with it; callers decide whether it is fatal
(an explicit folder) or a reason to skip (the newest of several checkpoints).
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

from safetensors import SafetensorError, safe_open

MANIFEST = "manifest.json"
_CHUNK = 1 << 22


def file_crc32(path: Path) -> str:
    """CRC-32 of a file's bytes as 8 hex digits (zlib's, a few GB/s: cheap next to writing a checkpoint)."""
    crc = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def write_manifest(folder: str | os.PathLike, run: dict | None = None) -> Path:
    """Record every file under `folder` (relative path, size, CRC-32) and the `run` settings in `folder/manifest.json`.
    Call it after everything else is written: a folder whose manifest verifies is complete."""
    folder = Path(folder)
    files = {
        path.relative_to(folder).as_posix(): {"size": path.stat().st_size, "crc32": file_crc32(path)}
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"files": files, "run": run or {}}, indent=1))
    os.replace(tmp, folder / MANIFEST)
    return folder / MANIFEST


def read_manifest(folder: str | os.PathLike) -> dict:
    """The manifest of `folder`; `ValueError` if it is missing or unreadable."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ValueError(f"{path.parent.name} has no {MANIFEST} (its write never finished, or it is not a checkpoint)")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None


def manifest_problems(folder: str | os.PathLike) -> list[str]:
    """What is wrong with `folder` against its manifest: missing files, other sizes (truncated or overwritten),
    other checksums (corrupt). Empty when the folder is exactly as written."""
    folder = Path(folder)
    try:
        files = read_manifest(folder)["files"]
    except (ValueError, KeyError, TypeError) as error:
        return [str(error)]
    problems = []
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != expected["size"]:
            problems.append(f"{path}: {path.stat().st_size} bytes, {expected['size']} when written (truncated?)")
        elif file_crc32(path) != expected["crc32"]:
            problems.append(f"{path}: contents differ from when it was written (checksum mismatch: corrupt)")
    return problems


def file_problem(path: Path) -> str | None:
    """Why a JSON or safetensors file cannot be read (None if it can): parsed, or its header and size checked."""
    try:
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt"):
                pass  # opening validates the header and that the data covers the whole file
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        return f"{path}: not valid JSON ({error})"
    except (SafetensorError, OSError) as error:
        return f"{path}: unreadable safetensors file ({error})"
    return None


def local_folder_problems(folder: str | os.PathLike) -> list[str]:
    """Missing or unreadable files of a local diffusers pipeline folder (model_index.json and each component's
    folder) or model folder (config.json and weights)."""
    folder = Path(folder)
    index = folder / "model_index.json"
    if not index.is_file():
        return _component_problems(folder)
    problem = file_problem(index)
    if problem:
        return [problem]
    problems = []
    for name, spec in json.loads(index.read_text()).items():
        if name.startswith("_") or not isinstance(spec, list) or None in spec:
            continue  # metadata, or a component saved as None
        if not (folder / name).is_dir():
            problems.append(f"{folder / name}: missing (model_index.json lists component {name!r})")
        else:
            problems += _component_problems(folder / name)
    return problems


def _component_problems(folder: Path) -> list[str]:
    problems = [p for p in map(file_problem, sorted(folder.glob("*.json")) + sorted(folder.glob("*.safetensors"))) if p]
    # Pickled weights (*.bin) do not count: the package never loads them (nor pushes them) outside conversion.
    if (folder / "config.json").is_file() and not any(folder.glob("*.safetensors")):
        problems.append(f"{folder}: config.json but no safetensors weights file")
    return problems


def check_local_folder(path: str | os.PathLike | None, what: str = "folder") -> None:
    """Refuse a damaged local pipeline or model folder, naming each bad file; Hub ids (not local folders) pass."""
    if path is None or not Path(path).is_dir():
        return
    problems = local_folder_problems(path)
    if problems:
        raise SystemExit(
            f"The {what} {path} is a local folder with damaged or missing files (nothing is fetched from the Hub for "
            "a local folder):\n  " + "\n  ".join(problems) + "\nSave or download it again."
        )
