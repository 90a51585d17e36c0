"""Euler sampling as SDXL ships it (diffusers' EulerDiscreteScheduler: "leading" spacing, steps_offset 1).

In the sigma parametrisation x = x_0 + sigma * eps, with sigma_t = sqrt((1 - a_t) / a_t):
  - start from pure noise scaled by sqrt(sigma_max^2 + 1),
  - feed the UNet x / sqrt(sigma^2 + 1) (which is the DDPM x_t it was trained on),
  - step along the predicted noise: x <- x + (sigma_next - sigma) * eps_hat.
"""
import contextlib

import numpy as np
import torch
from tqdm import tqdm

from dco import NUM_TRAIN_TIMESTEPS, alphas_cumprod
from graph import cuda_graph
from lora import lora_scale
from text import Cond

# SDXL base's scheduler_config.json, in the fields that set the sampling steps: what euler_schedule implements.
EULER = {"_class_name": "EulerDiscreteScheduler", "timestep_spacing": "leading", "steps_offset": 1,
         "interpolation_type": "linear", "use_karras_sigmas": False, "use_exponential_sigmas": False,
         "use_beta_sigmas": False, "final_sigmas_type": "zero"}


def euler_schedule(steps):
    """timesteps (steps,) in "leading" spacing, descending to 1: 958, 925, ..., 34, 1 for 30 steps;
    sigmas (steps + 1,): the training schedule's sigma at each timestep, then a final 0."""
    if not 1 <= steps <= NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"steps must be in 1..{NUM_TRAIN_TIMESTEPS}, got {steps}")
    a_bar = alphas_cumprod()
    ratio = NUM_TRAIN_TIMESTEPS // steps
    timesteps = (np.arange(steps) * ratio)[::-1] + EULER["steps_offset"]
    train_sigmas = ((1 - a_bar) / a_bar).sqrt().numpy()
    # a lookup, as the timesteps are whole numbers; interp (as diffusers) also holds the last sigma for t = 1000,
    # the first timestep at 1000 steps
    sigmas = np.interp(timesteps, np.arange(NUM_TRAIN_TIMESTEPS), train_sigmas)
    sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
    return torch.from_numpy(timesteps.astype(np.float32)), torch.from_numpy(sigmas)


def scale_input(x, sigma):
    return x / (sigma ** 2 + 1) ** 0.5


def euler_step(x, eps, sigma, sigma_next):
    """One Euler step of dx/dsigma = eps."""
    return x + (sigma_next - sigma) * eps


def guidance(eps_uncond, eps_cond, w_txt, eps_lora=None, w_con=0.0):
    """Classifier-free guidance, eps_uncond + w_txt (eps_cond - eps_uncond), both from one model (in plain CFG, the
    fine-tuned one, the second on the prompt c). With eps_lora, the paper's consistency guidance: the first two are
    the frozen model on the empty and the base prompt, and the fine-tuned model's pull on the prompt is added:
    eps_hat = eps_phi(x; 0) + w_txt (eps_phi(x; c_base) - eps_phi(x; 0))
                            + w_con (eps_theta(x; c) - eps_phi(x; c_base))."""
    eps = eps_uncond + w_txt * (eps_cond - eps_uncond)
    if eps_lora is not None:
        eps = eps + w_con * (eps_lora - eps_cond)
    return eps


@torch.no_grad()
def sample(unet, noise, cond: Cond, uncond: Cond, steps=30, w_txt=5.0, w_con=None, base: Cond = None,
           progress=True, graph=False):
    """Denoise noise (B, 4, h, w); returns clean latents (B, 4, h, w), float32.

    w_con None: classifier-free guidance with the model as loaded (LoRA on), one batch [uncond, cond].
    w_con a number: consistency guidance, one batch [uncond, base, cond] run with per-sample LoRA scales
    (0, 0, 1): the frozen model on the empty and the base prompt (learned tokens replaced by their
    initializer words), the fine-tuned model on the prompt.
    graph: replay the UNet call from a CUDA graph (graph.py)."""
    dtype = next(unet.parameters()).dtype
    B = noise.shape[0]
    timesteps, sigmas = euler_schedule(steps)
    x = noise.float() * (sigmas.max() ** 2 + 1) ** 0.5
    if w_con is None:
        conds, lora_setting = [uncond, cond], contextlib.nullcontext()
    else:
        conds = [uncond, base, cond]
        # The batch is [uncond | base | cond], B each: Cond.cat, x.repeat and these scales (repeat_interleave) share
        # that layout, and chunk() below splits it back.
        scales = torch.tensor([0.0, 0.0, 1.0], device=x.device, dtype=dtype).repeat_interleave(B)
        lora_setting = lora_scale(unet, scales)
    batch = Cond.cat(conds).to(device=x.device, dtype=dtype)

    def denoise(x_in, t):
        return unet(x_in, t, batch.context, batch.pooled, batch.time_ids)

    with lora_setting:
        if graph:  # recorded inside `lora_setting`: the graph replays the call with these LoRA scales
            denoise = cuda_graph(denoise, noise.repeat(len(conds), 1, 1, 1).to(dtype), timesteps[0].to(x.device))
        for i in tqdm(range(steps), desc="sampling", disable=not progress):
            x_in = scale_input(x, sigmas[i]).repeat(len(conds), 1, 1, 1).to(dtype)
            eps = denoise(x_in, timesteps[i].to(x.device)).float().chunk(len(conds))
            if w_con is None:  # (uncond, cond), both with the LoRA on
                eps_hat = guidance(eps[0], eps[1], w_txt)
            else:  # (uncond, base) from the frozen model, the prompt from the fine-tuned one
                eps_hat = guidance(eps[0], eps[1], w_txt, eps[2], w_con)
            x = euler_step(x, eps_hat, sigmas[i], sigmas[i + 1])
    return x
