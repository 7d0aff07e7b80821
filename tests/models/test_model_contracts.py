"""diffusers model contracts shared by the three transformer families (MicroDiT, KV-compressed PixArt-Σ, LiT):
layerwise casting, fused QKV projections, regional compilation, `from_single_file` and the per-call LoRA scale."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import FusedAttnProcessor2_0
from helpers import (
    FIXTURES,
    NO_EXTRA_CONDITIONS,
    TINY_PIXART_CONFIG,
    load_microdit_fixture,
    randomize_,
    tiny_transformer,
)
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from diffusers_microdit import LiTTransformer2DModel, MicroDiTTransformer2DModel, PixArtSigmaKVTransformer2DModel
from diffusers_microdit.loaders import MICRODIT_LORA_TARGET_MODULES, PIXART_LORA_TARGET_MODULES
from diffusers_microdit.models.transformer_lit import LiTLinearAttnProcessor
from diffusers_microdit.models.microdit_layers import MicroDiTExpertChoiceMoE
from diffusers_microdit.models.transformer_pixart_kv import PixArtKVAttnProcessor2_0

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one intra-op thread
FAMILIES = ("microdit", "pixart_kv", "lit")
FP8 = torch.float8_e4m3fn


# ---------------------------------------------------------------------------------------------- helpers


def build(family: str) -> torch.nn.Module:
    """A tiny randomised model of `family`; the PixArt-Σ model compresses keys/values in blocks 1 and 2."""
    if family == "microdit":
        return tiny_transformer()
    kv = PixArtSigmaKVTransformer2DModel(**TINY_PIXART_CONFIG, kv_compress_layers=[1, 2])
    kv = randomize_(kv, seed=3).eval()
    if family == "pixart_kv":
        return kv
    torch.manual_seed(0)
    return randomize_(LiTTransformer2DModel.from_pixart(kv), seed=4).eval()


def inputs(family: str, dtype: torch.dtype = torch.float32) -> dict:
    generator = torch.Generator().manual_seed(0)
    if family == "microdit":
        return dict(
            hidden_states=torch.randn(2, 4, 8, 8, generator=generator).to(dtype),
            timestep=torch.tensor([0.5, -1.0]),
            encoder_hidden_states=torch.randn(2, 5, 32, generator=generator).to(dtype),
        )
    return dict(
        hidden_states=torch.randn(2, 4, 8, 12, generator=generator).to(dtype),  # 4x6 tokens, 2x3 compressed
        encoder_hidden_states=torch.randn(2, 5, 8, generator=generator).to(dtype),
        encoder_attention_mask=torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
        timestep=torch.tensor([10, 700]),
        added_cond_kwargs=NO_EXTRA_CONDITIONS,
    )


def run(model, family: str, dtype: torch.dtype = torch.float32, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs(family, dtype), **kwargs).sample


def add_lora(model, family: str, seed: int = 0) -> None:
    """A seeded LoRA whose B is not zero, so it changes the outputs."""
    targets = MICRODIT_LORA_TARGET_MODULES if family == "microdit" else PIXART_LORA_TARGET_MODULES
    torch.manual_seed(seed)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(targets), init_lora_weights=False))


def lora_kwargs_name(family: str) -> str:
    return "attention_kwargs" if family == "microdit" else "cross_attention_kwargs"


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected).norm() / expected.norm()).item()


def assert_close_to_scale(actual, expected, rel: float):
    """Element-wise closeness relative to the output's largest value (these random models reach |x| ~ 100)."""
    torch.testing.assert_close(actual, expected, atol=rel * expected.abs().max().item(), rtol=rel)


# ---------------------------------------------------------------------------------------------- layerwise casting

# Modules each family keeps in full precision under layerwise casting (its `_skip_layerwise_casting_patterns`).
FULL_PRECISION_MODULES = {
    "microdit": ("time_embedding.", ".modulation.", ".router.", "norm"),
    "pixart_kv": (".kv_compress.", "adaln_single.", "norm"),
    "lit": (".value_conv.", "adaln_single.", "norm"),
}


@pytest.mark.parametrize("with_lora", [False, True], ids=["base", "lora"])
@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("family", FAMILIES)
def test_layerwise_casting_fp8_storage(family, compute_dtype, with_lora):
    model = build(family)
    if with_lora:
        add_lora(model, family)
    reference = run(model, family)

    cast = copy.deepcopy(model)
    if compute_dtype != torch.float32:
        cast = cast.to(compute_dtype)  # diffusers' contract: load in the compute dtype, then enable casting
    cast.enable_layerwise_casting(storage_dtype=FP8, compute_dtype=compute_dtype)
    out = run(cast, family, compute_dtype)
    assert out.dtype == compute_dtype and torch.isfinite(out).all()

    # Weights really are stored in float8 between calls: every attention projection, and MicroDiT's MoE experts
    # (plain parameters that diffusers' hooks would miss); never the LoRA weights or the precision-critical modules.
    stored = {name: p.dtype for name, p in cast.named_parameters()}
    in_fp8 = {name for name, dtype in stored.items() if dtype == FP8}
    projections = [n for n in stored if n.endswith(("to_q.weight", "to_q.base_layer.weight"))]
    assert projections and set(projections) <= in_fp8
    if family == "microdit":
        experts = [f"{n}.w_in" for n, m in cast.named_modules() if isinstance(m, MicroDiTExpertChoiceMoE)]
        assert experts and set(experts) <= in_fp8
    assert not [n for n in in_fp8 if "lora_" in n or any(p in n for p in FULL_PRECISION_MODULES[family])]

    # Float8 e4m3 keeps 3 mantissa bits: each stored weight is off by up to 2^-4 (RMS about 3.6%) of itself, so
    # each rounded layer perturbs its output by a few percent. Through these random, untrained networks
    # (activations up to ~100 for MicroDiT) that measured 2-12% relative L2 error, cosine >= 0.993; 20% / 0.98 leave
    # headroom on top of bf16's own rounding, while a wrong cast (garbage or skipped weights) is off by O(1).
    assert relative_error(out, reference) < 0.2
    assert F.cosine_similarity(out.float().flatten(), reference.flatten(), dim=0) > 0.98

    if compute_dtype == torch.float32:
        # The error is the weight rounding and nothing else: in float32 the cast model computes exactly what the
        # un-cast model computes with those same weights rounded through float8 (observed: bit-identical).
        rounded = copy.deepcopy(model)
        with torch.no_grad():
            for name, param in rounded.named_parameters():
                if name in in_fp8:
                    param.copy_(param.to(FP8).float())
        assert_close_to_scale(out, run(rounded, family), rel=1e-6)


def test_microdit_layerwise_casting_skips_experts_like_diffusers_skips_layers():
    def expert_dtypes(**skip) -> dict[str, torch.dtype]:
        model = tiny_transformer()
        model.enable_layerwise_casting(storage_dtype=FP8, compute_dtype=torch.float32, **skip)
        assert torch.isfinite(run(model, "microdit")).all()
        return {n: m.w_in.dtype for n, m in model.named_modules() if isinstance(m, MicroDiTExpertChoiceMoE)}

    assert set(expert_dtypes().values()) == {FP8}
    # A pattern matching an ancestor skips the experts below it, as diffusers skips every layer below a match.
    by_pattern = expert_dtypes(skip_modules_pattern=("^transformer_blocks$",))
    assert by_pattern == {"patch_mixer_blocks.1.ff": FP8, "transformer_blocks.1.ff": torch.float32}
    assert set(expert_dtypes(skip_modules_classes=(MicroDiTExpertChoiceMoE,)).values()) == {torch.float32}


# ---------------------------------------------------------------------------------------------- fused QKV


def fused_modules(model) -> dict[str, list[str]]:
    return {
        name: [p for p in ("to_qkv", "to_kv") if hasattr(module, p)]
        for name, module in model.named_modules()
        if hasattr(module, "to_qkv") or hasattr(module, "to_kv")
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_qkv_projections_give_identical_outputs(family):
    model = build(family)
    expected = run(model, family)
    num_attention = len(model.attn_processors)

    compress_calls = []
    hooks = [
        m.register_forward_hook(lambda *_: compress_calls.append(1))
        for n, m in model.named_modules()
        if n.endswith(".kv_compress")
    ]
    model.fuse_qkv_projections()
    fused = fused_modules(model)
    # Every attention is fused: q/k/v of self-attention into to_qkv, k/v of cross-attention into to_kv.
    assert len(fused) == num_attention
    assert all(kinds == (["to_kv"] if ".attn2" in name else ["to_qkv"]) for name, kinds in fused.items())
    torch.testing.assert_close(run(model, family), expected, atol=1e-6, rtol=1e-6)
    if family == "pixart_kv":
        assert len(compress_calls) == 2 * 2  # keys and values of both compressed layers: still compressing
        assert all(isinstance(p, PixArtKVAttnProcessor2_0) for p in model.attn_processors.values())
    if family == "lit":  # the linear self-attention stays linear
        for i, block in enumerate(model.transformer_blocks):
            assert isinstance(block.attn1.processor, LiTLinearAttnProcessor), i
            assert isinstance(block.attn2.processor, FusedAttnProcessor2_0), i
    for hook in hooks:
        hook.remove()

    # The processors read the fused layers: scrambling the separate projections they replace changes nothing.
    scrambled = copy.deepcopy(model)
    with torch.no_grad():
        for name, kinds in fused_modules(scrambled).items():
            attn = scrambled.get_submodule(name)
            for proj in ("to_q", "to_k", "to_v") if kinds == ["to_qkv"] else ("to_k", "to_v"):
                getattr(attn, proj).weight.normal_()
    torch.testing.assert_close(run(scrambled, family), expected, atol=1e-6, rtol=1e-6)

    model.unfuse_qkv_projections()
    assert not fused_modules(model)
    assert not any(getattr(m, "fused_projections", False) for m in model.modules())
    torch.testing.assert_close(run(model, family), expected, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------- regional compilation


@pytest.fixture
def reset_dynamo():
    yield
    torch._dynamo.reset()


@pytest.mark.usefixtures("reset_dynamo")
@pytest.mark.parametrize("family", FAMILIES)
def test_compile_repeated_blocks_matches_eager(family):
    model = build(family)
    expected = run(model, family)
    # backend="aot_eager": dynamo captures each block whole (fullgraph=True: no graph breaks) and AOTAutograd traces
    # it, without inductor's C++ code generation, which took ~180 s for the three families on CPU (MicroDiT alone
    # ~130 s: its blocks have layer-wise-scaled widths, so every block is a new graph) against ~20 s here.
    model.compile_repeated_blocks(backend="aot_eager", fullgraph=True)
    blocks = [m for m in model.modules() if type(m).__name__ in model._repeated_blocks]
    assert len(blocks) == (5 if family == "microdit" else 3)
    assert all(block._compiled_call_impl is not None for block in blocks)
    torch.testing.assert_close(run(model, family), expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- from_single_file


def assert_fixture_close(actual, expected, tol, name):
    diff = (actual - expected).abs().max().item()
    print(f"{name}: max abs diff {diff:.3e} (atol {tol['atol']}, rtol {tol['rtol']})")
    torch.testing.assert_close(actual, expected, atol=tol["atol"], rtol=tol["rtol"])


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_microdit_from_single_file_reproduces_original(tmp_path, suffix):
    sidecar, state_dict, io = load_microdit_fixture()
    path = tmp_path / f"microdit{suffix}"
    if suffix == ".pt":
        torch.save(state_dict, path)
    else:
        save_file(state_dict, path)
    model = MicroDiTTransformer2DModel.from_single_file(str(path), original_config=sidecar["constructor"]["kwargs"])
    assert not model.training
    with torch.no_grad():
        out = model(io["inputs.x"], io["inputs.t"], io["inputs.y"]).sample
    tol = sidecar["tolerances"]["dit_forward"]["out.sample"]
    assert_fixture_close(out, io["out.sample"], tol, f"out.sample via from_single_file({suffix})")


def test_pixart_kv_from_single_file_reproduces_original(tmp_path):
    sidecar = json.loads((FIXTURES / "pixart_kv" / "pixart_kv.json").read_text())
    weights = load_file(FIXTURES / "pixart_kv" / sidecar["weights_file"])
    io = load_file(FIXTURES / "pixart_kv" / sidecar["io_file"])
    path = tmp_path / "PixArt-Sigma-KV-tiny.pth"
    torch.save({"state_dict": weights}, path)  # the original training script's layout
    model = PixArtSigmaKVTransformer2DModel.from_single_file(path, sidecar["constructor_kwargs"])
    assert model.kv_compressed_layers == [2, 3]
    with torch.no_grad():
        out = model(
            io["x"],
            encoder_hidden_states=io["y"][:, 0],
            encoder_attention_mask=io["mask"],
            timestep=io["timestep"],
            added_cond_kwargs=NO_EXTRA_CONDITIONS,
        ).sample
    assert_fixture_close(out, io["out"], sidecar["tolerances"]["out"], "out via from_single_file(.pth)")


def test_from_single_file_options_urls_and_errors(tmp_path, monkeypatch):
    sidecar, state_dict, _ = load_microdit_fixture()
    config = sidecar["constructor"]["kwargs"]
    path = tmp_path / "microdit.safetensors"
    save_file(state_dict, path)

    model = MicroDiTTransformer2DModel.from_single_file(path, config, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.warns(FutureWarning, match="dtype"):  # diffusers 0.42 deprecates torch_dtype
        model = MicroDiTTransformer2DModel.from_single_file(path, config, torch_dtype=torch.float16)
    assert model.dtype == torch.float16

    # Hub file URLs go through hf_hub_download (replaced here: the tests run offline).
    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename, kwargs))
        return str(path)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_download)
    url = "https://huggingface.co/someone/microdit-ckpts/blob/v1.0/dit/MicroDiT_XL_2.safetensors"
    MicroDiTTransformer2DModel.from_single_file(url, config, cache_dir=str(tmp_path), token="t")
    assert calls == [
        (
            "someone/microdit-ckpts",
            "dit/MicroDiT_XL_2.safetensors",
            {"repo_type": None, "cache_dir": str(tmp_path), "token": "t", "revision": "v1.0"},
        )
    ]
    with pytest.raises(ValueError, match="contradicts"):
        MicroDiTTransformer2DModel.from_single_file(url, config, revision="main")
    with pytest.raises(ValueError, match="blob/<revision>"):
        MicroDiTTransformer2DModel.from_single_file("https://huggingface.co/someone/microdit-ckpts", config)

    with pytest.raises(FileNotFoundError, match="No checkpoint file"):
        PixArtSigmaKVTransformer2DModel.from_single_file(tmp_path / "missing.pth")
    with pytest.raises(TypeError, match="unsupported arguments \\['low_cpu_mem_usage'\\]"):
        MicroDiTTransformer2DModel.from_single_file(path, config, low_cpu_mem_usage=False)
    with pytest.raises(TypeError, match="torch.dtype"):
        MicroDiTTransformer2DModel.from_single_file(path, config, dtype="bfloat16")


# ---------------------------------------------------------------------------------------------- per-call LoRA scale


class RecordingProcessor:
    """Wraps a processor and records the `scale` keyword it is given (diffusers forwards declared keywords)."""

    _supports_kv_compression = True

    def __init__(self, inner, seen: list):
        self.inner, self.seen = inner, seen
        self.takes_grid = isinstance(inner, (PixArtKVAttnProcessor2_0, LiTLinearAttnProcessor))

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, height=None,
                 width=None, scale=None):
        self.seen.append(scale)
        grid = dict(height=height, width=width) if self.takes_grid else {}
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, **grid)


@pytest.mark.parametrize("family", FAMILIES)
def test_per_call_lora_scale(family):
    model = build(family)
    base = run(model, family)
    add_lora(model, family)
    key = lora_kwargs_name(family)
    full = run(model, family)
    assert not torch.allclose(full, base, atol=1e-3)

    seen = []
    if family != "microdit":  # MicroDiT's processors take no keywords at all
        model.set_attn_processor({n: RecordingProcessor(p, seen) for n, p in model.attn_processors.items()})

    # Scale 0 switches the adapters off for the call.
    torch.testing.assert_close(run(model, family, **{key: {"scale": 0.0}}), base, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(run(model, family), full, atol=0, rtol=0)  # restored afterwards

    # Scale s equals merging the adapters into the weights at strength s (diffusers' fuse_lora).
    call_kwargs = {"scale": 0.5}
    scaled = run(model, family, **{key: call_kwargs})
    merged = copy.deepcopy(model)
    merged.fuse_lora(lora_scale=0.5)
    assert_close_to_scale(scaled, run(merged, family), rel=1e-5)
    assert not torch.allclose(scaled, full, atol=1e-3) and not torch.allclose(scaled, base, atol=1e-3)
    assert call_kwargs == {"scale": 0.5}  # the caller's dict is not consumed
    torch.testing.assert_close(run(model, family), full, atol=0, rtol=0)  # the next plain call is at scale 1

    if family != "microdit":
        assert seen and all(s is None for s in seen)  # the key never reached a processor


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_scale_must_be_passed_by_keyword(family):
    model = build(family)
    add_lora(model, family)
    x = inputs(family)
    if family == "microdit":
        positional = (x["hidden_states"], x["timestep"], x["encoder_hidden_states"], None, "deferred")
        with pytest.raises(ValueError, match="by keyword"):
            model(*positional, {"scale": 0.5})
        with pytest.raises(TypeError, match="return_dict by keyword"):
            model(*positional, False)  # the old position of return_dict
        with pytest.raises(ValueError, match="holds \\['foo'\\]"):
            model(**x, attention_kwargs={"scale": 0.5, "foo": 1})
    else:
        positional = (x["hidden_states"], x["encoder_hidden_states"], x["timestep"], x["added_cond_kwargs"])
        with pytest.raises(ValueError, match="by keyword"):
            model(*positional, {"scale": 0.5})


# ---------------------------------------------------------------------------------------------- import layering


def _package_import_graph() -> dict[str, set[str]]:
    """Module -> package modules it imports (every import statement, also those inside functions), from the source."""
    import ast
    from pathlib import Path

    root = Path(diffusers_microdit_package_dir())
    modules = {}
    for path in root.rglob("*.py"):
        parts = ("diffusers_microdit", *path.relative_to(root).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(node.level - 1):
                    base = base.rsplit(".", 1)[0]
                base = (f"{base}.{node.module}" if node.module else base) if node.level else (node.module or "")
                targets = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules] or [base]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for target in targets:
                parts = target.split(".")
                # Importing a.b.c runs the sub-package __init__s on the way (not the root's, which imports all).
                edges.update(".".join(parts[:i]) for i in range(2, len(parts) + 1))
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def diffusers_microdit_package_dir() -> str:
    import os

    import diffusers_microdit

    return os.path.dirname(diffusers_microdit.__file__)


def test_models_never_import_conversion_and_there_is_no_import_cycle():
    graph = _package_import_graph()
    for module, imports in graph.items():
        if module.startswith("diffusers_microdit.models"):
            assert not [m for m in imports if m.startswith("diffusers_microdit.conversion")], module

    def cycle_from(start, node, seen):
        for target in graph[node]:
            if target == start:
                return [node, target]
            if target not in seen:
                seen.add(target)
                path = cycle_from(start, target, seen)
                if path:
                    return [node, *path]
        return None

    for module in graph:
        assert cycle_from(module, module, {module}) is None, f"import cycle through {module}"
