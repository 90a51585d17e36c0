"""The diffusion training objective: DDPM noising and the Direct Consistency Optimization loss.

    q_sample:  x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps,  a_t = prod_{s<=t} (1 - beta_s)   (Ho et al. 2020, eq. 4)
    dco_loss:  L = -log sigmoid(-beta (||eps - eps_theta(x_t; c)||^2 - ||eps - eps_phi(x_t; c_base)||^2))
               eps_theta: the model with LoRA; eps_phi: the frozen pretrained model (LoRA scale 0, no grad).

Two betas: beta_s above is the noise schedule's; beta in dco_loss (--beta, 1000 in the paper) is DCO's strength of the
pull toward the frozen model.

The squared errors are per-sample means over the latent (B,), and the loss is averaged over the batch afterwards:
the paper's expectation of a per-sample loss. The official code averages the errors over the batch before the
sigmoid; the two agree at batch size 1, its default.
"""
import torch
import torch.nn.functional as F

NUM_TRAIN_TIMESTEPS = 1000
BETA_START, BETA_END = 0.00085, 0.012  # SDXL's scheduler_config.json


def alphas_cumprod():
    """SDXL's "scaled linear" schedule: sqrt(beta) linear in t. Returns a_t = prod(1 - beta_s), (1000,) float32."""
    betas = torch.linspace(BETA_START ** 0.5, BETA_END ** 0.5, NUM_TRAIN_TIMESTEPS, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def q_sample(x0, t, noise, a_bar=None):
    """Noise clean latents x0 (B, C, H, W) to integer timesteps t (B,) with noise eps."""
    a = (alphas_cumprod() if a_bar is None else a_bar).to(x0.device)[t].view(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def offset_noise(shape, strength, generator=None):
    """eps + strength * (per-channel constant): lets the model learn very dark or bright images (style runs)."""
    noise = torch.randn(shape, generator=generator)
    if strength:
        noise = noise + strength * torch.randn(shape[:2] + (1, 1), generator=generator)
    return noise


def eps_mse(eps_pred, eps):
    """||eps - eps_pred||^2 as a per-sample mean over all latent elements: (B,)."""
    return (eps_pred.float() - eps.float()).pow(2).flatten(1).mean(1)


def min_snr_weight(t, gamma, a_bar=None):
    """Min-SNR-gamma loss weight for eps-prediction, min(SNR_t, gamma) / SNR_t (Hang et al. 2023)."""
    a = (alphas_cumprod() if a_bar is None else a_bar).to(t.device)[t]
    snr = a / (1 - a)
    return snr.clamp(max=gamma) / snr


def dco_loss(err_theta, err_phi, beta):
    """DCO, the paper's objective: -log sigmoid(-beta (err_theta - err_phi)), per sample (B,).
    Its gradient is beta * sigmoid(beta * margin) * d(err_theta), margin = err_theta - err_phi (err_phi has none): the
    plain denoising gradient, weighted toward 0 once the LoRA model beats the frozen one on the sample (margin < 0)
    and toward beta while it is worse. At margin 0 (the start) the loss is ln 2 and the weight beta / 2."""
    return -F.logsigmoid(-beta * (err_theta - err_phi))


def diffusion_loss(err_theta, err_phi, beta):
    """The per-sample loss of a run: DCO for beta > 0, the plain denoising loss (DreamBooth-LoRA) for beta = 0."""
    return dco_loss(err_theta, err_phi, beta) if beta > 0 else err_theta
