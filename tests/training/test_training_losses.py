"""The EDM training loss against the original `edm_loss` for the recorded random draws."""

import torch
from helpers import fixture_transformer, load_microdit_fixture

from diffusers_microdit import EDMHeunScheduler, get_random_keep_ids
from diffusers_microdit.training.losses import edm_loss, sample_edm_sigmas


def test_edm_loss_matches_original_masked_and_unmasked():
    sidecar, _, io = load_microdit_fixture()
    config = sidecar["hyper"]["edm_config"]
    rtol = sidecar["tolerances"]["edm_loss"]["rtol"]
    model, scheduler = fixture_transformer(), EDMHeunScheduler()
    sigmas = (io["loss.rnd_normal"] * config["P_std"] + config["P_mean"]).exp()
    torch.testing.assert_close(sigmas, io["loss.sigma"], rtol=1e-6, atol=0)
    args = (model, scheduler, io["loss.x0"], io["inputs.y"], sigmas, io["loss.noise"])
    with torch.no_grad():
        unmasked, _ = edm_loss(*args)
        masked, per_sample = edm_loss(*args, keep_ids=io["loss.ids_keep"])
    for name, value in (("value_unmasked", unmasked), ("value_masked", masked)):
        print(f"loss.{name}: {value.item():.8f} vs {io[f'loss.{name}'].item():.8f}")
        torch.testing.assert_close(value.reshape(1), io[f"loss.{name}"], rtol=rtol, atol=0)
    torch.testing.assert_close(per_sample, io["loss.per_sample_masked"], rtol=rtol, atol=0)


def test_draws_reproduce_original_order():
    """sigma, noise, then the mask: the same global-RNG order as the original `edm_loss`."""
    sidecar, _, io = load_microdit_fixture()
    config = sidecar["hyper"]["edm_config"]
    torch.manual_seed(sidecar["hyper"]["seeds"]["loss"])
    sigmas = sample_edm_sigmas(2, config["P_mean"], config["P_std"])
    torch.testing.assert_close(sigmas, io["loss.sigma"], rtol=1e-6, atol=0)
    torch.testing.assert_close(torch.randn_like(io["loss.x0"]), io["loss.noise"])
    assert torch.equal(get_random_keep_ids(2, 64, sidecar["hyper"]["mask_ratio"]), io["loss.ids_keep"])
