"""A tiny SDXL pretrained on the toy world (toyworld.py) on a CPU, and the paper's experiments run on it.

    python toy.py [--out toy-sdxl] [--seed 0] [--quick]      pretrain (resumable) and save in the SDXL layout
    python toy.py data --subject 0 --out data/sub0           a held-out subject's training folder (NAME.png + NAME.txt)
    python toy.py data --style 0 --out data/sty0             a held-out style's single training image
    python toy.py compare [--model toy-sdxl] [--quick]       DreamBooth vs prior preservation vs DCO, in miniature

The model is SDXL's architecture shrunk (this project's unet_sdxl.py and vae.py, two small transformers CLIP text
encoders with a word-level tokenizer), saved in the official folder layout, so train.py, sample.py and merge.py use it
as they use SDXL. compare fine-tunes with train.py and samples through evaluate.py, scoring with toyworld's metrics.
"""
import argparse
import functools
import json
import os
import sys
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import evaluate
import toyworld as world
import train
from checkpoint import (SCHEDULE, ModelError, load_training_state, load_vae, read_json, read_metadata, save_component,
                        save_text_encoder, save_training_state, write_text)
from cli import Help, non_negative, positive_int, run, seed_int
from data import read_captions
from dco import NUM_TRAIN_TIMESTEPS, alphas_cumprod, eps_mse, min_snr_weight, q_sample
from sample import conditioning, initial_noise, load_sdxl, to_pil
from sampler import EULER, sample
from text import TextEncoders, time_ids
from unet_sdxl import UNet, UNetConfig
from vae import AutoencoderKL, VAEConfig, decode_latents

# ---------------------------------------------------------------------------------------------- tokenizers and models

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789<>!,."


def bpe(word, merges):
    """CLIP's byte-pair encoding of one word: repeatedly join the adjacent pair that comes first in merges."""
    rank = {m: i for i, m in enumerate(merges)}
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
        pairs = [(rank.get(p, len(rank)), i) for i, p in enumerate(zip(pieces, pieces[1:]))]
        best, i = min(pairs)
        if best == len(rank):
            break
        pieces[i:i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def write_tokenizer(folder, pad_token):
    """A word-level CLIP BPE tokenizer: every world word is one token; any other word (e.g. "<sub0>") falls back to
    single characters. Merges are appended last-first until BPE joins each word, so earlier words keep theirs."""
    vocab, merges = list(CHARS) + [c + "</w>" for c in CHARS], []
    for word in world.WORDS:
        while len(pieces := bpe(word, merges)) > 1:
            merges.append((pieces[0], pieces[1]))
            vocab.append(pieces[0] + pieces[1])
    vocab += ["<|startoftext|>", "<|endoftext|>"]  # the end token has the largest id, as in CLIP
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(dict.fromkeys(vocab))}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    from transformers import CLIPTokenizer  # here, not at the top: `toy.py data` and --help need no transformers
    tokenizer = CLIPTokenizer.from_pretrained(folder, pad_token=pad_token, model_max_length=77)
    tokenizer.save_pretrained(folder)
    return tokenizer


def text_encoder_configs(tokenizer):
    """Two tiny CLIP text encoders, shaped like SDXL's pair: CLIP-L (quick_gelu) and bigG with a projection."""
    from transformers import CLIPTextConfig
    common = dict(vocab_size=len(tokenizer), intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return (CLIPTextConfig(**common, hidden_size=32, hidden_act="quick_gelu"),
            CLIPTextConfig(**common, hidden_size=64, hidden_act="gelu", projection_dim=64))


def model_configs():
    """SDXL's architecture, shrunk. The autoencoder halves each side (SDXL's divides by 8): at 64x64 that keeps
    dots and stripes in the latents and trains in minutes. One norm group: with few channels, per-group
    normalization would erase the flat colors this world is made of."""
    vae = VAEConfig(block_out_channels=(16, 32), layers_per_block=1, norm_groups=1)  # (3, 64, 64) <-> (4, 32, 32)
    unet = UNetConfig(model_channels=16, channel_mult=(1, 2, 4, 4), num_res_blocks=1, transformer_depth=(0, 0, 1, 1),
                      head_dim=16, context_dim=32 + 64, pooled_dim=64, time_id_dim=16, norm_groups=4)
    return vae, unet


# ---------------------------------------------------------------------------------------------- pretraining

@dataclass(frozen=True)
class Budget:
    images: int  # rendered once; every step draws fresh noise on them
    vae_steps: int
    vae_batch: int  # 32x32 crops
    unet_steps: int
    unet_batch: int


FULL = Budget(images=10000, vae_steps=1500, vae_batch=16, unet_steps=1500, unet_batch=32)
QUICK = Budget(images=128, vae_steps=60, vae_batch=4, unet_steps=200, unet_batch=4)
LR = {"vae": 1e-2, "unet": 2e-3}
TRAIN_TEXT_ENCODERS = True  # jointly with the UNet: the tiny encoders start from random weights
CAPTION_DROPOUT = 0.1  # the empty prompt's zero embedding is trained too, so classifier-free guidance works
KL_WEIGHT = 1e-4
LAYOUT_NOISE = 0.3  # see layout_noise
SAVE_EVERY_S = 60


def render_dataset(n, seed, styles=world.STYLES):
    """n world scenes (never a held-out subject): images (n, 3, 64, 64) uint8 and captions."""
    rng = np.random.default_rng(seed)
    scenes = [world.random_scene(rng, styles) for _ in range(n)]
    images = np.stack([np.asarray(world.render(s, rng)) for s in tqdm(scenes, desc="rendering", leave=False)])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), [world.caption(s) for s in scenes]


def lr_at(step, steps, lr):
    """Linear warm-up over the first 5% of the steps, then a cosine decay to a tenth."""
    warm = max(1, steps // 20)
    if step < warm:
        return lr * (step + 1) / warm
    return lr * (0.55 + 0.45 * np.cos(np.pi * (step - warm) / max(1, steps - warm)))


def vae_loss(vae, images, batch, g):
    """L2 + L1 reconstruction of random 32x32 crops from a posterior sample, plus a small KL to N(0, 1).
    The autoencoder is convolutional: crops teach it the whole image at a quarter of the cost."""
    x = images[torch.randint(0, len(images), (batch,), generator=g)].float() / 127.5 - 1
    top, left = (torch.randint(0, 5, (2,), generator=g) * 8).tolist()  # aligned with the latent grid; 2 in 5 at an edge
    x = x[:, :, top:top + 32, left:left + 32]
    mean, std = vae.encode(x)
    recon = vae.decode(mean + std * torch.randn(mean.shape, generator=g))
    kl = 0.5 * (mean ** 2 + std ** 2 - 1 - 2 * std.log()).mean()
    return (recon - x).pow(2).mean() + 0.5 * (recon - x).abs().mean() + KL_WEIGHT * kl


def layout_noise(shape, g):
    """White noise plus coarse noise: noise drawn at 1/8, 1/16 and 1/32 of the latent size (4x4, 2x2 and 1x1 cells
    at 32x32, the last one being offset noise), upsampled, times LAYOUT_NOISE, then scaled back to unit variance.
    Why: the schedule's last step (sqrt(a_999) = 0.07) still leaks the layout of a 32x32 latent, where the object
    is and the background's color, through white noise; a model trained on white noise learns to read the layout
    from the noise and to ignore "at the left" or "on a sand background". Sampling still starts from white noise."""
    B, C, H, W = shape
    noise = torch.randn(shape, generator=g)
    for factor in (8, 16, 32):
        coarse = torch.randn(B, C, max(H // factor, 1), max(W // factor, 1), generator=g)
        noise += LAYOUT_NOISE * F.interpolate(coarse, size=(H, W), mode="bilinear", align_corners=False)
    return noise / noise.std()


def unet_loss(unet, text, latents, captions, batch, g):
    """The denoising loss on a posterior sample of the latents, weighted by min-SNR-5; captions are dropped to the
    empty prompt (zero embedding, as SDXL's empty negative prompt) with probability CAPTION_DROPOUT."""
    mean, std = latents
    idx = torch.randint(0, len(mean), (batch,), generator=g)
    x0 = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)
    t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch,), generator=g)
    noise = layout_noise(x0.shape, g)
    keep = torch.rand(batch, generator=g) >= CAPTION_DROPOUT
    prompts = [captions[i] if k else "" for i, k in zip(idx.tolist(), keep.tolist())]
    context, pooled = text.encode(prompts, zero_empty=True)
    ids = time_ids((world.SIZE, world.SIZE), (0, 0), (world.SIZE, world.SIZE)).expand(batch, 6)
    a_bar = alphas_cumprod()
    eps = unet(q_sample(x0, t, noise, a_bar), t, context, pooled, ids)
    return (min_snr_weight(t, 5.0, a_bar) * eps_mse(eps, noise)).mean()


def save_state(path, phase, step, modules, opt, g, run):
    """Everything a phase needs to continue exactly: weights, AdamW moments, the generator, the step."""
    tensors = {f"{name}.{k}": v for name, m in modules.items() for k, v in m.state_dict().items()}
    save_training_state(path, tensors, opt, g, {"phase": phase, "step": str(step), "run": run})


def load_state(path, phase, modules, opt, g, run):
    """Restore a phase saved by save_state; returns the step to continue from (0 when there is nothing to resume)."""
    if not os.path.exists(path):
        return 0
    meta = read_metadata(path)
    if meta["run"] != run:
        sys.exit(f"error: {path} was saved by a run with other settings ({meta['run']}); delete it to start over")
    if meta["phase"] != phase:
        return 0
    tensors, _ = load_training_state(path, opt, g)
    for name, m in modules.items():
        m.load_state_dict({k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")})
    return int(meta["step"])


def train_phase(phase, modules, loss_fn, steps, lr, state_path, seed, run):
    """steps AdamW steps on loss_fn(g), resumable: the state is saved atomically every SAVE_EVERY_S and at the end,
    and every random draw comes from one generator that is saved with it, so a resumed run equals an unbroken one."""
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    start = load_state(state_path, phase, modules, opt, g, run)
    last_save = time.time()
    for step in tqdm(range(start, steps), desc=phase, initial=start, total=steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        loss = loss_fn(g)
        if not torch.isfinite(loss):
            sys.exit(f"error: the {phase} loss is {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if time.time() - last_save > SAVE_EVERY_S:
            save_state(state_path, phase, step + 1, modules, opt, g, run)
            last_save = time.time()
    save_state(state_path, phase, steps, modules, opt, g, run)


SCHEDULER = {**EULER, "_diffusers_version": "0.19.0.dev0", **SCHEDULE, "clip_sample": False, "sample_max_value": 1.0,
             "set_alpha_to_one": False, "skip_prk_steps": True, "trained_betas": None}  # as SDXL base ships it
MODEL_INDEX = {"_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.19.0.dev0",
               "force_zeros_for_empty_prompt": True, "add_watermarker": None,
               "scheduler": ["diffusers", "EulerDiscreteScheduler"],
               "text_encoder": ["transformers", "CLIPTextModel"],
               "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
               "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
               "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}


def pretrain(out, seed=0, budget=FULL):
    """Pretrain the toy SDXL into out/ in the official folder layout. Rerunning after an interruption continues.

    Phases: tokenizers and random text encoders; the autoencoder (it sees every style, held-out ones included: like
    SDXL's, it is a generic image codec, and what is held out is held out of the UNet and text encoders); then the
    UNet, with the text encoders trained jointly when TRAIN_TEXT_ENCODERS."""
    record, run = os.path.join(out, "toy_pretraining.json"), [seed, vars(budget)]
    done = read_json(record, list) if os.path.exists(record) else run  # written first, so a resumed run has it too
    if done != run:  # say, the --quick model where the full one is asked for
        sys.exit(f"error: {out} holds a toy model pretrained otherwise (seed {done[0]}, {done[1]['unet_steps']} "
                 f"UNet steps, not {budget.unet_steps}); delete it to pretrain it again, or use another folder")
    if os.path.exists(os.path.join(out, "model_index.json")):
        print(f"{out} is already pretrained; delete it to pretrain again")
        return False
    torch.manual_seed(seed)
    os.makedirs(out, exist_ok=True)
    write_text(record, json.dumps(run))
    state_path = os.path.join(out, "pretrain_state.safetensors")
    vae_cfg, unet_cfg = model_configs()
    tokenizer = write_tokenizer(os.path.join(out, "tokenizer"), "<|endoftext|>")
    write_tokenizer(os.path.join(out, "tokenizer_2"), "!")
    if not os.path.exists(os.path.join(out, "text_encoder_2", "model.safetensors")):
        from transformers import CLIPTextModel, CLIPTextModelWithProjection
        for sub, cls, cfg in zip(("text_encoder", "text_encoder_2"), (CLIPTextModel, CLIPTextModelWithProjection),
                                 text_encoder_configs(tokenizer)):
            torch.manual_seed(seed + len(sub))
            save_text_encoder(cls(cfg), os.path.join(out, sub))
    images, captions = render_dataset(budget.images, seed)

    if not os.path.exists(os.path.join(out, "vae", "config.json")):
        torch.manual_seed(seed + 2)
        vae = AutoencoderKL(vae_cfg)
        with torch.no_grad():  # start nearly deterministic: log-variance -8 (std 0.02), learned from there
            vae.quant_conv.bias[vae_cfg.latent_channels:] = -8.0
        held_out_styles = render_dataset(budget.images // 8, seed + 1, tuple(world.HELD_OUT_STYLES))[0]
        vae_images = torch.cat([images, held_out_styles])
        train_phase("vae", {"vae": vae}, lambda g: vae_loss(vae, vae_images, budget.vae_batch, g),
                    budget.vae_steps, LR["vae"], state_path, seed + 2, json.dumps(run))
        with torch.no_grad():  # SDXL's scaling_factor: the one that gives the latents unit variance
            mean, _ = vae.encode(images[:256].float() / 127.5 - 1)
        vae.cfg = replace(vae_cfg, scaling_factor=round(1 / mean.std().item(), 5))
        save_component(vae, out, "vae")

    vae = load_vae(out)
    with torch.no_grad():
        parts = [vae.encode(images[i:i + 64].float() / 127.5 - 1)
                 for i in tqdm(range(0, len(images), 64), desc="encoding", leave=False)]
    latents = tuple(torch.cat(p) * vae.cfg.scaling_factor for p in zip(*parts))  # scaled mean and std
    text = TextEncoders(out)
    text.requires_grad_(TRAIN_TEXT_ENCODERS)
    torch.manual_seed(seed + 3)
    unet = UNet(unet_cfg)
    train_phase("unet", {"unet": unet, "text": text}, lambda g: unet_loss(unet, text, latents, captions,
                                                                          budget.unet_batch, g),
                budget.unet_steps, LR["unet"], state_path, seed + 3, json.dumps(run))
    save_component(unet, out, "unet")
    for sub, encoder in zip(("text_encoder", "text_encoder_2"), text.encoders):
        save_text_encoder(encoder, os.path.join(out, sub))
    write_text(os.path.join(out, "scheduler", "scheduler_config.json"), json.dumps(SCHEDULER, indent=2))
    write_text(os.path.join(out, "model_index.json"), json.dumps(MODEL_INDEX, indent=2))
    os.remove(state_path)
    return True


# ---------------------------------------------------------------------------------------------- base model report

def sample_scenes(folder, scenes, seed=0):
    """Images the model in folder makes for world.caption(scene) of each scene: sample.py's sampler (30 steps, CFG
    5), in one batch from one noise draw of `seed` (sample.py draws each image's noise from its own seed)."""
    unet, vae, text = load_sdxl(folder, torch.device("cpu"), torch.float32)
    prompts = [world.caption(s) for s in scenes]
    with torch.no_grad():
        cond = conditioning(text, prompts, world.SIZE, world.SIZE)
        uncond = conditioning(text, [""] * len(prompts), world.SIZE, world.SIZE, zero_empty=True)
        noise = initial_noise(len(prompts), vae, world.SIZE, world.SIZE, seed)
        latents = sample(unet, noise, cond, uncond, steps=30, w_txt=5.0)
        images = decode_latents(vae, latents)
    return [to_pil(image[None]) for image in images]


def report(folder, n=40, seed=1):
    """Prompt fidelity of base-model samples on new scenes of the pretraining world (held-in attribute
    combinations), against chance (a random world image for each prompt) and the renderer itself."""
    rng = np.random.default_rng([seed, 11])
    scenes = [world.random_scene(rng) for _ in range(n)]
    images = sample_scenes(folder, scenes, seed)
    model = np.mean([world.prompt_fidelity(im, s) for im, s in zip(images, scenes)])
    chance = np.mean([world.prompt_fidelity(world.render(world.random_scene(rng), rng), s)
                      for s in scenes for _ in range(4)])
    oracle = np.mean([world.prompt_fidelity(world.render(s, rng), s) for s in scenes])
    grid = Image.new("RGB", (world.SIZE * 10, world.SIZE * ((n + 9) // 10)))
    for i, im in enumerate(images):
        grid.paste(im, (world.SIZE * (i % 10), world.SIZE * (i // 10)))
    grid.save(os.path.join(folder, "samples.png"))
    print(f"prompt fidelity of base samples on {n} held-in prompts: {model:.3f} "
          f"(chance {chance:.3f}, rendered ground truth {oracle:.3f}); samples in {folder}/samples.png")
    return model, chance, oracle


# ---------------------------------------------------------------------------------------------- the paper's experiments

@dataclass(frozen=True)
class Plan:
    subjects: tuple  # indices into world.SUBJECTS
    styles: tuple  # names in world.HELD_OUT_STYLES
    merges: tuple  # (subject index, style name): the two LoRAs loaded together
    steps: int  # fine-tuning steps, the same for every method
    prompts: int  # evaluation prompts (eval_scenes) per subject, style or merge
    seeds: int
    w_cons: tuple  # None: plain CFG with the fine-tuned model
    merge_w_cons: tuple
    num_prior: int  # class images for prior preservation
    sample_steps: int


COMPARE = Plan(subjects=(0, 1, 2), styles=tuple(world.HELD_OUT_STYLES), merges=((0, "frame"), (1, "vignette")),
               steps=400, prompts=8, seeds=2, w_cons=(None, 0.0, 1.0, 2.0, 3.0, 5.0), merge_w_cons=(None, 2.0, 3.0),
               num_prior=20, sample_steps=30)
QUICK_COMPARE = Plan(subjects=(0,), styles=("frame",), merges=((0, "frame"),), steps=10, prompts=2, seeds=1,
                     w_cons=(None, 2.0), merge_w_cons=(2.0,), num_prior=2, sample_steps=8)
METHODS = {"DreamBooth": dict(dco=False, prior=False), "DreamBooth + prior": dict(dco=False, prior=True),
           "DCO": dict(dco=True, prior=False)}
FINE_TUNE = ["--rank", "8", "--lr", "1e-3", "--ti-lr", "1e-3", "--resolution", str(world.SIZE), "--save-every", "0"]


def training_sets(plan):
    """(name, training scenes, token, initializer word, class prompt) for every subject and style of the plan. The
    class prompt (prior preservation's) is the first caption with the subject's token replaced by its initializer
    word, or without the style."""
    found = []
    for i in plan.subjects:
        scenes, (token, init) = world.subject_scenes(i), world.learned_token(i)
        found.append((f"sub{i}", scenes, token, init, world.caption(scenes[0]).replace(token, init)))
    for name in plan.styles:
        scenes, (token, init) = world.style_scenes(name), world.learned_token(style=name)
        found.append((name, scenes, token, init, world.caption(replace(scenes[0], style="none"))))
    return found


def fine_tune(model, out, target, method, plan, beta):
    """train.py on one target with one method (DCO with this beta, the others with beta 0), as a user runs it.
    A finished run in out/ with the same settings is reused, an interrupted one resumed."""
    name, scenes, token, init, class_prompt = target
    run, data = os.path.join(out, "runs", f"{name}-{method.replace(' + ', '-')}"), os.path.join(out, "data", name)
    argv = ["--model", model, "--data", data, "--out", run, "--token", token, "--init-token", init,
            "--beta", str(beta if METHODS[method]["dco"] else 0.0), "--steps", str(plan.steps),
            "--sample-steps", str(plan.sample_steps), *FINE_TUNE]
    if METHODS[method]["prior"]:
        argv += ["--prior-dir", os.path.join(out, "prior", name), "--prior-prompt", class_prompt,
                 "--num-prior", str(plan.num_prior)]
    world.write_training_folder(scenes, data)  # the same files each time: rendered from a fixed seed
    if os.path.exists(os.path.join(run, "settings.json")):  # train.py's record of its arguments and its step
        try:  # the settings and data compared as train.py compares them for --resume
            done = train.check_resume(train.parse_args(argv), read_captions(data, None))
        except ModelError as e:
            sys.exit(f"error: {e} (or give compare another --out)")
        if done == plan.steps:
            return run
        argv.append("--resume")
    print(f"fine-tuning {name} with {method}")
    try:  # train.py's command line, in this process (a process each would start Python and torch 15 times)
        train.main(train.parse_args(argv))
    except (ModelError, OSError) as e:
        sys.exit(f"error: train.py on {name} with {method}: {e}; rerun to continue")
    except SystemExit as e:  # train.py's Ctrl-C: it saved the run and says to give --resume; here a rerun resumes
        if not str(e.code).startswith("interrupted"):
            raise
        sys.exit(f"interrupted: {run} is saved; rerun this command to continue")
    return run


def score_table(model, out, title, jobs, w_cons, plan, axes):
    """Sample every job (label, LoRA folders, evaluation scenes) at every w_con, prompt and seed through evaluate.py's
    cached sweep, score each image with toy_metrics against its scene; write the table as csv and the Pareto plot
    (axes: the x and y metric), and return the table in markdown. Jobs with the same label are summarized together."""
    # evaluate.py's arguments, its defaults but for these sampling settings (which also key its image cache); sweep and
    # make_generator do not read the references, prompts or metric models.
    settings = evaluate.parse_args(["--model", model, "--steps", str(plan.sample_steps), "--width", str(world.SIZE),
                                    "--height", str(world.SIZE), "--device", "cpu", "--dtype", "float32",
                                    "--no-cuda-graph", "--ref-images", "-", "--prompts", "-", "--dino", "-"])
    cache, entries = evaluate.ImageCache(os.path.join(out, "images")), []
    for label, loras, scenes in jobs:
        by_prompt = {world.caption(s): s for s in scenes}
        found = evaluate.sweep(settings, [(label, loras)], list(by_prompt), list(range(plan.seeds)), list(w_cons),
                               cache, evaluate.make_generator)
        for e in found:
            e["metrics"] = world.toy_metrics([Image.open(e["path"]).convert("RGB")], by_prompt[e["prompt"]])
        entries += found
    names = list(entries[0]["metrics"])
    rows = evaluate.summarize(entries, {n: np.array([e["metrics"][n] for e in entries]) for n in names})
    slug = title.split(":")[0].lower()
    evaluate.plot_pareto(rows, *axes, os.path.join(out, f"pareto_{slug}.png"))
    write_text(os.path.join(out, f"{slug}.csv"), evaluate.to_csv(rows))
    return f"### {title}\n\n" + evaluate.to_markdown(rows, names)


def compare(model, out, plan, beta=1000.0):
    """DreamBooth, DreamBooth + prior preservation and DCO on every subject and style of the plan (same steps and
    learning rate), a w_con sweep over evaluation prompts, and per method the merge of a subject and a style LoRA.
    Writes out/results.md (three tables), out/*.csv and out/pareto_*.png; a rerun reuses finished runs and images."""
    runs = {(t[0], m): fine_tune(model, out, t, m, plan, beta) for t in training_sets(plan) for m in METHODS}
    subjects = [([f"sub{i}"], world.eval_scenes(world.SUBJECTS[i], n=plan.prompts)) for i in plan.subjects]
    styles = [([s], world.eval_scenes(style=s, n=plan.prompts)) for s in plan.styles]
    merges = [([f"sub{i}", s], world.eval_scenes(world.SUBJECTS[i], style=s, n=plan.prompts)) for i, s in plan.merges]
    tables = [("Subjects: subject fidelity and prompt fidelity", subjects, METHODS, plan.w_cons, ("prompt", "subject")),
              ("Styles: style fidelity and prompt fidelity", styles, METHODS, plan.w_cons, ("prompt", "style")),
              ("Merges: a subject LoRA and a style LoRA loaded together", merges, ("DreamBooth", "DCO"),
               plan.merge_w_cons, ("prompt", "subject"))]
    text = f"Fine-tuning: train.py {' '.join(FINE_TUNE)} --steps {plan.steps}; DCO with --beta {beta:g}.\n\n"
    text += "\n".join(score_table(model, out, title, [(m, [runs[(n, m)] for n in names], scenes)
                                                     for m in methods for names, scenes in sets], w_cons, plan, axes)
                     for title, sets, methods, w_cons, axes in tables)
    write_text(os.path.join(out, "results.md"), text)
    print(text + f"\nwrote {out}/results.md, the tables as csv and the Pareto plots")
    return text


# ---------------------------------------------------------------------------------------------- command line

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=Help)
    commands = p.add_subparsers(dest="command")
    command = functools.partial(commands.add_parser, formatter_class=Help)
    pre = command("pretrain", help="pretrain the toy SDXL (the default command)")
    pre.add_argument("--out", default="toy-sdxl", help="the model folder to write")
    pre.add_argument("--seed", type=seed_int, default=0, help="of the toy world and the training")
    pre.add_argument("--quick", action="store_true", help="a few hundred steps: a working folder, not a good model")
    data = command("data", help="write a held-out subject's or style's training folder")
    which = data.add_mutually_exclusive_group(required=True)
    which.add_argument("--subject", type=int, help=f"0..{len(world.SUBJECTS) - 1}")
    which.add_argument("--style", type=int, help=f"0..{len(world.HELD_OUT_STYLES) - 1}")
    data.add_argument("--out", required=True, help="the folder to write")
    data.add_argument("--n", type=positive_int, default=4, help="images of a subject (a style has one)")
    data.add_argument("--seed", type=seed_int, default=0, help="of the images drawn")
    cmp = command("compare", help="DreamBooth vs DreamBooth + prior vs DCO: Pareto and merge tables")
    cmp.add_argument("--model", help="default toy-sdxl (toy-sdxl-quick with --quick); pretrained first if missing")
    cmp.add_argument("--out", help="default toy-compare (toy-compare-quick with --quick)")
    cmp.add_argument("--quick", action="store_true", help="one subject and style, a few steps: minutes, not results")
    cmp.add_argument("--beta", type=non_negative, default=1000.0, help="DCO's beta (the paper's 1000)")
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in ("pretrain", "data", "compare", "-h", "--help"):
        argv = ["pretrain", *argv]
    args = p.parse_args(argv)
    if args.command == "pretrain" and args.seed >= 2 ** 63:  # its phases seed torch with seed + 1, seed + 2, ...
        p.error("--seed must be below 2^63 for pretraining")
    return args


def main(args):
    if args.command == "data":
        if args.subject is not None and not 0 <= args.subject < len(world.SUBJECTS):
            sys.exit(f"error: --subject must be in 0..{len(world.SUBJECTS) - 1}")
        if args.style is not None and not 0 <= args.style < len(world.HELD_OUT_STYLES):
            sys.exit(f"error: --style must be in 0..{len(world.HELD_OUT_STYLES) - 1}")
        if args.subject is not None:
            scenes = world.subject_scenes(args.subject, args.n, args.seed)
            token, init = world.learned_token(args.subject)
        else:
            name = list(world.HELD_OUT_STYLES)[args.style]
            scenes, (token, init) = world.style_scenes(name, args.seed), world.learned_token(style=name)
        try:
            world.write_training_folder(scenes, args.out, args.seed)
        except (ValueError, OSError) as e:
            sys.exit(f"error: {e}")
        print(f"wrote {len(scenes)} images to {args.out}; token {token}, initializer word {init!r}")
        return
    if args.command == "compare":
        suffix = "-quick" if args.quick else ""
        model, out = args.model or f"toy-sdxl{suffix}", args.out or f"toy-compare{suffix}"
        record = os.path.join(model, "toy_pretraining.json")
        if not os.path.exists(os.path.join(model, "model_index.json")):
            pretrain(model, 0, QUICK if args.quick else FULL)
        elif not args.quick and os.path.exists(record) and read_json(record, list)[1] == vars(QUICK):
            sys.exit(f"error: {model} holds the --quick toy model, which is too rough for these results; pretrain the "
                     "full one (python toy.py --out DIR, then --model DIR), or give compare --quick")
        start = time.time()
        compare(model, out, QUICK_COMPARE if args.quick else COMPARE, args.beta)
        print(f"compared in {time.time() - start:.0f} s")
        return
    start = time.time()
    if pretrain(args.out, args.seed, QUICK if args.quick else FULL):
        print(f"pretrained {args.out} in {time.time() - start:.0f} s")
    report(args.out, n=10 if args.quick else 40)


if __name__ == "__main__":
    run(main, parse_args)
