"""The noising process and the DCO loss: identities and hand-computed values."""
import math

import pytest
import torch

import lora as lora_lib
from dco import alphas_cumprod, dco_loss, diffusion_loss, eps_mse, min_snr_weight, offset_noise, q_sample
from unet_sdxl import UNet, UNetConfig


def test_schedule_and_q_sample_match_ddpm_reference():
    from diffusers import DDPMScheduler
    ref = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    torch.testing.assert_close(alphas_cumprod(), ref.alphas_cumprod, rtol=0, atol=0)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    torch.testing.assert_close(q_sample(x0, t, noise), ref.add_noise(x0, noise, t), rtol=1e-6, atol=1e-6)


def test_hand_computed_loss():
    # beta (err_theta - err_phi) = 10 * (0.3 - 0.1) = 2  ->  -log sigmoid(-2) = log(1 + e^2)
    loss = dco_loss(torch.tensor([0.3, 0.1]), torch.tensor([0.1, 0.3]), beta=10.0)
    assert loss[0].item() == pytest.approx(math.log(1 + math.e ** 2), rel=1e-6)
    assert loss[1].item() == pytest.approx(math.log(1 + math.e ** -2), rel=1e-6)
    err = torch.tensor([0.25, 0.5])
    assert torch.equal(diffusion_loss(err, torch.zeros(2), beta=0.0), err)  # beta = 0: the plain loss
    # per sample, over all of its latent: (0 + 0) / 2 and (4 + 16) / 2
    assert eps_mse(torch.tensor([[[0.0, 0.0]], [[2.0, 4.0]]]), torch.zeros(2, 1, 2)).tolist() == [0.0, 10.0]


def test_dco_gradient_is_the_plain_one_weighted_by_sigmoid_of_the_margin():
    # d/d err_theta of -log sigmoid(-beta m), m = err_theta - err_phi: beta sigmoid(beta m) = beta / (1 + e^(-beta m))
    err_theta = torch.tensor([0.3, 0.1, 0.2], requires_grad=True)
    dco_loss(err_theta, torch.tensor([0.1, 0.3, 0.2]), beta=10.0).sum().backward()
    expected = [10 / (1 + math.e ** -2), 10 / (1 + math.e ** 2), 5.0]  # worse than the frozen model, better, equal
    assert err_theta.grad.tolist() == pytest.approx(expected, rel=1e-6)


def test_min_snr_weight_and_offset_noise():
    a = alphas_cumprod()
    t = torch.tensor([10, 999])
    snr = a[t] / (1 - a[t])
    w = min_snr_weight(t, 5.0)
    assert w[0].item() == pytest.approx(5.0 / snr[0].item(), rel=1e-5)  # high SNR is capped
    assert w[1].item() == pytest.approx(1.0)  # low SNR keeps weight 1
    n0 = offset_noise((2, 4, 8, 8), 0.0, torch.Generator().manual_seed(0))
    n1 = offset_noise((2, 4, 8, 8), 0.1, torch.Generator().manual_seed(0))
    assert torch.equal(n0, torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0)))
    g = torch.Generator().manual_seed(0)  # the official code's draw: the noise, then an offset per sample and channel
    expected = torch.randn((2, 4, 8, 8), generator=g)
    assert torch.equal(n1, expected + 0.1 * torch.randn((2, 4, 1, 1), generator=g))


def test_dco_at_init_is_ln2_with_half_beta_gradient():
    """With B = 0 the LoRA model equals the reference: L = ln 2 and dL/dtheta = (beta / 2) d err_theta / dtheta."""
    torch.manual_seed(0)
    unet = UNet(UNetConfig.tiny()).requires_grad_(False)
    params = lora_lib.inject(unet, rank=4)
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    pooled, noise = torch.randn(2, 32, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    ids, t = torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2), torch.tensor([300, 700])
    beta = 1000.0
    err_theta = eps_mse(unet(x, t, ctx, pooled, ids), noise)
    with torch.no_grad(), lora_lib.lora_scale(unet, 0.0):
        err_phi = eps_mse(unet(x, t, ctx, pooled, ids), noise)
    loss = dco_loss(err_theta, err_phi, beta).mean()
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    grads = torch.autograd.grad(loss, params, retain_graph=True)
    plain = torch.autograd.grad((beta / 2) * err_theta.mean(), params)
    assert any(gr.abs().max() > 0 for gr in grads)
    for gr, want in zip(grads, plain):
        torch.testing.assert_close(gr, want, rtol=1e-4, atol=1e-8)
