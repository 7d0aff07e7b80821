"""MicroDiTTransformer2DModel against the original implementation's golden outputs, plus diffusers-model behaviour."""

import json

import pytest
import torch
from diffusers.models.attention_dispatch import attention_backend
from helpers import MICRODIT_FIXTURES, fixture_transformer, load_microdit_fixture, tiny_transformer

from diffusers_microdit import EDMHeunScheduler, MicroDiTTransformer2DModel, get_random_keep_ids
from diffusers_microdit.conversion.microdit import convert_microdit_checkpoint
from diffusers_microdit.models.transformer_microdit import microdit_2d_sincos_pos_embed


@pytest.fixture(scope="module")
def fixture():
    sidecar, _, io = load_microdit_fixture()
    return sidecar, io, fixture_transformer()


def public_config(model) -> dict:
    return {k: v for k, v in model.config.items() if not k.startswith("_")}


def assert_close(actual, expected, tol, name):
    diff = (actual - expected).abs().max().item()
    print(f"{name}: max abs diff {diff:.3e} (atol {tol['atol']})")
    torch.testing.assert_close(actual, expected, atol=tol["atol"], rtol=tol["rtol"])


def test_unmasked_forward_matches_original(fixture):
    sidecar, io, model = fixture
    with torch.no_grad():
        out = model(io["inputs.x"], io["inputs.t"], io["inputs.y"])
    assert out.mask is None
    assert_close(out.sample, io["out.sample"], sidecar["tolerances"]["dit_forward"]["out.sample"], "out.sample")


def test_masked_forward_matches_original(fixture):
    sidecar, io, model = fixture
    with torch.no_grad():
        out = model(io["inputs.x"], io["inputs.t"], io["inputs.y"], keep_ids=io["mask.ids_keep"])
    assert torch.equal(out.mask, io["out_masked.mask"])
    tol = sidecar["tolerances"]["dit_forward"]["out_masked.sample"]
    assert_close(out.sample, io["out_masked.sample"], tol, "out_masked.sample")
    # Removed patches hold exactly the mask token.
    patches = out.sample.unfold(2, 2, 2).unfold(3, 2, 2)  # (B, C, h, w, p, p)
    patches = patches.permute(0, 2, 3, 4, 5, 1).reshape(2, 64, -1)
    removed = out.mask.bool()
    assert torch.equal(patches[removed], model.mask_token.reshape(1, -1).expand(int(removed.sum()), -1))


def test_guided_forward_matches_original(fixture):
    sidecar, io, model = fixture
    x, t, y = io["inputs.x"], io["inputs.t"], io["inputs.y"].squeeze(1)
    with torch.no_grad():
        both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([torch.zeros_like(y), y])).sample
    uncond, cond = both.chunk(2)
    guided = uncond + sidecar["hyper"]["cfg_scale"] * (cond - uncond)
    assert_close(guided, io["out_cfg.sample"], sidecar["tolerances"]["dit_forward"]["out_cfg.sample"], "out_cfg.sample")


@pytest.mark.parametrize("prefix, keep_ids", [("inter", None), ("inter_masked", "mask.ids_keep")])
def test_intermediates_match_original(fixture, prefix, keep_ids):
    sidecar, io, model = fixture
    captured = {}
    modules = {
        "x_embedder": (model.patch_embed.proj, lambda o: o.flatten(2).transpose(1, 2)),
        "t_embedder": (model.time_embedding, None),
        "y_embedder": (model.caption_projection, lambda o: o.unsqueeze(1)),
        "y_emb_preprocess": (model.caption_refiner, None),
        "pooled_y_emb_process": (model.pooled_caption_projection, None),
        "patch_mixer_last_block": (model.patch_mixer_blocks[-1], None),
        "patch_mixer_map_xout": (model.patch_mixer_proj_out, None),
        "backbone_last_block": (model.transformer_blocks[-1], None),
        "final_layer": (model.proj_out, None),
    }
    hooks = [
        module.register_forward_hook(lambda m, a, o, name=name, f=f: captured.__setitem__(name, f(o) if f else o))
        for name, (module, f) in modules.items()
    ]
    with torch.no_grad():
        model(io["inputs.x"], io["inputs.t"], io["inputs.y"], keep_ids=io[keep_ids] if keep_ids else None)
    for hook in hooks:
        hook.remove()
    for name in modules:
        assert_close(captured[name], io[f"{prefix}.{name}"], sidecar["tolerances"]["intermediates"], f"{prefix}.{name}")


def test_edm_denoiser_matches_original(fixture):
    sidecar, io, model = fixture
    scheduler = EDMHeunScheduler()
    x, sigma, y = io["edm.x_noisy"], io["edm.sigma"], io["inputs.y"]
    sigma4 = sigma.reshape(-1, 1, 1, 1)
    with torch.no_grad():
        raw = model(scheduler.precondition_inputs(x, sigma4), scheduler.precondition_noise(sigma), y).sample
    denoised = scheduler.precondition_outputs(x, raw, sigma4)
    assert_close(denoised, io["edm.denoised"], sidecar["tolerances"]["edm_denoiser"], "edm.denoised")


def test_random_keep_ids_reproduce_original_get_mask():
    sidecar, _, io = load_microdit_fixture()
    torch.manual_seed(sidecar["hyper"]["seeds"]["mask"])
    keep_ids = get_random_keep_ids(2, 64, sidecar["hyper"]["mask_ratio"])
    assert torch.equal(keep_ids, io["mask.ids_keep"])


def test_reference_architectures_convert_key_for_key():
    """Every original key/shape of the official XL (4/16 ch, 256/512 px) and Tiny models maps onto ours exactly."""
    reference = json.loads((MICRODIT_FIXTURES / "microdit_reference_architectures.json").read_text())
    architectures = {name: arch for name, arch in reference.items() if "factory" in arch}
    assert len(architectures) == 4
    for name, arch in architectures.items():
        kwargs = arch["factory_kwargs"]
        original = {k: torch.empty(shape, device="meta") for k, shape in arch["state_dict"].items()}
        config, converted = convert_microdit_checkpoint(original, {"pos_interp_scale": kwargs["pos_interp_scale"]})
        with torch.device("meta"):
            preset = MicroDiTTransformer2DModel.from_preset(
                arch["factory"],
                sample_size=kwargs["input_size"],
                in_channels=kwargs["in_channels"],
                pos_interp_scale=kwargs["pos_interp_scale"],
            )
            inferred = MicroDiTTransformer2DModel(**config)
        expected = {k: tuple(v.shape) for k, v in preset.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in converted.items()} == expected, name
        assert public_config(inferred) == public_config(preset), name
        assert sum(p.numel() for p in preset.parameters()) == arch["num_parameters"], name


def test_conversion_unwraps_checkpoints_and_infers_pos_interp_scale(tmp_path):
    sidecar, state_dict, io = load_microdit_fixture()
    kwargs = dict(sidecar["constructor"]["kwargs"])
    del kwargs["pos_interp_scale"]
    # A Composer-style run checkpoint: `dit.` prefix, VAE / text-encoder entries alongside, pickled.
    wrapped = {"state": {"model": {**{f"dit.{k}": v for k, v in state_dict.items()}, "vae.w": torch.zeros(1)}}}
    torch.save(wrapped, tmp_path / "latest-rank0.pt")
    model = MicroDiTTransformer2DModel.from_original(tmp_path / "latest-rank0.pt", kwargs)
    assert model.config.pos_interp_scale == 1.0
    with torch.no_grad():
        out = model(io["inputs.x"], io["inputs.t"], io["inputs.y"]).sample
    torch.testing.assert_close(out, io["out.sample"], atol=7e-5, rtol=1e-4)

    # 512-px checkpoints store positions interpolated by 2; the converter reads that off the buffer ...
    rescaled = dict(state_dict, pos_embed=microdit_2d_sincos_pos_embed(48, 8, 8, 2.0).unsqueeze(0))
    assert MicroDiTTransformer2DModel.from_original(rescaled, kwargs).config.pos_interp_scale == 2.0
    # ... and refuses a stated value that contradicts the weights.
    with pytest.raises(ValueError, match="pos_interp_scale"):
        MicroDiTTransformer2DModel.from_original(rescaled, {**kwargs, "pos_interp_scale": 1.0})


def test_conversion_errors_are_clear():
    _, state_dict, _ = load_microdit_fixture()
    with pytest.raises(ValueError, match="micro_diffusion DiT checkpoint"):
        MicroDiTTransformer2DModel.from_original({"foo": torch.zeros(1)})
    with pytest.raises(ValueError, match="Unknown original DiT arguments"):
        MicroDiTTransformer2DModel.from_original(state_dict, {"hidden_size": 48})


def test_presets_and_bad_config():
    with torch.device("meta"):
        tiny = MicroDiTTransformer2DModel.from_preset("MicroDiT_Tiny_2")
    assert sum(p.numel() for p in tiny.parameters()) == 200_692_752
    assert len(tiny.transformer_blocks) == 16 and len(tiny.patch_mixer_blocks) == 4
    with pytest.raises(ValueError, match="Unknown MicroDiT preset"):
        MicroDiTTransformer2DModel.from_preset("MicroDiT_Huge")
    with pytest.raises(ValueError, match="divisible by attention_head_dim"):
        MicroDiTTransformer2DModel(hidden_size=30, attention_head_dim=8, num_layers=2)


def test_non_square_latents_use_positions_of_their_own_grid():
    model = tiny_transformer()
    x, y = torch.randn(2, 4, 8, 12), torch.randn(2, 5, 32)
    with torch.no_grad():
        out = model(x, torch.tensor([0.1, -0.3]), y)
    assert out.sample.shape == (2, 4, 8, 12)
    wide, square = model.pos_embed(4, 6, "cpu")[0], model.pos_embed(6, 6, "cpu")[0]
    torch.testing.assert_close(wide.view(4, 6, -1), square.view(6, 6, -1)[:4])
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        model(torch.randn(1, 4, 7, 8), torch.zeros(1), y[:1])


def test_keep_ids_validation():
    model = tiny_transformer()
    x, t, y = torch.randn(2, 4, 8, 8), torch.zeros(2), torch.randn(2, 5, 32)
    with pytest.raises(ValueError, match="long tensor"):
        model(x, t, y, keep_ids=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="keeps 17 patches"):
        model(x, t, y, keep_ids=torch.zeros(2, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="mask_ratio"):
        get_random_keep_ids(2, 16, 1.0)


def test_caption_mask_hides_padding():
    """With `encoder_attention_mask` the padded caption tokens change nothing: the output equals that of the caption
    cut to its tokens, whatever the padded states hold, in both masking modes; an all-ones mask is no mask."""
    model = tiny_transformer().double()
    generator = torch.Generator().manual_seed(0)
    x, y = (torch.randn(shape, generator=generator, dtype=torch.float64) for shape in [(2, 4, 8, 8), (2, 6, 32)])
    t = torch.tensor([0.3, -0.8], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    keep = get_random_keep_ids(2, 16, 0.5, generator=torch.Generator().manual_seed(0))
    junk = y.clone()
    junk[mask == 0] = 50.0
    with torch.no_grad():
        for keep_ids in (None, keep):
            masked = model(x, t, y, keep_ids=keep_ids, encoder_attention_mask=mask).sample
            padding_changed = model(x, t, junk, keep_ids=keep_ids, encoder_attention_mask=mask.bool()).sample
            torch.testing.assert_close(padding_changed, masked)
            for b, length in enumerate(mask.sum(1).tolist()):
                ids = None if keep_ids is None else keep_ids[b : b + 1]
                cut = model(x[b : b + 1], t[b : b + 1], y[b : b + 1, :length], keep_ids=ids).sample
                torch.testing.assert_close(masked[b : b + 1], cut)
            unmasked = model(x, t, y, keep_ids=keep_ids).sample
            all_kept = model(x, t, y, keep_ids=keep_ids, encoder_attention_mask=torch.ones(2, 6)).sample
            torch.testing.assert_close(all_kept, unmasked)
            assert not torch.allclose(masked, unmasked)
    with pytest.raises(ValueError, match="keep at least one"):
        model(x, t, y, encoder_attention_mask=torch.tensor([[1, 0, 0, 0, 0, 0], [0] * 6]))
    with pytest.raises(ValueError, match=r"\(batch, tokens\) = \(2, 6\)"):
        model(x, t, y, encoder_attention_mask=torch.ones(2, 5))


def test_caption_positions_make_word_order_visible():
    """Without caption positions (the original) the model sees a caption as a bag of token states: reordering them
    changes nothing. `caption_pos_embed_max_length` makes the order count; captions longer than it are refused."""
    generator = torch.Generator().manual_seed(0)
    x, y = (torch.randn(shape, generator=generator, dtype=torch.float64) for shape in [(2, 4, 8, 8), (2, 6, 32)])
    t = torch.tensor([0.3, -0.8], dtype=torch.float64)
    reordered = y[:, [2, 0, 1, 5, 3, 4]]
    original = tiny_transformer().double()
    assert original.caption_pos_embed is None
    assert not any("caption_pos_embed" in key for key in original.state_dict())
    positioned = tiny_transformer(caption_pos_embed_max_length=6).double()
    assert positioned.caption_pos_embed.shape == (1, 6, 32)
    with torch.no_grad():
        torch.testing.assert_close(original(x, t, reordered).sample, original(x, t, y).sample)
        assert not torch.allclose(positioned(x, t, reordered).sample, positioned(x, t, y).sample)
        assert positioned(x, t, y[:, :4]).sample.shape == x.shape  # shorter captions use the first positions
    with pytest.raises(ValueError, match="max_length=6 or fewer"):
        positioned(x, t, torch.zeros(2, 7, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="caption_pos_embed_max_length must be None"):
        tiny_transformer(caption_pos_embed_max_length=0)


def test_routing_is_per_sample():
    """Expert choice routes within each sample: a sample's output does not depend on its batch mates.

    In float64: outputs reach ~100, where float32 batched-vs-single rounding alone is ~2e-4 and a tolerance would
    depend on the draw; a routing difference would be of order one either way."""
    model = tiny_transformer().double()
    generator = torch.Generator().manual_seed(0)
    x, t, y = (torch.randn(shape, generator=generator, dtype=torch.float64) for shape in [(3, 4, 8, 8), (3,), (3, 5, 32)])
    keep = get_random_keep_ids(3, 16, 0.5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        batched = model(x, t, y, keep_ids=keep).sample
        single = model(x[1:2], t[1:2], y[1:2], keep_ids=keep[1:2]).sample
    torch.testing.assert_close(batched[1:2], single, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward(dtype):
    model = tiny_transformer()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([0.5, -1.0]), torch.randn(2, 5, 32)
    keep = get_random_keep_ids(2, 16, 0.75, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(x, t, y, keep_ids=keep).sample
        half = model.to(dtype)(x.to(dtype), t, y.to(dtype), keep_ids=keep).sample
    assert half.dtype == dtype and torch.isfinite(half).all()
    # Low precision may flip a few expert choices of this random network, so compare directions, not values.
    cosine = torch.nn.functional.cosine_similarity(half.float().flatten(), reference.flatten(), dim=0)
    assert cosine > 0.98


@pytest.mark.parametrize("masked", [False, True])
def test_gradient_checkpointing_gives_same_gradients(masked):
    model = tiny_transformer().train()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([0.2, -0.7]), torch.randn(2, 5, 32)
    keep = get_random_keep_ids(2, 16, 0.75, generator=torch.Generator().manual_seed(2)) if masked else None

    def gradients():
        model.zero_grad()
        model(x, t, y, keep_ids=keep).sample.square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = gradients()
    model.enable_gradient_checkpointing()
    assert model.is_gradient_checkpointing
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys() and len(plain) > 0
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=5e-6, rtol=1e-5, msg=name)


def test_save_load_round_trip_is_exact(tmp_path):
    model = tiny_transformer()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = MicroDiTTransformer2DModel.from_pretrained(tmp_path)
    assert public_config(loaded) == public_config(model)
    original, reloaded = model.state_dict(), loaded.state_dict()
    assert original.keys() == reloaded.keys()
    assert all(torch.equal(original[k], reloaded[k]) for k in original)
    generator = torch.Generator().manual_seed(0)  # inputs independent of the tests run before
    x, t, y = torch.randn(1, 4, 8, 8, generator=generator), torch.zeros(1), torch.randn(1, 5, 32, generator=generator)
    with torch.no_grad():
        # Bit-identical weights; the outputs may differ in the last bits only because memory-mapped tensors have
        # another alignment, which selects other CPU kernels.
        torch.testing.assert_close(loaded(x, t, y).sample, model(x, t, y).sample, atol=1e-4, rtol=1e-5)


class ManualMathProcessor:
    """Reference processor: explicit softmax(QK^T/sqrt(d))V, to check that processors are swappable."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
        k = attn.norm_k(attn.to_k(context)).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
        v = attn.to_v(context).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
        logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        if attention_mask is not None:  # (B, 1, 1, L) keep-mask
            logits = logits.masked_fill(~attention_mask, float("-inf"))
        weights = logits.softmax(dim=-1)
        return attn.to_out[0]((weights @ v).transpose(1, 2).flatten(2))


def test_attention_processors_are_swappable():
    model = tiny_transformer()
    x, t, y = torch.randn(2, 4, 8, 8), torch.zeros(2), torch.randn(2, 5, 32)
    caption_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    with torch.no_grad():
        reference = model(x, t, y).sample
        masked_reference = model(x, t, y, encoder_attention_mask=caption_mask).sample
        # 2 attentions per block (2 mixer + 3 backbone) + the caption refiner
        assert len(model.attn_processors) == 11
        with attention_backend("_native_math"):
            torch.testing.assert_close(model(x, t, y).sample, reference, atol=1e-4, rtol=1e-4)
        model.set_attn_processor(ManualMathProcessor())
        torch.testing.assert_close(model(x, t, y).sample, reference, atol=1e-4, rtol=1e-4)
        masked = model(x, t, y, encoder_attention_mask=caption_mask).sample
        torch.testing.assert_close(masked, masked_reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("masking, mixer_tokens", [("naive", 6), ("deferred", 16)])
def test_naive_masking_drops_tokens_before_the_patch_mixer_and_deferred_after_it(masking, mixer_tokens):
    model = tiny_transformer()  # 8x8 latents, patch 2: 16 tokens
    keep_ids = torch.stack([torch.randperm(16, generator=torch.Generator().manual_seed(i))[:6] for i in range(2)])
    seen = {}

    def record(name):
        def hook(module, args, kwargs):
            seen.setdefault(name, (args or tuple(kwargs.values()))[0].shape[1])  # tokens entering the block

        return hook

    handles = [
        model.patch_mixer_blocks[0].register_forward_pre_hook(record("mixer"), with_kwargs=True),
        model.transformer_blocks[0].register_forward_pre_hook(record("backbone"), with_kwargs=True),
    ]
    try:
        with torch.no_grad():
            out = model(
                torch.randn(2, 4, 8, 8), torch.zeros(2), torch.randn(2, 5, 32), keep_ids=keep_ids, masking=masking
            )
    finally:
        for handle in handles:
            handle.remove()
    assert seen == {"mixer": mixer_tokens, "backbone": 6}
    assert out.sample.shape == (2, 4, 8, 8) and out.mask.sum(dim=1).tolist() == [10.0, 10.0]
