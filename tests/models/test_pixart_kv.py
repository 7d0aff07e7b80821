"""KV-compressed PixArt-Σ: golden outputs of the original code, diffusers loading/saving, pipelines, errors."""

import json
import logging

import pytest
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, PixArtSigmaPipeline, PixArtTransformer2DModel
from diffusers.models.attention_dispatch import attention_backend
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.modeling_utils import no_init_weights
from helpers import (
    FIXTURES,
    NO_EXTRA_CONDITIONS,
    TINY_PIXART_CONFIG,
    generate,
    randomize_,
    tiny_pixart_components,
)
from helpers import run_transformer as run
from helpers import tiny_pixart_inputs as tiny_inputs
from safetensors.torch import load_file, save_file

import diffusers_microdit  # noqa: F401  (registers the package's pipelines with diffusers)
from diffusers_microdit.conversion.pixart_sigma import convert_pixart_sigma_checkpoint
from diffusers_microdit.models.transformer_pixart_kv import (
    PixArtKVAttnProcessor2_0,
    PixArtKVCompression,
    PixArtSigmaKVTransformer2DModel,
)
from diffusers_microdit.pipelines.pipeline_pixart_kv import PixArtSigmaKVPipeline

PIXART_KV_FIXTURES = FIXTURES / "pixart_kv"
pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one intra-op thread


# ---------------------------------------------------------------------------------------------- helpers


def assert_close(actual, expected, tol, name):
    diff = (actual - expected).abs().max().item()
    print(f"{name}: max abs diff {diff:.3e} (atol {tol['atol']}, rtol {tol['rtol']})")
    torch.testing.assert_close(actual, expected, atol=tol["atol"], rtol=tol["rtol"])


def load_pixart_kv_fixture():
    sidecar = json.loads((PIXART_KV_FIXTURES / "pixart_kv.json").read_text())
    weights = load_file(PIXART_KV_FIXTURES / sidecar["weights_file"])
    io = load_file(PIXART_KV_FIXTURES / sidecar["io_file"])
    return sidecar, weights, io


def fixture_forward(model, io, rows=slice(None), x_key="x"):
    with torch.no_grad():
        return model(
            io[x_key],
            encoder_hidden_states=io["y"][rows, 0],
            encoder_attention_mask=io["mask"][rows],
            timestep=io["timestep"][rows],
            added_cond_kwargs=NO_EXTRA_CONDITIONS,
        ).sample


def tiny_plain_pixart(seed: int = 0) -> PixArtTransformer2DModel:
    """diffusers' own PixArt-Σ transformer, every parameter re-drawn (nothing zero-initialised)."""
    return randomize_(PixArtTransformer2DModel(**TINY_PIXART_CONFIG), seed=seed).eval()


def block_outputs(model, inputs) -> list[torch.Tensor]:
    outputs = []
    hooks = [b.register_forward_hook(lambda m, a, o: outputs.append(o)) for b in model.transformer_blocks]
    try:
        run(model, inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return outputs


def kv_parameters(model) -> dict:
    return {name: p for name, p in model.named_parameters() if ".kv_compress." in name}


def assert_average_init(model, ratio: int = 2):
    params = kv_parameters(model)
    assert params, "no KV-compression parameters"
    for name, param in params.items():
        expected = {"conv.weight": 1 / ratio**2, "conv.bias": 0.0, "norm.weight": 1.0, "norm.bias": 0.0}
        value = expected[name.split(".kv_compress.")[1]]
        assert param.device.type != "meta", name
        assert torch.equal(param.detach(), torch.full_like(param, value)), name


def assert_nothing_on_meta(model):
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    assert not on_meta, on_meta


# ---------------------------------------------------------------------------------------------- golden fixture


@pytest.fixture(scope="module")
def golden():
    sidecar, weights, io = load_pixart_kv_fixture()
    model = PixArtSigmaKVTransformer2DModel.from_original(weights, sidecar["constructor_kwargs"])
    return sidecar, weights, io, model


def test_config_matches_proposed_diffusers_config(golden):
    sidecar, _, _, model = golden
    for key, value in sidecar["proposed_diffusers_config"].items():
        assert model.config[key] == value, key
    assert model.kv_compressed_layers == [2, 3]


def test_kv_forward_matches_original(golden):
    sidecar, _, io, model = golden
    assert_close(fixture_forward(model, io), io["out"], sidecar["tolerances"]["out"], "out (8x12 tokens)")


def test_odd_grid_matches_original(golden):
    sidecar, _, io, model = golden
    out = fixture_forward(model, io, rows=slice(1, 2), x_key="x_odd")
    assert_close(out, io["out_odd"], sidecar["tolerances"]["out_odd"], "out_odd (9x7 tokens -> 4x3 KV)")


def test_kv_disabled_matches_original(golden):
    sidecar, weights, io, _ = golden
    plain_weights = {k: v for k, v in weights.items() if k not in sidecar["kv_compress_keys"]}
    model = PixArtSigmaKVTransformer2DModel.from_original(
        plain_weights, {**sidecar["constructor_kwargs"], "kv_compress_config": None}
    )
    assert model.config.kv_compress_layers is None and not kv_parameters(model)
    assert_close(fixture_forward(model, io), io["out_nokv"], sidecar["tolerances"]["out_nokv"], "out_nokv")


def test_per_block_intermediates_match_original(golden):
    sidecar, _, io, model = golden
    captured = {}
    hooks = []
    for i, block in enumerate(model.transformer_blocks):
        hooks.append(block.attn1.register_forward_hook(lambda m, a, o, i=i: captured.__setitem__(f"{i}.attn", o)))
        hooks.append(block.register_forward_hook(lambda m, a, o, i=i: captured.__setitem__(f"{i}.out", o)))
    try:
        fixture_forward(model, io)
    finally:
        for hook in hooks:
            hook.remove()
    tol = sidecar["tolerances"]["intermediates"]
    for i in range(len(model.transformer_blocks)):
        assert_close(captured[f"{i}.attn"], io[f"inter.block{i}.self_attn_out"], tol, f"block{i}.self_attn_out")
        assert_close(captured[f"{i}.out"], io[f"inter.block{i}.out"], tol, f"block{i}.out")


def test_from_original_reads_pth_and_infers_kv_from_weights(golden, tmp_path):
    sidecar, weights, io, _ = golden
    path = tmp_path / "PixArt-Sigma-tiny.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in weights.items()}}, path)
    # No kv_compress_config: layers and ratio are read from the `attn.sr` weights; sizes from the weight shapes.
    model = PixArtSigmaKVTransformer2DModel.from_original(
        path, {"input_size": 16, "pe_interpolation": 2.0, "num_heads": 4}
    )
    assert model.config.kv_compress_layers == [2, 3] and model.config.kv_compress_ratio == 2
    assert model.config.num_layers == 4 and model.config.caption_channels == 32
    assert_close(fixture_forward(model, io), io["out"], sidecar["tolerances"]["out"], "out via .pth")

    save_file(weights, tmp_path / "weights.safetensors")
    model = PixArtSigmaKVTransformer2DModel.from_original(
        tmp_path / "weights.safetensors", sidecar["constructor_kwargs"]
    )
    assert_close(fixture_forward(model, io), io["out"], sidecar["tolerances"]["out"], "out via .safetensors")


def test_from_original_without_kv_weights_uses_average_init(golden, caplog):
    sidecar, weights, io, _ = golden
    plain_weights = {k: v for k, v in weights.items() if k not in sidecar["kv_compress_keys"]}
    with caplog.at_level(logging.WARNING):
        model = PixArtSigmaKVTransformer2DModel.from_original(plain_weights, sidecar["constructor_kwargs"])
    assert "no KV-compression weights for blocks [2, 3]" in caplog.text
    assert_average_init(model)
    out = fixture_forward(model, io)
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, io["out_nokv"], atol=1e-3)  # the init is close to, not equal to, no compression


def test_conversion_rejects_inconsistent_checkpoints(golden):
    sidecar, weights, _, _ = golden
    kwargs = sidecar["constructor_kwargs"]
    with pytest.raises(ValueError, match="KV-compression convs for blocks"):
        convert_pixart_sigma_checkpoint(weights, {**kwargs, "kv_compress_config": None})
    with pytest.raises(ValueError, match="differ from scale_factor"):
        convert_pixart_sigma_checkpoint(
            weights, {**kwargs, "kv_compress_config": {**kwargs["kv_compress_config"], "scale_factor": 3}}
        )
    with pytest.raises(ValueError, match="Unconverted keys"):
        convert_pixart_sigma_checkpoint({**weights, "blocks.0.extra.weight": torch.zeros(1)}, kwargs)
    with pytest.raises(ValueError, match="out of range"):
        convert_pixart_sigma_checkpoint(
            weights, {**kwargs, "kv_compress_config": {**kwargs["kv_compress_config"], "kv_compress_layer": [2, 3, 9]}}
        )
    with pytest.raises(NotImplementedError, match="qk_norm"):
        convert_pixart_sigma_checkpoint(weights, {**kwargs, "qk_norm": True})


# ---------------------------------------------------------------------------------------------- diffusers loading


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory):
    """A diffusers-format PixArt-Σ transformer folder saved by diffusers' own class (random weights)."""
    path = tmp_path_factory.mktemp("pixart") / "plain"
    tiny_plain_pixart().save_pretrained(path)
    return path


def test_diffusers_pixart_checkpoint_loads_strictly_and_matches(plain_dir):
    model, info = PixArtSigmaKVTransformer2DModel.from_pretrained(plain_dir, output_loading_info=True)
    assert all(not v for v in info.values()), info
    assert model.config.kv_compress_layers is None and not kv_parameters(model)
    reference = PixArtTransformer2DModel.from_pretrained(plain_dir)
    inputs = tiny_inputs()
    torch.testing.assert_close(run(model, inputs), run(reference, inputs), atol=1e-6, rtol=0)


def test_enable_kv_compression_changes_only_compressed_layers(plain_dir):
    reference = PixArtSigmaKVTransformer2DModel.from_pretrained(plain_dir)
    model = PixArtSigmaKVTransformer2DModel.from_pretrained(plain_dir).enable_kv_compression([1, 2])
    assert model.config.kv_compress_layers == [1, 2] and model.kv_compressed_layers == [1, 2]
    assert model.config.kv_compress_ratio == 2 and model.config.kv_compress_sampling == "conv"
    assert_average_init(model)
    inputs = tiny_inputs()
    ours, theirs = block_outputs(model, inputs), block_outputs(reference, inputs)
    assert torch.equal(ours[0], theirs[0])  # before the first compressed layer: bit-identical
    assert not torch.allclose(ours[1], theirs[1], atol=1e-4)
    out = run(model, inputs)
    assert torch.isfinite(out).all() and out.shape == (2, 8, 8, 12)

    # Default layer set: the deeper half, as released (14..27 of 28).
    assert PixArtSigmaKVTransformer2DModel(**TINY_PIXART_CONFIG).enable_kv_compression().kv_compressed_layers == [1, 2]
    # Disabling restores the exact uncompressed model.
    model.disable_kv_compression()
    assert model.config.kv_compress_layers is None and not kv_parameters(model)
    assert torch.equal(run(model, inputs), run(reference, inputs))


def test_average_init_survives_no_init_weights(plain_dir):
    with no_init_weights():
        built = PixArtSigmaKVTransformer2DModel(**TINY_PIXART_CONFIG, kv_compress_layers=[0, 2])
    assert_average_init(built)
    model = PixArtSigmaKVTransformer2DModel.from_pretrained(plain_dir)
    with no_init_weights():
        model.enable_kv_compression([1], ratio=2)
    assert_average_init(model)


def test_kv_compression_module_at_init_is_average_pooling_then_layernorm():
    module = PixArtKVCompression(dim=6, ratio=2)
    x = torch.randn(3, 5 * 7, 6)  # odd 5x7 grid: the last row and column are dropped
    image = x.transpose(1, 2).reshape(3, 6, 5, 7)
    pooled = F.avg_pool2d(image, 2).flatten(2).transpose(1, 2)
    expected = F.layer_norm(pooled, (6,), eps=1e-5)
    torch.testing.assert_close(module(x, 5, 7), expected, atol=1e-6, rtol=1e-6)
    assert module(x, 5, 7).shape == (3, 2 * 3, 6)

    even = torch.randn(2, 4 * 6, 6)
    subsampled = even.view(2, 4, 6, 6)[:, ::2, ::2].reshape(2, -1, 6)
    assert torch.equal(PixArtKVCompression(6, 2, "ave")(even, 4, 6), subsampled)
    assert torch.equal(PixArtKVCompression(6, 2, "uniform")(even, 4, 6), subsampled)
    assert torch.equal(PixArtKVCompression(6, 2, "uniform_every")(even), even[:, ::2])
    # 'ave' floors odd grids (nearest interpolation); 'uniform' fails there in the original, here with a clear error.
    odd_sub = x.view(3, 5, 7, 6)[:, 0:4:2, 0:6:2].reshape(3, -1, 6)
    assert torch.equal(PixArtKVCompression(6, 2, "ave")(x, 5, 7), odd_sub)
    with pytest.raises(ValueError, match="divisible by 2"):
        PixArtKVCompression(6, 2, "uniform")(x, 5, 7)
    assert not list(PixArtKVCompression(6, 2, "ave").parameters())


def test_save_load_round_trip_of_compressed_model(plain_dir, tmp_path):
    model = PixArtSigmaKVTransformer2DModel.from_pretrained(plain_dir).enable_kv_compression([0, 2], ratio=2)
    with torch.no_grad():  # move the KV weights away from their init, so the reload must really load them
        for i, param in enumerate(kv_parameters(model).values()):
            param.add_(0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(i)))
    model.save_pretrained(tmp_path / "kv")
    assert json.loads((tmp_path / "kv" / "config.json").read_text())["kv_compress_layers"] == [0, 2]

    for low_cpu_mem_usage in (True, False):
        loaded, info = PixArtSigmaKVTransformer2DModel.from_pretrained(
            tmp_path / "kv", output_loading_info=True, low_cpu_mem_usage=low_cpu_mem_usage
        )
        assert all(not v for v in info.values()), info
        assert_nothing_on_meta(loaded)
        assert loaded.kv_compressed_layers == [0, 2]
        inputs = tiny_inputs()
        assert torch.equal(run(loaded, inputs), run(model, inputs))


@pytest.mark.parametrize("low_cpu_mem_usage", [True, False])
def test_plain_folder_into_kv_config_never_leaves_meta_parameters(plain_dir, caplog, low_cpu_mem_usage):
    with caplog.at_level(logging.WARNING):
        model = PixArtSigmaKVTransformer2DModel.from_pretrained(
            plain_dir, kv_compress_layers=[1, 2], low_cpu_mem_usage=low_cpu_mem_usage
        )
    assert "no KV-compression weights for blocks [1, 2]" in caplog.text
    assert_nothing_on_meta(model)
    assert_average_init(model)
    enabled = PixArtSigmaKVTransformer2DModel.from_pretrained(plain_dir).enable_kv_compression([1, 2])
    inputs = tiny_inputs()
    assert torch.equal(run(model, inputs), run(enabled, inputs))


def test_parameter_free_samplings(plain_dir):
    inputs = tiny_inputs()
    reference = run(PixArtSigmaKVTransformer2DModel.from_pretrained(plain_dir), inputs)
    for sampling in ("ave", "uniform", "uniform_every"):
        model = PixArtSigmaKVTransformer2DModel.from_pretrained(
            plain_dir, kv_compress_layers=[2], kv_compress_sampling=sampling
        )
        assert not kv_parameters(model) and model.kv_compressed_layers == [2]
        out = run(model, inputs)
        assert torch.isfinite(out).all() and not torch.allclose(out, reference, atol=1e-4), sampling


def test_processors_backends_and_fused_projections(plain_dir):
    model = PixArtSigmaKVTransformer2DModel.from_pretrained(plain_dir).enable_kv_compression([1, 2])
    assert all(isinstance(p, PixArtKVAttnProcessor2_0) for p in model.attn_processors.values())
    inputs = tiny_inputs()
    expected = run(model, inputs)
    with attention_backend("_native_math"):
        torch.testing.assert_close(run(model, inputs), expected, atol=1e-5, rtol=1e-5)

    model.fuse_qkv_projections()
    assert model.transformer_blocks[1].attn1.fused_projections
    torch.testing.assert_close(run(model, inputs), expected, atol=1e-5, rtol=1e-5)
    model.unfuse_qkv_projections()
    assert not hasattr(model.transformer_blocks[1].attn1, "to_qkv")
    torch.testing.assert_close(run(model, inputs), expected, atol=1e-6, rtol=0)

    # A processor that cannot compress must not silently skip compression.
    model.set_attn_processor(AttnProcessor2_0())
    with pytest.raises(RuntimeError, match="does not support KV compression"):
        run(model, inputs)
    model.set_default_attn_processor()
    torch.testing.assert_close(run(model, inputs), expected, atol=1e-6, rtol=0)


def test_gradient_checkpointing_gives_same_gradients(plain_dir):
    model = PixArtSigmaKVTransformer2DModel.from_pretrained(plain_dir).enable_kv_compression([1, 2])
    model.train()
    inputs = tiny_inputs()

    def grads():
        model.zero_grad()
        model(**inputs).sample.square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.enable_gradient_checkpointing()
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and any(".kv_compress." in n for n in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=5e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- errors


def test_compressed_layer_without_grid_size_is_an_error(plain_dir):
    model = PixArtSigmaKVTransformer2DModel.from_pretrained(plain_dir).enable_kv_compression([1])
    tokens = torch.randn(2, 24, 16)
    with pytest.raises(ValueError, match="height and width"):
        model.transformer_blocks[1].attn1(tokens)
    timestep = torch.randn(2, 6 * 16)
    context = torch.randn(2, 5, 16)
    with pytest.raises(ValueError, match="height and width"):
        model.transformer_blocks[1](tokens, encoder_hidden_states=context, timestep=timestep)
    with pytest.raises(ValueError, match="does not match"):
        model.transformer_blocks[1](tokens, encoder_hidden_states=context, timestep=timestep, height=5, width=5)
    # Uncompressed layers do not need the grid.
    assert model.transformer_blocks[0](tokens, encoder_hidden_states=context, timestep=timestep).shape == (2, 24, 16)
    with pytest.raises(ValueError, match="self-attention mask"):
        run(model, {**tiny_inputs(), "attention_mask": torch.ones(2, 24)})


def test_bad_sampling_ratio_and_layer_indices_are_errors(plain_dir):
    with pytest.raises(ValueError, match="Unknown kv_compress_sampling"):
        PixArtSigmaKVTransformer2DModel(**TINY_PIXART_CONFIG, kv_compress_layers=[1], kv_compress_sampling="avg")
    model = PixArtSigmaKVTransformer2DModel.from_pretrained(plain_dir)
    with pytest.raises(ValueError, match="Unknown kv_compress_sampling"):
        model.enable_kv_compression([1], sampling="bilinear")
    for layers in ([3], [-1], ["1"], [1.0], 1):
        with pytest.raises(ValueError, match="kv_compress_layers"):
            model.enable_kv_compression(layers)
    with pytest.raises(ValueError, match="out of range"):
        PixArtSigmaKVTransformer2DModel(**TINY_PIXART_CONFIG, kv_compress_layers=[0, 3])
    with pytest.raises(ValueError, match="ratio=1 does not compress"):
        model.enable_kv_compression([1], ratio=1)
    with pytest.raises(ValueError, match="positive integer"):
        model.enable_kv_compression([1], ratio=0)
    # Failed calls leave the model untouched.
    assert model.config.kv_compress_layers is None and not kv_parameters(model)


# ---------------------------------------------------------------------------------------------- pipelines


@pytest.fixture(scope="module")
def kv_pipeline():
    return PixArtSigmaKVPipeline(**tiny_pixart_components())


@pytest.fixture(scope="module")
def saved_kv_pipeline(kv_pipeline, tmp_path_factory):
    path = tmp_path_factory.mktemp("pixart_kv_pipeline")
    kv_pipeline.save_pretrained(path)
    return path


def test_diffusers_pixart_sigma_pipeline_runs_kv_model_with_resolution_binning(kv_pipeline):
    pipe = PixArtSigmaPipeline(**kv_pipeline.components)
    calls = []
    hook = pipe.transformer.transformer_blocks[1].attn1.kv_compress.register_forward_hook(
        lambda m, a, o: calls.append((a[0].shape[1], o.shape[1]))
    )
    try:
        # 64x128 px is binned to the 0.5 bucket (176x352 px -> 22x44 latents -> 11x22 tokens; odd rows floor).
        binned = generate(pipe, height=64, width=128)
    finally:
        hook.remove()
    assert binned.shape == (1, 64, 128, 3) and bool((binned >= 0).all() and (binned <= 1).all())
    assert calls and set(calls) == {(11 * 22, 5 * 11)}

    unbinned = generate(pipe, height=32, width=48, use_resolution_binning=False)
    assert unbinned.shape == (1, 32, 48, 3)
    # Same components in the package's pipeline class: identical images.
    assert (generate(kv_pipeline, height=32, width=48, use_resolution_binning=False) == unbinned).all()


def test_kv_pipeline_save_and_reload(kv_pipeline, saved_kv_pipeline):
    index = json.loads((saved_kv_pipeline / "model_index.json").read_text())
    assert index["_class_name"] == "PixArtSigmaKVPipeline"
    module = "diffusers_microdit.models.transformer_pixart_kv"
    assert index["transformer"] == [module, "PixArtSigmaKVTransformer2DModel"]

    reloaded = PixArtSigmaKVPipeline.from_pretrained(saved_kv_pipeline)
    assert isinstance(reloaded, PixArtSigmaKVPipeline)
    assert isinstance(reloaded.transformer, PixArtSigmaKVTransformer2DModel)
    assert reloaded.transformer.kv_compressed_layers == [1, 2]
    assert_nothing_on_meta(reloaded.transformer)
    kwargs = dict(height=32, width=48, use_resolution_binning=False)
    assert (generate(reloaded, **kwargs) == generate(kv_pipeline, **kwargs)).all()

    # diffusers' own class also loads the folder (its loader is given the recorded KV transformer class).
    diffusers_pipe = PixArtSigmaPipeline.from_pretrained(saved_kv_pipeline)
    assert isinstance(diffusers_pipe.transformer, PixArtSigmaKVTransformer2DModel)


def test_diffusion_pipeline_resolves_kv_pipeline(saved_kv_pipeline):
    pipe = DiffusionPipeline.from_pretrained(saved_kv_pipeline)
    assert type(pipe) is PixArtSigmaKVPipeline
    assert isinstance(pipe.transformer, PixArtSigmaKVTransformer2DModel)


def test_enabled_compression_survives_from_config_after_loading_a_plain_folder(tmp_path):
    """EMAModel and pipelines rebuild models with `from_config(model.config)`: the KV settings enabled on a model
    loaded from a plain PixArt-Σ folder must not be treated as unset defaults there."""
    plain = tiny_pixart_components()["transformer"]
    plain_config = {key: value for key, value in plain.config.items() if not key.startswith("kv_")}
    PixArtTransformer2DModel.from_config(plain_config).save_pretrained(tmp_path)
    model = PixArtSigmaKVTransformer2DModel.from_pretrained(tmp_path).enable_kv_compression([1])
    assert PixArtSigmaKVTransformer2DModel.from_config(model.config).config.kv_compress_layers == [1]
