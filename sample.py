"""Generate images with SDXL: python sample.py --model DIR --prompt "a photo of a dog" --out dog.png

Seeds match diffusers: the initial latents are drawn on the CPU with torch.Generator("cpu").manual_seed(seed),
so the same settings give the same image as StableDiffusionXLPipeline.
"""
import argparse
import json
import sys

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from checkpoint import ModelError, load_unet, load_vae
from sampler import sample
from text import Cond, TextEncoders, time_ids
from vae import decode_latents


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="SDXL folder in the official (diffusers) layout")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="", help="empty: SDXL's zero unconditional embedding")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--cfg", type=float, default=5.0, help="classifier-free guidance scale w_txt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--n", type=int, default=1, help="images, laid out in a row")
    p.add_argument("--out", default="out.png")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="UNet and text encoders; auto: bfloat16 on GPU, float32 on CPU. The VAE stays float32.")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def resolve_device(device, dtype):
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return torch.device(device), getattr(torch, dtype)


def load_sdxl(folder, device, dtype):
    """UNet and text encoders in dtype; the VAE in float32 (SDXL's VAE overflows in float16)."""
    return load_unet(folder, dtype, device), load_vae(folder, torch.float32, device), TextEncoders(folder, dtype, device)


def conditioning(text, prompts, height, width, zero_empty=False):
    """Cond for prompts at a target size, with SDXL's default micro-conditioning: uncropped, original = target."""
    context, pooled = text.encode(prompts, zero_empty=zero_empty)
    ids = time_ids((height, width), (0, 0), (height, width)).expand(len(prompts), 6)
    return Cond(context, pooled, ids.to(context.device))


def initial_noise(n, vae, height, width, seed):
    """The latents diffusers starts from: a CPU draw, so a seed means the same on every device."""
    f = vae.cfg.downscale
    return torch.randn((n, vae.cfg.latent_channels, height // f, width // f),
                       generator=torch.Generator("cpu").manual_seed(seed))


def to_pil(images):
    """(B, 3, H, W) in [0, 1] -> one PIL image, the batch side by side; rounding as diffusers does."""
    arr = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(np.concatenate(list(arr), axis=1))


def save_png(image, path, settings):
    info = PngInfo()
    info.add_text("parameters", json.dumps(settings))
    image.save(path, pnginfo=info)


def main(args):
    device, dtype = resolve_device(args.device, args.dtype)
    unet, vae, text = load_sdxl(args.model, device, dtype)
    multiple = vae.cfg.downscale * 2 ** (len(unet.cfg.channel_mult) - 1)
    if args.width % multiple or args.height % multiple:
        raise ModelError(f"--width and --height must be multiples of {multiple} for this model")

    with torch.no_grad():
        cond = conditioning(text, [args.prompt] * args.n, args.height, args.width)
        uncond = conditioning(text, [args.negative_prompt] * args.n, args.height, args.width, zero_empty=True)
    noise = initial_noise(args.n, vae, args.height, args.width, args.seed).to(device)
    latents = sample(unet, noise, cond, uncond, steps=args.steps, cfg=args.cfg, progress=not args.quiet)
    with torch.no_grad():
        images = decode_latents(vae, latents)
    save_png(to_pil(images), args.out, {k: v for k, v in vars(args).items() if k not in ("quiet",)})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    try:
        main(parse_args())
    except ModelError as e:
        sys.exit(f"error: {e}")
