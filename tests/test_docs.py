"""What the documentation tells users to run matches what works: every example script is described in
examples/README.md, no instruction uses a deprecated or missing command, and the README's recipe table is the
recipe file."""

import json
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


def test_the_readme_recipe_table_is_the_recipe_file():
    recipe = json.loads((REPO_ROOT / "examples" / "recipes" / "microdit_paper.json").read_text())
    rows = [line for line in (REPO_ROOT / "README.md").read_text().splitlines() if re.match(r"\| \d `stage", line)]
    assert len(rows) == len(recipe["stages"])
    for row, stage in zip(rows, recipe["stages"]):
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        flags = {**recipe["common"], **stage["args"]}
        accumulation = flags["--global_batch_size"] // (flags["--train_batch_size"] * 8)
        assert cells[0].endswith(f"`{stage['name']}`")
        assert cells[1:4] == [str(flags["--resolution"]), f"{flags['--mask_ratio']:g}", str(flags["--max_train_steps"])]
        rate, schedule = (part.strip() for part in cells[4].split(",")[:2])
        assert (float(rate), schedule) == (flags["--learning_rate"], flags["--lr_scheduler"])
        assert cells[5] == f"{flags['--p_mean']:g} / {flags['--p_std']:g}" and cells[6] == f"{flags['--max_grad_norm']:g}"
        assert cells[7] == f"{flags['--train_batch_size']} x {accumulation} x 8 = {flags['--global_batch_size']}"
        assert ("optimizer state of" in cells[4]) == bool(flags.get("--resume_optimizer_state"))
