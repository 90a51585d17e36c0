"""Fine-tune SDXL on a few images with LoRA and the DCO loss.

    python train.py --model DIR --data ./dog --token "<dog>" --init-token dog --beta 1000 --out out/dog
    python train.py --model DIR --data ./style --preset style --out out/style
    python train.py --model DIR --data ./dog --beta 0 ...                   # DreamBooth-LoRA baseline
    python train.py ... --beta 0 --prior-dir class/dog --prior-prompt "a photo of a dog"   # + prior preservation
    python train.py --model DIR --data dataset/dreambooth/dog/config.json:full_ti ...     # the official data config

Writes OUT/pytorch_lora_weights.safetensors (diffusers format: pipe.load_lora_weights(OUT) reads it),
OUT/lora_kohya.safetensors (ComfyUI, AUTOMATIC1111), OUT/learned_embeds.safetensors (with --token) and
OUT/settings.json. OUT/checkpoint.safetensors holds what --resume needs; OUT/log.jsonl has a line per step: the
loss, and the mean denoising errors of the LoRA model (err_theta) and of the frozen one (err_phi, 0 when beta is 0).
"""
import argparse
import contextlib
import hashlib
import json
import os
import re
import signal
import sys
import warnings

import torch
from tqdm import tqdm

import lora as lora_lib
from checkpoint import (ModelError, load_training_state, read_json, read_metadata, save_safetensors,
                        save_training_state, write_text)
from cli import (Help, add_compile, add_cuda_graph, check_steps, cuda_graph_on, non_negative, positive, positive_int,
                 resolve_device, run, seed_int)
from data import encode_images, image_files, is_config, load_rgb, read_captions, read_config
from dco import alphas_cumprod, diffusion_loss, eps_mse, min_snr_weight, offset_noise, q_sample
from graph import cuda_graph
from sample import (Pipeline, base_prompt, check_scheduler, check_sides, generate, load_sdxl, save_png, to_pil,
                    token_pattern, warn_unloaded_tokens)
from text import TAG, Cond, time_ids

CHECKPOINT = "checkpoint.safetensors"  # the LoRA, the learned rows, AdamW's state and the RNG, for --resume
OUTPUTS = (CHECKPOINT, lora_lib.DIFFUSERS_FILE, lora_lib.KOHYA_FILE, "learned_embeds.safetensors")
CLASS_SEED = 10_000  # class image i's seed is CLASS_SEED + i, whatever --seed: one --prior-dir serves every run
PRESETS = {"subject": dict(rank=32, steps=2000, offset_noise=0.0), "style": dict(rank=64, steps=1000, offset_noise=0.1)}


def preset_default(key, what):
    return f"{what} (default: {PRESETS['subject'][key]:g}, {PRESETS['style'][key]:g} with --preset style)"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=Help)
    p.add_argument("--model", required=True, help="SDXL folder in the official (diffusers) layout, or the single file")
    p.add_argument("--config", help="with a single-file --model: a folder with the SDXL configs and tokenizers")
    p.add_argument("--data", required=True, help="folder of images with same-name .txt captions or metadata.jsonl, "
                   "or the official code's data config as CONFIG.json[:NAME]")
    p.add_argument("--out", default="out", help="the output folder (see above)")
    p.add_argument("--preset", choices=PRESETS, default="subject",
                   help="the official recipe for --rank, --steps, --offset-noise")
    p.add_argument("--beta", type=non_negative, default=1000.0, help="DCO beta; 0 is the plain loss (DreamBooth-LoRA)")
    p.add_argument("--steps", type=positive_int, help=preset_default("steps", "training steps"))
    p.add_argument("--rank", type=positive_int, help=preset_default("rank", "LoRA rank"))
    p.add_argument("--alpha", type=positive, help="LoRA alpha (default: the rank, i.e. scale 1)")
    p.add_argument("--lr", type=non_negative, default=5e-5, help="AdamW learning rate of the LoRA")
    p.add_argument("--ti-lr", type=non_negative, default=5e-6, help="learning rate of the textual-inversion embeddings")
    p.add_argument("--batch-size", type=positive_int, default=1, help="images per step")
    p.add_argument("--resolution", type=positive_int, default=1024,
                   help="side of the square training images (resized, then center-cropped), a multiple of 32 for SDXL")
    p.add_argument("--caption", help="one caption for every image (instead of .txt files)")
    p.add_argument("--token", help='learned token, e.g. "<dog>"; every caption must contain it, as a word of its own')
    p.add_argument("--init-token", help="the word the token starts from, e.g. dog")
    p.add_argument("--prior-dir", help="class images for prior preservation (generated if too few)")
    p.add_argument("--prior-prompt", help='the class images\' prompt, e.g. "a photo of a dog"')
    p.add_argument("--prior-weight", type=non_negative, default=1.0, help="the class images' loss weight, lambda")
    p.add_argument("--num-prior", type=positive_int, default=100, help="class images wanted in --prior-dir")
    p.add_argument("--offset-noise", type=non_negative, help=preset_default("offset_noise", "offset-noise strength"))
    p.add_argument("--snr-gamma", type=non_negative,
                   help="min-SNR-gamma loss weighting (0 or unset: off, as officially)")
    p.add_argument("--max-grad-norm", type=positive, default=1.0, help="clip the gradient to this norm")
    p.add_argument("--weight-decay", type=non_negative, default=1e-4,
                   help="AdamW's, on the LoRA and the token rows alike (as officially)")
    p.add_argument("--seed", type=seed_int, default=0,
                   help="of the LoRA's init, the training draws and the sample images (not the class images')")
    p.add_argument("--save-every", type=int, default=500,
                   help="checkpoint + sample image every N steps (0: the final checkpoint only, no images)")
    p.add_argument("--sample-steps", type=positive_int, default=30,
                   help="sampler steps for the sample images and class images")
    p.add_argument("--sample-prompt", help="the prompt of the sample drawn at every save (default: the first caption)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.safetensors")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute each ResBlock and transformer block in the backward pass: less memory, slower")
    add_compile(p)
    add_cuda_graph(p, "each train step")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto: bfloat16 on a GPU, float32 on the CPU (float16's small gradients would underflow "
                        "without loss scaling, which this loop does not do)")
    args = p.parse_args(argv)
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    for k in ("caption", "token", "init_token", "prior_prompt", "sample_prompt"):  # "" would pass for unset
        if getattr(args, k) is not None and not getattr(args, k).strip():
            p.error(f"--{k.replace('_', '-')} is blank")
    if bool(args.token) != bool(args.init_token) and not is_config(args.data):  # a config may name the other
        p.error("--token and --init-token go together")
    if args.token and args.token.split() != [args.token]:
        p.error(f"--token {args.token!r}: a learned token is one word, without spaces, e.g. <dog>")
    if bool(args.prior_dir) != bool(args.prior_prompt):
        p.error("--prior-dir and --prior-prompt go together")
    if args.caption and is_config(args.data):
        p.error("--caption is for a folder of images; a data config gives its own prompts")
    if args.prior_dir and os.path.realpath(args.prior_dir) == os.path.realpath(args.data):
        p.error("--prior-dir is the --data folder; class images go in a folder of their own")
    if args.prior_dir and os.path.isfile(args.prior_dir):
        p.error(f"--prior-dir {args.prior_dir} is a file; class images go in a folder")
    if os.path.isfile(args.out):
        p.error(f"--out {args.out} is a file; training writes a folder")
    if args.save_every < 0:
        p.error("--save-every must be 0 (never) or a number of steps")
    check_steps(p, "--sample-steps", args.sample_steps)
    return args


# ------------------------------------------------------------------------------------------------ data

def check_token(path, caption, token):
    """The learned token must stand as a word of every caption, punctuation around it allowed. Inside a longer word
    it is most likely a typo: with --token sub0 (initializer word star) for captions that say <sub0>, the token would
    train there all the same, and the base caption that the frozen model sees (DCO's reference, consistency
    guidance) would read <star>."""
    found = token_pattern([token])  # in any case, as CLIP's tokenizer finds it
    if not found.search(caption):
        raise ModelError(f"{path}: caption {caption!r} does not contain the token {token!r}")
    alone = re.compile(r"[\"'(\[]*" + re.escape(token) + r"(?:'s)?[\"')\],.;:!?]*", re.IGNORECASE)
    for word in caption.split():
        if found.search(word) and not alone.fullmatch(word):
            raise ModelError(f"{path}: caption {caption!r} has the token {token!r} inside the word {word!r}; a "
                             "learned token is a word of its own (the whole of <dog>, with its brackets)")


def plain_tags(items, token):
    """The <word>s of the captions that are not the learned token (in any case, as CLIP's tokenizer reads it)."""
    return sorted({t for _, cap in items for t in TAG.findall(cap)
                   if not token or t.lower() != token.lower()})


def read_items(args):
    """[(image path, caption)] of --data, every image opened once and every caption checked, before anything is
    written. An official data config also gives the token and its initializer word (into args, which settings.json
    records) unless --token and --init-token do."""
    if is_config(args.data):
        items, token, word = read_config(args.data, args.init_token)
        args.token, args.init_token = args.token or token, word or args.init_token
        if bool(args.token) != bool(args.init_token):
            raise ModelError(f"{args.data} names no learned token: --token and --init-token go together")
    else:
        items = read_captions(args.data, args.caption)
    tagged = plain_tags(items, args.token)
    if tagged:  # the official dog set's captions, say, trained without --token
        warnings.warn(f"the captions hold {', '.join(tagged)}, which is not a learned token here (--token): it "
                      "trains as plain text, letter by letter")
    for path, cap in items:
        if args.token:
            check_token(path, cap, args.token)
        load_rgb(path)  # fail on a bad image now, before anything is written
    return items


# ------------------------------------------------------------------------------------------------ class images

@torch.no_grad()
def make_class_images(args, unet, vae, text):
    """Prior preservation: fill --prior-dir with --num-prior images of --prior-prompt from the base model."""
    os.makedirs(args.prior_dir, exist_ok=True)
    have = image_files(args.prior_dir)
    pipe = Pipeline(unet, vae, text)
    for i in tqdm(range(len(have), args.num_prior), desc="class images"):
        image = generate(pipe, args.prior_prompt, CLASS_SEED + i, steps=args.sample_steps,
                         width=args.resolution, height=args.resolution)
        save_png(to_pil(image), os.path.join(args.prior_dir, f"class-{i:05d}.png"),
                 {"prompt": args.prior_prompt, "seed": CLASS_SEED + i})
    return class_items(args)


def class_items(args):
    """The (image, prompt) pairs prior preservation trains on: the first --num-prior images of --prior-dir."""
    if not (args.prior_dir and os.path.isdir(args.prior_dir)):
        return []
    return [(os.path.join(args.prior_dir, f), args.prior_prompt) for f in image_files(args.prior_dir)][: args.num_prior]


def data_digest(items):
    """A fingerprint of the training data, each image's bytes and its caption in order: a resumed run must train on
    the data its run began with, not on images edited, added or removed since."""
    h = hashlib.sha256()
    for path, caption in items:
        with open(path, "rb") as f:
            h.update(hashlib.sha256(f.read()).digest() + caption.encode() + b"\0")
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------ state

class TokenEmbeddings:
    """Textual inversion: the new token's row in both embedding tables trains (in fp32, so that small updates are
    not lost to bf16 rounding); after every step it is rescaled to the initializer's norm, as officially."""

    def __init__(self, text, token, init_word):
        self.token, self.init_word = token, init_word
        if text.is_token(token):
            warnings.warn(f"--token {token!r} is already a word of CLIP's vocabulary; from now on it means the learned "
                          "token wherever it appears (a new string such as <dog> avoids that)")
        self.rows = text.train_token(token, init_word)
        self.norms = [r.norm().item() for r in self.rows]
        self.tokenizers = text.tokenizers

    def check_reach(self, items):
        """CLIP reads the first 77 tokens: a learned token past them would get no gradient and stay its initializer."""
        for tokenizer in self.tokenizers:
            token_id, n = tokenizer.convert_tokens_to_ids(self.token), tokenizer.model_max_length
            for path, caption in items:
                if token_id not in tokenizer(caption, truncation=True, max_length=n).input_ids:
                    raise ModelError(f"{path}: {self.token!r} comes after CLIP's first {n} tokens of the caption; "
                                     "shorten it or move the token forward")

    @torch.no_grad()
    def retract(self):
        """Rescale each learned row to its initializer word's norm (the official retract_embeddings; the rest of the
        table never changes here)."""
        for row, norm in zip(self.rows, self.norms):
            row.mul_(norm / row.norm())

    def learned(self):
        return {"clip_l": self.rows[0][None].detach().cpu(), "clip_g": self.rows[1][None].detach().cpu()}


def logged_step(line):
    """The step of a log.jsonl line; None for a line cut short by a crash (no newline) or not a step's record."""
    try:
        step = json.loads(line).get("step") if line.endswith("\n") else None
    except (ValueError, AttributeError):
        return None
    return step if type(step) is int else None


def open_log(path, start):
    """OUT/log.jsonl, opened to add a line per step; a resumed run keeps the lines of the steps before `start`."""
    kept = []
    if start and os.path.exists(path):
        with open(path) as f:
            kept = [line for line in f if (step := logged_step(line)) is not None and step < start]
    write_text(path, "".join(kept))
    return open(path, "a")


def graph_step(step, trained, optimizer, batch_size, latent_shape, device):
    """step(idx, z, noise, t) replayed from a CUDA graph (graph.py). Its warm-up calls train on zeros; what they
    changed in the trained parameters and AdamW's state is undone before the recording (fresh AdamW state is zeros)."""
    params = [p.detach().clone() for p in trained]
    state = {p: {k: v.clone() for k, v in optimizer.state[p].items()} for p in trained}

    @torch.no_grad()
    def undo():
        for p, saved in zip(trained, params):
            p.copy_(saved)
            for k, v in optimizer.state[p].items():
                if k in state[p]:
                    v.copy_(state[p][k])
                else:
                    v.zero_()
    idx = t = torch.zeros(batch_size, dtype=torch.long, device=device)
    z = torch.zeros(batch_size, *latent_shape, device=device)
    return cuda_graph(step, idx, z, z, t, after_warmup=undo)


def load_checkpoint(path, trained, optimizer, rng):
    """Restore what save_training_state wrote for --resume: the LoRA and token rows, AdamW, the generator."""
    tensors, meta = load_training_state(path, optimizer, rng)
    shapes = {k: tuple(t.shape) for k, t in tensors.items() if k.startswith("param.")}
    if shapes != {f"param.{i}": tuple(p.shape) for i, p in enumerate(trained)}:  # the run stops here: no harm done
        raise ModelError(f"{path}: made by a run with other settings (rank, targets or --token); cannot resume it")
    with torch.no_grad():
        for i, p in enumerate(trained):
            p.copy_(tensors[f"param.{i}"])
    return int(meta["step"])


# What a resumed run may change: how long it runs, what it saves along the way, and where and how fast it runs (with
# --dtype auto, a GPU run continued on the CPU trains on in float32). --out is where the run is, however named, and
# --preset counts by the settings it gives, compared one by one.
RESUMABLE = {"steps", "save_every", "sample_steps", "sample_prompt", "resume", "grad_checkpointing", "compile",
             "cuda_graph", "device", "out", "preset"}
PATHS = {"model", "config", "data", "prior_dir"}  # compared as the folders they name: ./data/ is data


def saved_run(out):
    """The settings and step of the run OUT holds: its settings.json, which every save writes last, or where the
    first save was cut short before that, the checkpoint's copy. None where OUT holds no run of this script."""
    path, ckpt = os.path.join(out, "settings.json"), os.path.join(out, CHECKPOINT)
    if os.path.isfile(path):
        settings = read_json(path)
        if not (type(settings.get("step")) is int and {"model", "data", "beta"} <= settings.keys()):
            raise ModelError(f"{path}: not the settings of a run of train.py; train into another --out")
        return settings
    meta = read_metadata(ckpt) if os.path.isfile(ckpt) else {}
    return ({**json.loads(meta["dco.settings"]), "step": int(meta["step"]), "cwd": meta.get("dco.cwd")}
            if "dco.settings" in meta else None)


def check_resume(args, items):
    """The step OUT's run reached, after refusing settings other than the ones it was started with, training data
    other than its own, and a --steps below that step."""
    before = saved_run(args.out)
    if before is None:
        raise ModelError(f"{os.path.join(args.out, 'settings.json')}: missing; nothing to resume")

    def effective(settings):  # alpha None is the rank; dtype auto is the device's (this run's device, for both)
        return {**settings, "alpha": settings.get("alpha") or settings.get("rank"),
                "dtype": resolve_device(args.device, settings.get("dtype"))[1],
                "snr_gamma": settings.get("snr_gamma") or None}  # 0 is off, as unset is

    def then_path(k, old):  # a path as seen from where the run started (older runs did not say: from here)
        return os.path.join(before.get("cwd") or ".", old) if k in PATHS and old else old

    def same(k, old, new):
        if k in PATHS and None not in (old, new):
            return os.path.realpath(then_path(k, old)) == os.path.realpath(new)
        return old == new
    now, then = effective(vars(args)), effective(before)
    # Compared as given too: an alpha left unset stays unset when --rank changes (only --rank is reported then).
    changed = [f"--{k.replace('_', '-')} {then_path(k, before.get(k))} -> {v}" for k, v in vars(args).items()
               if k not in RESUMABLE and not same(k, then.get(k), now[k]) and not same(k, before.get(k), v)]
    if changed:
        raise ModelError(f"{args.out} was trained with other settings ({'; '.join(changed)}); "
                         "give the same ones, or train into another --out")
    if before.get("data_sha256") not in (None, data_digest(items + class_items(args))):  # None: an older run's
        where = "--data or --prior-dir" if args.prior_dir else "--data"
        raise ModelError(f"{args.out} was trained on other data: images or captions in {where} were changed, added "
                         "or removed since; put them back, or train into another --out")
    if before["step"] > args.steps:
        raise ModelError(f"{args.out} is at step {before['step']}, past --steps {args.steps}; give at least that")
    return before["step"]


def finished(args, items):
    """Whether OUT already holds this run, finished: then there is nothing to do. Refuses an OUT that holds another
    program's files, a run of other settings or data, or this run unfinished without --resume: a run is never
    overwritten, and is continued only with its own settings."""
    ckpt = os.path.join(args.out, CHECKPOINT)
    if args.resume or saved_run(args.out):
        done = check_resume(args, items)
        if not args.resume and done == args.steps and os.path.exists(os.path.join(args.out, "settings.json")):
            print(f"{args.out} already holds this run, finished at step {done}; nothing to do")  # its last save whole
            return True
        if not os.path.isfile(ckpt):
            raise ModelError(f"{ckpt}: no checkpoint to resume from; train into another --out")
        if not args.resume:
            raise ModelError(f"{args.out} holds this run at step {done}; continue it with --resume")
    else:
        found = [f for f in OUTPUTS if os.path.exists(os.path.join(args.out, f))]
        if found:  # files of another program's run (the official code's, say), which the first save would replace
            raise ModelError(f"{args.out} holds {found[0]} but no settings.json, so it is not a run of this script; "
                             "train into another --out")
    return False


def run_metadata(args, step):
    """What every file a save writes says of its run, in its safetensors header."""
    return {"dco.settings": json.dumps(vars(args)), "dco.step": str(step)}


def save_outputs(args, unet, ti, step):
    meta = run_metadata(args, step)
    lora = lora_lib.get_lora(unet)
    save_safetensors(lora_lib.to_diffusers(lora, unet.cfg), os.path.join(args.out, lora_lib.DIFFUSERS_FILE),
                     meta)
    save_safetensors(lora_lib.to_kohya(lora), os.path.join(args.out, lora_lib.KOHYA_FILE), meta)
    if ti is not None:
        save_safetensors(ti.learned(), os.path.join(args.out, "learned_embeds.safetensors"),
                         {"token": ti.token, "init_token": ti.init_word})
    # cwd: where the run's relative paths start from, for --resume from another folder
    write_text(os.path.join(args.out, "settings.json"),
               json.dumps({**vars(args), "step": step, "cwd": os.getcwd()}, indent=2))


@torch.no_grad()
def save_grid(args, unet, vae, text, prompt, step, device):
    """A sample of the prompt with a fixed seed, to watch the run."""
    vae.to(device)
    image = generate(Pipeline(unet, vae, text), prompt, args.seed, steps=args.sample_steps, width=args.resolution,
                     height=args.resolution)
    vae.cpu()
    os.makedirs(os.path.join(args.out, "samples"), exist_ok=True)
    save_png(to_pil(image), os.path.join(args.out, "samples", f"step-{step:06d}.png"), {"step": step, "prompt": prompt})


@contextlib.contextmanager
def ctrl_c_deferred():
    """Within: Ctrl-C only sets the yielded flag, which the loop reads after each step. After: Ctrl-C as before."""
    flag = []
    before = signal.signal(signal.SIGINT, lambda *_: flag.append(True))
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, before)


# ------------------------------------------------------------------------------------------------ main

def main(args):
    device, dtype = resolve_device(args.device, args.dtype)
    args.cuda_graph = cuda_graph_on(args.cuda_graph, device)
    items = read_items(args)
    if finished(args, items):
        return
    ckpt = os.path.join(args.out, CHECKPOINT)
    check_scheduler(args.model, args.config)  # its sample and class images are drawn with sample.py's sampler
    check_sides(args.model, args.config, resolution=args.resolution)
    torch.manual_seed(args.seed)  # for the LoRA's initialization (lora.inject, below)
    unet, vae, text = load_sdxl(args.model, device, dtype, args.config)
    ti = TokenEmbeddings(text, args.token, args.init_token) if args.token else None  # a bad token fails now
    if ti is not None:
        ti.check_reach(items)
    sample_prompt = args.sample_prompt or items[0][1]
    if args.sample_prompt:
        warn_unloaded_tokens(Pipeline(unet, vae, text), args.sample_prompt)  # a mistyped learned token, say
    unet.requires_grad_(False)
    unet.set_grad_checkpointing(args.grad_checkpointing)
    if args.compile:
        unet.compile_blocks()
    res = args.resolution

    # Prepare: class images, then every latent and (frozen) text embedding once, before the loop.
    prior = make_class_images(args, unet, vae, text) if args.prior_dir else []
    args.data_sha256 = data_digest(items + prior)  # in settings.json, for --resume to compare
    mean, std = encode_images(vae, items + prior, res, device)
    # SDXL's size conditioning as the official code sets it: every image an uncropped res x res original, which is
    # also what the sampler uses.
    ids = time_ids((res, res), (0, 0), (res, res)).expand(len(mean), -1).to(device)
    vae.cpu()  # needed again only to decode sample grids
    captions = [c for _, c in items + prior]
    learned = {args.token: args.init_token} if args.token else {}
    base_captions = [base_prompt(learned, c) for c in captions]
    with torch.no_grad():
        base = Cond(*text.encode(base_captions), ids)  # c_base: what the frozen reference model is given
    if ti is None:
        text.cpu()  # frozen text encoders: their embeddings are cached, so they leave the GPU

    params = lora_lib.inject(unet, args.rank, args.alpha)
    trained = params + (ti.rows if ti else [])
    groups = [{"params": params, "lr": args.lr}] + ([{"params": ti.rows, "lr": args.ti_lr}] if ti else [])
    # Fused: one kernel for all parameters. Capturable, as a CUDA graph needs, it computes the same update.
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(groups, weight_decay=args.weight_decay, fused=fused,
                                  capturable=fused and args.cuda_graph)
    rng = torch.Generator("cpu").manual_seed(args.seed)  # all randomness of the loop, saved for --resume
    a_bar = alphas_cumprod().to(device)
    os.makedirs(args.out, exist_ok=True)
    start = load_checkpoint(ckpt, trained, optimizer, rng) if args.resume else 0
    if start > args.steps:  # a save cut short after the checkpoint, before settings.json named its step
        raise ModelError(f"{ckpt} is at step {start}, past --steps {args.steps}; give at least that")
    n_instance, B = len(items), args.batch_size
    tokens = text.tokens(captions) if ti else None  # [(N, 77)] per encoder: the captions are tokenized once

    def dco_step(idx, z, noise, t):
        """One optimizer step on the images idx (B instance images, then B class images with prior preservation), with
        posterior draws z, noise and timesteps t, all on the device: both passes, the backward pass, clipping, the
        AdamW step and the learned rows' rescale. Returns the loss and the gradient norm (scalars) and both errors
        (B,; err_phi zeros at beta 0), detached."""
        # mean, std: (N, 4, h, w) for the instance images, then the class images, already times the VAE's scaling factor
        x0 = mean[idx] + std[idx] * z  # (len(idx), 4, h, w): a fresh sample of each image's latent posterior
        x_t = q_sample(x0, t, noise, a_bar).to(dtype)
        # Without a learned token the captions are their own base captions: the cached embeddings serve both models.
        c = base[idx] if ti is None else Cond(*text.encode_tokens([tok[idx] for tok in tokens]), ids[idx])
        c = c.to(dtype=dtype)

        # The frozen base model on the base caption (LoRA scale 0, no autograd graph) runs first, so that its pass does
        # not add to the activations the LoRA pass keeps for the backward pass.
        err_phi = torch.zeros(B, device=device)
        if args.beta > 0:
            with torch.no_grad(), lora_lib.lora_scale(unet, 0.0):
                b = base[idx[:B]].to(dtype=dtype)
                err_phi = eps_mse(unet(x_t[:B], t[:B], b.context, b.pooled, b.time_ids), noise[:B])
        err_theta = eps_mse(unet(x_t, t, c.context, c.pooled, c.time_ids), noise)  # LoRA on
        # As officially, min-SNR weights both errors: inside DCO's sigmoid that makes beta per-timestep (beta w(t)); at
        # beta 0 it weights the loss. The prior term is not weighted.
        w = min_snr_weight(t[:B], args.snr_gamma, a_bar) if args.snr_gamma else 1.0
        loss = diffusion_loss(w * err_theta[:B], w * err_phi, args.beta).mean()
        if prior:
            loss = loss + args.prior_weight * err_theta[B:].mean()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(trained, args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ti is not None:
            ti.retract()
        return loss.detach(), grad_norm, err_theta[:B].detach(), err_phi

    if args.cuda_graph:
        dco_step = graph_step(dco_step, trained, optimizer, B * (2 if prior else 1), mean.shape[1:], device)

    def save(step):
        # "step" and "dco.cwd": what saved_run reads back if this save stops before settings.json is written
        meta = {"step": str(step), "dco.cwd": os.getcwd(), **run_metadata(args, step)}
        save_training_state(ckpt, {f"param.{i}": p for i, p in enumerate(trained)}, optimizer, rng, meta)
        save_outputs(args, unet, ti, step)

    log = open_log(os.path.join(args.out, "log.jsonl"), start)
    with ctrl_c_deferred() as interrupted:  # Ctrl-C finishes the current step, then saves
        bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="training")
        for step in bar:
            # A batch of instance images, plus as many class images for prior preservation.
            idx = torch.randint(0, n_instance, (B,), generator=rng)
            if prior:
                idx = torch.cat([idx, n_instance + torch.randint(0, len(prior), (B,), generator=rng)])
            z = torch.randn((len(idx), *mean.shape[1:]), generator=rng)
            noise = offset_noise(z.shape, args.offset_noise, rng)
            t = torch.randint(0, len(a_bar), (len(idx),), generator=rng)
            loss, grad_norm, err_theta, err_phi = dco_step(*(v.to(device) for v in (idx, z, noise, t)))
            if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):  # the step is taken, but never saved
                kept = "keeping the last good checkpoint" if os.path.exists(ckpt) else "no checkpoint was saved before"
                sys.exit(f"error: the loss is {loss.item()} and the gradient norm {grad_norm.item()} at step {step}; "
                         f"stopped, {kept}")
            record = {"step": step, "loss": loss.item(), "err_theta": err_theta.mean().item(),
                      "err_phi": err_phi.mean().item()}
            log.write(json.dumps(record) + "\n")
            log.flush()
            shown = {"loss": f"{record['loss']:.4f}"}
            if args.beta > 0:  # DCO's margin, below 0 where the LoRA beats the frozen model (which beta 0 never runs)
                shown["margin"] = f"{record['err_theta'] - record['err_phi']:+.2e}"
            bar.set_postfix(shown)

            if interrupted:
                save(step + 1)
                print(f"interrupted: saved step {step + 1} in {args.out}; continue with --resume", file=sys.stderr)
                sys.exit(130)  # the status of a process stopped by Ctrl-C, as the other scripts end
            if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
                save(step + 1)
                save_grid(args, unet, vae, text, sample_prompt, step + 1, device)
        log.close()
        save(args.steps)
    if args.save_every:  # the run is saved: from here Ctrl-C stops at once
        save_grid(args, unet, vae, text, sample_prompt, args.steps, device)
    print(f"wrote {os.path.join(args.out, lora_lib.DIFFUSERS_FILE)}")


if __name__ == "__main__":
    run(main, parse_args)
