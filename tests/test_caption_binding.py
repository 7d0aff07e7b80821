"""benchmarks/caption_binding.py: its recording processor is MicroDiT's attention, its share is 1 for a bound word
and 0.5 for an unbound one, and it runs on a pipeline folder."""

import importlib.util
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import REPO_ROOT, tiny_pipeline, tiny_transformer

from diffusers_microdit.data.shapes import parse_caption


@pytest.fixture(scope="module")
def binding():
    spec = importlib.util.spec_from_file_location("caption_binding", REPO_ROOT / "benchmarks" / "caption_binding.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recording_processor_is_microdits_attention(binding):
    model = tiny_transformer()
    x, t, y = torch.randn(2, 4, 8, 8), torch.zeros(2), torch.randn(2, 5, 32)
    caption_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    with torch.no_grad():
        expected = [model(x, t, y, encoder_attention_mask=m).sample for m in (None, caption_mask)]
        recorder = binding.RecordingAttnProcessor()
        for block in model.transformer_blocks:
            block.attn2.set_processor(recorder)
        for mask, reference in zip((None, caption_mask), expected):
            recorder.weights.clear()
            recorded = model(x, t, y, encoder_attention_mask=mask).sample
            torch.testing.assert_close(recorded, reference, atol=1e-4, rtol=1e-4)
    weights = torch.stack(recorder.weights)  # the masked call's: (blocks, B, 16 patches, 5 caption tokens)
    assert weights.shape == (3, 2, 16, 5)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 2, 16))
    assert (weights[:, 0, :, 3:] == 0).all() and (weights[:, 1, :, 4] == 0).all()  # padding gets nothing


def test_own_share_is_one_when_bound_and_a_half_when_not(binding):
    caption = parse_caption("a red circle and a blue square")
    tokens = ["<start>", "a", "red", "circle", "and", "a", "blue", "square", "<end>"]
    circle, square = (SimpleNamespace(shape=s, center=c) for s, c in (("circle", (6.0, 6.0)), ("square", (26.0, 26.0))))
    attention = np.full((8, 8, len(tokens)), 1.0)
    bound = attention.copy()
    bound[:3, :3, [2, 3]] = 50.0  # "red", "circle" read from around the circle at pixel (6, 6): cells (1, 1)
    bound[5:, 5:, [6, 7]] = 50.0  # "blue", "square" around the square
    bound[5:, 5:, [2, 3]] = 0.0
    bound[:3, :3, [6, 7]] = 0.0
    shares = binding.own_shares(bound, tokens, caption, [circle, square], cell_pixels=4, radius=1.5)
    assert [kind for kind, _ in shares] == ["shape", "colour", "shape", "colour"]
    assert all(share == 1.0 for _, share in shares)
    uniform = binding.own_shares(attention, tokens, caption, [circle, square], cell_pixels=4, radius=1.5)
    assert all(share == pytest.approx(0.5) for _, share in uniform)
    # A phrase whose shape is missing or doubled cannot be judged.
    assert binding.own_shares(bound, tokens, caption, [circle, circle], cell_pixels=4, radius=1.5) == []


def test_runs_on_a_pipeline_folder(binding, tmp_path):
    tiny_pipeline(mask_caption_padding=True).save_pretrained(tmp_path / "pipe")
    report = binding.main(
        [str(tmp_path / "pipe"), "--per_category", "1", "--num_inference_steps", "1", "--sigmas", "1"]
    )
    assert set(report) == {1.0}
    parts = [report[1.0][f"attention on {part}"] for part in ("caption start", "words", "caption end", "padding")]
    assert sum(parts) == pytest.approx(1.0, abs=1e-4)
