"""Generate images with SDXL, optionally with LoRAs, learned tokens and consistency guidance.

    python sample.py --model DIR --prompt "a photo of a dog" --out dog.png
    python sample.py --model DIR --lora out/dog --prompt "a <dog> in the snow" --w-con 0,1,2,3,4 --n 2 --out grid.png
    python sample.py --model DIR --lora out/dog:1.0 --lora out/style:1.0 --prompt "a <dog> in flat cartoon style"

Seeds match diffusers: image i starts from torch.randn(..., generator=torch.Generator("cpu").manual_seed(seed + i)),
so the same settings give the same images as StableDiffusionXLPipeline given one generator per image,
generator=[torch.Generator().manual_seed(seed + i) for i in range(n)].
"""
import argparse
import json
import os
import re
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw
from PIL.PngImagePlugin import PngInfo

import lora as lora_lib
from checkpoint import (ModelError, atomic, check_file, check_parts_fit, check_schedule, component_config, load_unet,
                        load_vae, model_folder, read_metadata, read_single_file)
from cli import (Help, add_compile, add_cuda_graph, check_steps, cuda_graph_on, embeds_spec, finite, float_list,
                 lora_spec, number, positive_int, resolve_device, run, seed_int, split_spec)
from sampler import EULER, sample
from text import Cond, TextEncoders, time_ids
from vae import decode_latents


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=Help)
    p.add_argument("--model", required=True, help="SDXL folder in the official (diffusers) layout, or the single file")
    p.add_argument("--config", help="with a single-file --model: a folder with the SDXL configs and tokenizers")
    p.add_argument("--prompt", required=True, help="learned tokens as trained, e.g. \"a <dog> in the snow\"")
    p.add_argument("--negative-prompt", default="", help="empty: SDXL's zero unconditional embedding")
    p.add_argument("--lora", type=lora_spec, action="append", default=[], metavar="PATH[:SCALE]",
                   help="a LoRA file or a train.py output folder (its learned tokens load too, unless --embeds "
                        "names them); repeatable")
    p.add_argument("--embeds", type=embeds_spec, action="append", default=[],
                   metavar="FILE[:TOKEN[:INITWORD]]",
                   help="learned_embeds.safetensors; TOKEN/INITWORD are needed only if the file does not name them")
    p.add_argument("--w-con", type=float_list, help="consistency guidance scale; a comma list makes a grid")
    p.add_argument("--steps", type=positive_int, default=50, help="Euler steps")
    p.add_argument("--cfg", type=number, default=5.0, help="classifier-free guidance scale w_txt")
    p.add_argument("--seed", type=seed_int, default=0, help="of the first image's initial noise")
    p.add_argument("--n", type=positive_int, default=1,
                   help="images with seeds seed, seed+1, ... (a row each in a grid)")
    p.add_argument("--width", type=positive_int, default=1024, help="a multiple of 32 for SDXL")
    p.add_argument("--height", type=positive_int, default=1024, help="a multiple of 32 for SDXL")
    p.add_argument("--out", default="out.png", help="a PNG, its settings in its text")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="UNet and text encoders; auto: bfloat16 on GPU, float32 on CPU. The VAE stays float32.")
    add_compile(p)
    add_cuda_graph(p, "each UNet call")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if os.path.isdir(args.out):
        p.error(f"--out {args.out} is a folder; give the image's file name")
    if not args.out.lower().endswith(".png"):
        p.error(f"--out {args.out}: the image is a PNG (its text holds the settings); give a name ending in .png")
    if args.w_con is not None and not (args.lora or args.embeds):  # it contrasts them with the base model
        p.error("--w-con needs what was fine-tuned: --lora or --embeds")
    check_steps(p, "--steps", args.steps)
    if args.seed + args.n > 2 ** 64:  # image i's generator is seeded with seed + i
        p.error("--seed must be a whole number from 0 to 2^64 - n")
    return args


def load_sdxl(model, device, dtype, config=None):
    """UNet and text encoders in dtype; the VAE in float32 (SDXL's VAE overflows in float16). model: a folder in the
    diffusers layout, or the official single file with config, a folder with that layout's configs and tokenizers."""
    folder, single = model_folder(model, config)
    check_parts_fit(folder)
    parts = read_single_file(single) if single else {}
    return (load_unet(folder, dtype, device, parts.get("unet")),
            load_vae(folder, torch.float32, device, parts.get("vae")),
            TextEncoders(folder, dtype, device, parts or None))


@dataclass
class Pipeline:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text: TextEncoders
    tokens: dict = field(default_factory=dict)  # learned token -> its initializer word (or None)
    folded: bool = False  # LoRAs folded into the weights: the base model is gone (no consistency guidance)


def load_embeds(pipe, path, token=None, init=None):
    """Add a learned token from its file; token and init (its initializer word) default to the file's metadata."""
    meta = read_metadata(path)
    token, init = token or meta.get("token"), init or meta.get("init_token")
    if not token:  # the official code's files name no token
        raise ModelError(f"{path}: the file does not name its token; load it with --embeds {path}:TOKEN:INITWORD")
    if token in pipe.tokens:
        raise ModelError(f"{path}: the token {token!r} is already loaded; give each learned token once")
    pipe.text.load_embeds(path, token)
    pipe.tokens[token] = init  # None if unknown: then the token has no base prompt


def folder_embeds(folder):
    """The learned_embeds*.safetensors files a train.py / merge.py output folder holds."""
    return [os.path.join(folder, f) for f in sorted(os.listdir(folder))
            if f.startswith("learned_embeds") and f.endswith(".safetensors")]


def with_folder_embeds(embeds, paths):
    """The --embeds specs, then the learned tokens of each output folder among paths, except the files --embeds names
    itself (to give their tokens, say, where the files name none)."""
    given = {os.path.realpath(split_spec(e, 1)[0]) for e in embeds}
    found = [f for p in paths if os.path.isdir(p) for f in folder_embeds(p)]
    return [*embeds, *(f for f in found if os.path.realpath(f) not in given)]


def check_scheduler(model, config=None):
    """Refuse a training schedule other than SDXL's (checkpoint.check_schedule), and warn of sampling settings other
    than this sampler's."""
    scheduler = check_schedule(model_folder(model, config)[0])
    other = {k: scheduler[k] for k, v in EULER.items() if k in scheduler and scheduler[k] != v}
    if other:  # a fine-tune shipped with, say, DPM++ or Karras sigmas: diffusers' pipeline would sample with those
        warnings.warn(f"the model's scheduler config asks for {other}; this sampler is SDXL base's Euler ({EULER}), "
                      "so its images differ from those of diffusers' pipeline with that scheduler")


def load_pipeline(model, loras=(), embeds=(), device="auto", dtype="auto", config=None, fold=False):
    """The base model plus LoRAs ('PATH[:SCALE]', summed exactly) and learned tokens ('FILE[:TOKEN[:INIT]]'). With
    fold, the LoRAs are folded into the weights (see lora.apply_lora): plain CFG runs them at scale 1 throughout, and
    each layer is then one matmul again (consistency guidance needs them apart)."""
    device, dtype = resolve_device(device, dtype)
    check_scheduler(model, config)
    pipe = Pipeline(*load_sdxl(model, device, dtype, config))
    files, weights = [], []
    for spec in loras:
        path, scale = split_spec(spec, 2)
        files.append(lora_lib.read_lora(path, pipe.unet.cfg))
        weights.append(finite(scale) if scale else 1.0)
        if weights[-1] is None:
            raise ModelError(f"--lora {spec}: the scale {scale!r} is not a number")
    if files:
        lora_lib.apply_lora(pipe.unet, lora_lib.merge(files, weights), dtype, fold)
        pipe.folded = fold
    loaded = set()
    for spec in with_folder_embeds(embeds, [split_spec(spec, 2)[0] for spec in loras]):  # a folder's tokens come along
        path, *names = split_spec(spec, 3)
        check_file(path)
        with open(path, "rb") as f:
            key = (f.read(), *names)
        if key not in loaded:  # the same file given twice (a run and a merge that carries its token, say): once
            loaded.add(key)
            load_embeds(pipe, path, *names)
    return pipe


def token_pattern(tokens):
    """The learned tokens as CLIP's tokenizer finds them in a prompt: in any case (it lowercases the prompt), also
    inside a word, and the longest where two overlap."""
    return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)), re.IGNORECASE)


def base_prompt(tokens, prompt):
    """c_base: the prompt with every learned token replaced by its initializer word (tokens: {token: word or None})."""
    if not tokens:
        return prompt
    named = {token.lower(): token for token in tokens}

    def word(match):
        token = named[match.group(0).lower()]
        if tokens[token] is None:  # the base model must not see the learned embedding
            raise ModelError(f"{token!r} has no initializer word for the base prompt; load it as FILE:{token}:WORD")
        return tokens[token]
    return token_pattern(tokens).sub(word, prompt)


def warn_unloaded_tokens(pipe, prompt):
    """A <word> the model has no token for is read letter by letter: right for a LoRA trained without --token (the
    word is then a rare identifier, as "sks" is), wrong for one whose learned embeddings were not loaded."""
    for word in pipe.text.unknown_tokens(prompt):
        warnings.warn(f"{word} is not a learned token of this model and is read letter by letter; if its LoRA learned "
                      "it, load the LoRA's output folder or give --embeds FILE")


def warn_unused_tokens(pipe, prompt):
    """Learned tokens loaded and none of them in the prompt: the LoRA still applies, but with textual inversion the
    subject it learned answers to its token."""
    if pipe.tokens and not token_pattern(pipe.tokens).search(prompt):
        warnings.warn(f"the prompt names none of the learned tokens loaded ({', '.join(pipe.tokens)}); the LoRA still "
                      "applies, but the subject it learned answers to its token")


def conditioning(text, prompts, height, width, zero_empty=False):
    """Cond for prompts at a target size, with SDXL's default micro-conditioning: uncropped, original = target."""
    context, pooled = text.encode(prompts, zero_empty=zero_empty)
    ids = time_ids((height, width), (0, 0), (height, width)).expand(len(prompts), -1)
    return Cond(context, pooled, ids.to(context.device))


def initial_noise(n, vae, height, width, seed):
    """The latents diffusers starts from: a CPU draw, so a seed means the same on every device."""
    f = vae.cfg.downscale
    return torch.randn((n, vae.cfg.latent_channels, height // f, width // f),
                       generator=torch.Generator("cpu").manual_seed(seed))


def size_multiple(unet_cfg, vae_cfg):
    """Image sides must be multiples of this: the VAE's down-sampling times the UNet's (SDXL: 8 x 4 = 32)."""
    return vae_cfg.downscale * unet_cfg.downscale


def check_sides(model, config, **sides):
    """Refuse image sides (--name value) that are not multiples of size_multiple, from the model's configs alone: before
    the weights load."""
    folder = model_folder(model, config)[0]
    multiple = size_multiple(component_config(folder, "unet"), component_config(folder, "vae"))
    bad = {name: v for name, v in sides.items() if v % multiple}
    if bad:
        given = " and ".join(f"--{name} {v}" for name, v in bad.items())
        raise ModelError(f"{given} must be {'a multiple' if len(bad) == 1 else 'multiples'} of {multiple} for this "
                         "model")


@torch.no_grad()
def generate(pipe, prompt, seeds, w_con=None, cfg=5.0, steps=50, width=1024, height=1024, negative_prompt="",
             progress=False, graph=False):
    """Images (len(seeds), 3, H, W) in [0, 1], one per seed, sampled in one batch."""
    seeds = [seeds] if isinstance(seeds, int) else list(seeds)
    multiple = size_multiple(pipe.unet.cfg, pipe.vae.cfg)
    if width % multiple or height % multiple:
        raise ModelError(f"width and height must be multiples of {multiple} for this model")
    if w_con is not None and pipe.folded:
        raise ModelError("consistency guidance needs the LoRAs apart from the base weights: load them without fold")
    n, device = len(seeds), next(pipe.unet.parameters()).device
    cond = conditioning(pipe.text, [prompt] * n, height, width)
    base = None if w_con is None else conditioning(pipe.text, [base_prompt(pipe.tokens, prompt)] * n, height, width)
    uncond = conditioning(pipe.text, [negative_prompt] * n, height, width, zero_empty=True)
    noise = torch.cat([initial_noise(1, pipe.vae, height, width, s) for s in seeds]).to(device)
    latents = sample(pipe.unet, noise, cond, uncond, steps=steps, w_txt=cfg, w_con=w_con, base=base,
                     progress=progress, graph=graph)
    return decode_latents(pipe.vae, latents)


def to_pil(images):
    """(B, 3, H, W) in [0, 1] -> one PIL image, the batch side by side; rounding as diffusers does."""
    arr = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(np.concatenate(list(arr), axis=1))


def grid(columns, labels):
    """columns: per label, images (rows, 3, H, W) -> one image, a labelled column per label, a row per seed."""
    rows = torch.cat([torch.cat(list(col), dim=-2)[None] for col in columns])  # (cols, 3, rows*H, W)
    body = to_pil(rows)
    w, top = body.width // len(columns), 14
    out = Image.new("RGB", (body.width, body.height + top), "white")
    out.paste(body, (0, top))
    draw = ImageDraw.Draw(out)
    for i, label in enumerate(labels):
        draw.text((i * w + 2, 1), label, fill="black")
    return out


def save_png(image, path, settings):
    info = PngInfo()
    info.add_text("parameters", json.dumps(settings))
    with atomic(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def main(args):
    args.cuda_graph = cuda_graph_on(args.cuda_graph, resolve_device(args.device, args.dtype)[0])
    check_sides(args.model, args.config, width=args.width, height=args.height)
    pipe = load_pipeline(args.model, args.lora, args.embeds, args.device, args.dtype, args.config,
                         fold=args.w_con is None)
    if args.compile:
        pipe.unet.compile_blocks()
    warn_unloaded_tokens(pipe, args.prompt)
    warn_unused_tokens(pipe, args.prompt)
    seeds = [args.seed + i for i in range(args.n)]
    kw = dict(cfg=args.cfg, steps=args.steps, width=args.width, height=args.height,
              negative_prompt=args.negative_prompt, progress=not args.quiet, graph=args.cuda_graph)
    ws = args.w_con or [None]  # None: plain CFG
    columns = [generate(pipe, args.prompt, seeds, w, **kw) for w in ws]
    image = to_pil(columns[0]) if len(ws) == 1 else grid(columns, [f"w_con={w:g}" for w in ws])
    save_png(image, args.out, {k: v for k, v in vars(args).items() if k not in ("quiet", "compile", "cuda_graph")})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run(main, parse_args)
