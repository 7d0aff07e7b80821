"""What the documentation tells users to run matches what works: every example script is described in
examples/README.md, and no instruction uses a deprecated or missing command."""

import re

from helpers import REPO_ROOT

DOCUMENTED_FILES = [
    REPO_ROOT / "README.md",
    REPO_ROOT / "examples" / "README.md",
    *sorted((REPO_ROOT / "src").rglob("*.py")),
    *sorted((REPO_ROOT / "examples").glob("*.py")),
    *sorted((REPO_ROOT / "scripts").glob("*.py")),
    *sorted((REPO_ROOT / "spaces").rglob("*.py")),
]


def test_every_example_script_is_in_the_examples_readme():
    readme = (REPO_ROOT / "examples" / "README.md").read_text()
    for script in sorted((REPO_ROOT / "examples").glob("*.py")):
        assert f"`{script.name}`" in readme, script.name
        assert f"examples/{script.name}" in readme, f"no command for {script.name}"


def test_no_deprecated_or_missing_commands_in_instructions():
    for path in DOCUMENTED_FILES:
        text = path.read_text()
        assert not re.search(r"from_pretrained\([^)]*torch_dtype=", text), f"{path}: use dtype= (diffusers 0.42)"
        assert "huggingface-cli login" not in text, f"{path}: the command is `hf auth login`"
        assert "pip install diffusers-microdit" not in text, f"{path}: not on PyPI; use hub.INSTALL_COMMAND"
