"""The lean training loop (issue 14): a small cache is held as tensors and batches exactly as its Arrow rows, and
losses are read back every `log_every` steps without losing a step or letting a non-finite loss reach a checkpoint."""

from __future__ import annotations

import json
import re

import datasets
import pytest
import torch
from helpers import microdit_train_args, run_script

from diffusers_microdit.training.data import InMemoryRows, in_memory_rows, load_precomputed

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one intra-op thread


def batches(dataset) -> list[dict]:
    """Every batch of 4 of a seeded shuffle (the same order for any dataset of the same length)."""
    order = torch.Generator().manual_seed(0)
    return list(torch.utils.data.DataLoader(dataset, batch_size=4, shuffle=True, generator=order))


def assert_same_batches(held: list[dict], formatted: list[dict]) -> None:
    assert len(held) == len(formatted)
    for ours, theirs in zip(held, formatted):
        assert ours.keys() == theirs.keys()
        for name in theirs:
            assert ours[name].dtype == theirs[name].dtype and torch.equal(ours[name], theirs[name]), name


def test_a_small_cache_is_held_as_tensors_and_yields_the_arrow_batches(microdit_workspace):
    arrow = load_precomputed([str(microdit_workspace["cache"])], 32)
    held = in_memory_rows(arrow)
    assert isinstance(held, InMemoryRows) and held.column_names == arrow.column_names and len(held) == len(arrow)
    assert_same_batches(batches(held), batches(arrow))


def test_held_rows_keep_the_torch_formats_dtypes_of_every_column():
    features = datasets.Features({
        "latents": datasets.Array3D((2, 2, 2), "float16"),
        "prompt_embeds": datasets.Array2D((3, 4), "float16"),
        "prompt_attention_mask": datasets.Sequence(datasets.Value("int8"), length=3),
    })
    rows = datasets.Dataset.from_dict({
        "latents": torch.randn(8, 2, 2, 2).half().numpy(), "prompt_embeds": torch.randn(8, 3, 4).half().numpy(),
        "prompt_attention_mask": [[1, 1, 0]] * 8,
    }, features=features).with_format("torch")
    assert_same_batches(batches(in_memory_rows(rows)), batches(rows))


def test_a_large_or_streamed_cache_is_read_as_it_is():
    rows = datasets.Dataset.from_dict({"latents": [[0.0] * 16] * 8}).with_format("torch")
    assert in_memory_rows(rows, max_bytes=8 * 16 * 4) is not rows  # exactly the cap: held
    assert in_memory_rows(rows, max_bytes=8 * 16 * 4 - 1) is rows
    streamed = rows.to_iterable_dataset()
    assert in_memory_rows(streamed) is streamed


def test_losses_read_back_every_few_steps_keep_every_step(microdit_workspace, tmp_path):
    out = tmp_path / "run"
    args = ("--max_train_steps", 13, "--checkpointing_steps", 100)  # read at steps 10 and 13 (the end)
    run_script("train_microdit.py", *microdit_train_args(microdit_workspace, out, *args))
    history = json.loads((out / "loss_history.json").read_text())
    assert history["steps"] == list(range(1, 14)) and all(loss > 0 for loss in history["losses"])


def test_a_non_finite_loss_between_reads_is_named_and_never_checkpointed(microdit_workspace, tmp_path):
    out = tmp_path / "run"
    args = ("--max_train_steps", 12, "--checkpointing_steps", 5, "--learning_rate", 1e30, "--max_grad_norm", "none")
    result = run_script("train_microdit.py", *microdit_train_args(microdit_workspace, out, *args), check=False)
    output = result.stdout + result.stderr
    stopped = re.search(r"Training stopped at step (\d+): (the loss is \w+|weights are non-finite)", output)
    assert result.returncode != 0 and stopped, output[-2000:]
    # The loss turns non-finite within the first steps; its step is named although it is read back at step 5.
    assert int(stopped.group(1)) <= 5 and not list(out.glob("checkpoint-*")) and not (out / "pipeline").exists()
