"""The paper's metrics and its Pareto sweep over the consistency-guidance scale w_con:

    python evaluate.py --model sdxl/ --lora out_dco/ --lora out_db/ --ref-images dog/ \\
        --prompts prompts/dreambooth_live.txt --subject "<dog>" --dino dinov2-large/ --siglip siglip/ --out results/

For every method (a --lora, or a --subject-lora/--style-lora pair), prompt, seed and w_con it generates one image and
scores it with two kinds of similarity:

    image similarity  mean over the reference images of cos(DINOv2(generated), DINOv2(reference)), where the DINOv2
                      embedding is the CLS token of the last layer, after the final LayerNorm
    text similarity   cos(SigLIP image embedding, SigLIP text embedding of the prompt with --class-subject, e.g. "dog",
                      for the subject); without it, of each method's base prompt, its learned tokens replaced by their
                      initializer words (methods that learned other tokens, or none, are then scored against other
                      texts, which is warned about); the same with CLIP if --clip

Each (method, w_con) gets the mean and standard error (sample std / sqrt(n), n = prompts x seeds) of each score in
results.csv and results.md, per-image scores in scores.csv, and pareto.png (image vs text similarity, one curve per
method, points labelled by w_con). w_con "cfg" is plain CFG with the fine-tuned model; 0 is the base model's CFG.
Merge mode (--subject-lora A --style-lora B --style-images DIR) loads both LoRAs at once and scores subject similarity
(DINOv2 to --ref-images), style similarity (DINOv2 to --style-images) and text similarity: the paper's merge table.

Preprocessing is each checkpoint's own preprocessor_config.json, applied by transformers' PIL backend. For the official
checkpoints: DINOv2 (facebook/dinov2-*) resizes the short side to 256 (bicubic), center-crops 224, ImageNet mean/std;
SigLIP resizes to its square input (bicubic, no crop: 384 for siglip-so400m-patch14-384, 224 for
siglip-base-patch16-224), mean = std = 0.5; CLIP resizes the short side to 224 (bicubic), center-crops 224, CLIP
mean/std. Text is padded to the text model's full length (64 for SigLIP, which was trained that way and pools the last
position; 77 for CLIP) and given no attention mask, as SigLIP's processor gives none. SigLIP's tokenizer needs the
sentencepiece package.

The metric folders are local transformers checkpoints (model.safetensors), e.g. facebook/dinov2-large,
google/siglip-so400m-patch14-384, openai/clip-vit-large-patch14. The paper scores with a DINOv2 ViT and a SigLIP ViT;
numbers compare only between runs that used the same checkpoints, so report which ones you used.

Images are cached in OUT/images/ (a short hash of method, prompt, seed, w_con and sampling settings as the file name, an
index.json beside them), so a rerun, or a run resumed after an interruption, generates only the missing images.
"""
import argparse
import csv
import hashlib
import io
import json
import os
import warnings
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from safetensors import SafetensorError
from tqdm import tqdm

import cli
import lora as lora_lib
import sample
from checkpoint import ModelError, atomic, write_text
from data import IMAGE_SUFFIXES, image_files, load_rgb

BATCH = 16


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=cli.Help)
    p.add_argument("--model", required=True, help="SDXL folder in the official (diffusers) layout, or the single file")
    p.add_argument("--config", help="with a single-file --model: a folder with the SDXL configs and tokenizers")
    p.add_argument("--lora", type=cli.lora_spec, action="append", default=[],
                   help="PATH[:SCALE], a file or a training output folder; repeat for one curve per LoRA")
    p.add_argument("--embeds", type=cli.embeds_spec, action="append", default=[],
                   metavar="FILE[:TOKEN[:INITWORD]]",
                   help="learned_embeds files loaded with every LoRA, as sample.py takes them; TOKEN/INITWORD are "
                        "needed only if the file does not name them (the official code's)")
    p.add_argument("--subject-lora", type=cli.lora_spec, action="append", default=[],
                   help="merge mode: subject LoRA (repeatable)")
    p.add_argument("--style-lora", type=cli.lora_spec, action="append", default=[],
                   help="merge mode: style LoRA, paired in order")
    p.add_argument("--style-images", help="merge mode: folder of style reference images")
    p.add_argument("--ref-images", required=True, help="folder of subject (or style) reference images")
    p.add_argument("--prompts", required=True, help="text file, one prompt a line; {} is replaced by --subject")
    p.add_argument("--subject", help="phrase that fills {} in the prompts, e.g. '<dog>' or 'sks dog'")
    p.add_argument("--class-subject", help="phrase that fills {} in the text scored for prompt fidelity, e.g. 'dog' "
                   "(default: each method's base prompt)")
    p.add_argument("--suffix", default="", help="appended to every prompt, e.g. ' in watercolor painting style'")
    p.add_argument("--w-con", default="0,1,2,3,4,5", help="consistency-guidance scales; 'cfg': plain CFG")
    p.add_argument("--seeds", type=cli.positive_int, default=4, help="seeds 0..N-1 for every prompt")
    p.add_argument("--dino", required=True, help="local DINOv2 checkpoint folder (transformers, safetensors)")
    p.add_argument("--siglip", help="local SigLIP checkpoint folder")
    p.add_argument("--clip", help="local CLIP checkpoint folder")
    p.add_argument("--out", default="results", help="folder for the tables, plots and cached images")
    p.add_argument("--cfg", type=cli.number, default=5.0, help="classifier-free guidance scale w_txt")
    p.add_argument("--steps", type=cli.positive_int, default=50, help="Euler steps")
    p.add_argument("--width", type=cli.positive_int, default=1024, help="a multiple of 32 for SDXL")
    p.add_argument("--height", type=cli.positive_int, default=1024, help="a multiple of 32 for SDXL")
    p.add_argument("--negative-prompt", default="", help="empty: SDXL's zero unconditional embedding")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="UNet and text encoders; auto: bfloat16 on GPU, float32 on CPU. The VAE stays float32.")
    cli.add_cuda_graph(p, "each UNet call")
    cli.add_compile(p)
    args = p.parse_args(argv)
    cli.check_steps(p, "--steps", args.steps)
    return args


def read_prompts(path, subject, suffix):
    if not os.path.isfile(path):
        raise ModelError(f"{path}: no such prompts file")
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    except UnicodeDecodeError:
        raise ModelError(f"{path}: not UTF-8 text") from None
    if not lines:
        raise ModelError(f"{path}: no prompts (one a line; lines starting with # are comments)")
    if subject is None and any("{}" in line for line in lines):
        raise ModelError(f"{path}: the prompts have a {{}} placeholder; give the subject phrase with --subject")
    if subject is not None and not any("{}" in line for line in lines):  # the subject would be dropped unsaid
        raise ModelError(f"{path}: no prompt has a {{}} placeholder for the subject phrase {subject!r}")
    repeated = next((line for i, line in enumerate(lines) if line in lines[:i]), None)
    if repeated is not None:  # its images would count twice
        raise ModelError(f"{path}: the prompt {repeated!r} is repeated")
    return [line.replace("{}", subject or "") + suffix for line in lines]


def list_images(folder, flag):
    if not folder or not os.path.isdir(folder):
        raise ModelError(f"{flag} {folder}: no such folder")
    paths = [os.path.join(folder, f) for f in image_files(folder)]
    if not paths:
        raise ModelError(f"{flag} {folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    for path in paths:  # a bad one fails now, not after the sweep has generated every image
        load_rgb(path)
    return paths


def parse_w_con(text):
    try:
        w_cons = [None if w.strip() == "cfg" else float(w) for w in text.split(",")]
    except ValueError:
        raise ModelError(f"--w-con {text!r}: expected numbers or 'cfg', comma separated") from None
    if not all(w is None or np.isfinite(w) for w in w_cons):
        raise ModelError(f"--w-con {text!r}: expected finite numbers")
    if len(set(w_cons)) != len(w_cons):  # a repeated value would count its images twice
        raise ModelError(f"--w-con {text!r}: a value is repeated")
    return w_cons


def w_label(w):
    return "cfg" if w is None else f"{w:g}"


def weights_digest(spec):
    """sha1 of the files a LoRA spec loads, so that retraining into the same folder invalidates its cached images."""
    path = cli.split_spec(spec, 2)[0]  # PATH[:SCALE], parsed as load_pipeline parses it
    if not os.path.exists(path):
        raise ModelError(f"LoRA {path}: not found")
    # The files load_pipeline reads: the weights, a peft file's config beside them, an output folder's learned tokens.
    weights = lora_lib.lora_path(path)
    files = [f for f in (weights, lora_lib.peft_config_path(weights)) if f]
    return files_digest(files + (sample.folder_embeds(path) if os.path.isdir(path) else []))


def files_digest(files):
    """sha1 of the files' contents, in order."""
    h = hashlib.sha1()
    for file in files:
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


# --- metric models ---

METRIC_MODELS = {"dino": ("dinov2", "Dinov2Model"), "siglip": ("siglip", "SiglipModel"), "clip": ("clip", "CLIPModel")}


def pil_backend():
    """The image processor's PIL backend in every setup: transformers 5 would pick torchvision's where it is installed,
    and its resizing differs slightly, so that scores would depend on what else is installed."""
    import transformers
    return {"backend": "pil"} if int(transformers.__version__.split(".")[0]) >= 5 else {"use_fast": False}


class Embedder:
    """One metric model, DINOv2 (images only), SigLIP or CLIP; embeddings come out L2-normalised. It loads on the CPU,
    so that a bad folder fails before generation starts without taking GPU memory from SDXL; .to(device) to score."""

    def __init__(self, kind, folder):
        if not os.path.isfile(os.path.join(str(folder), "model.safetensors")):
            raise ModelError(f"--{kind} {folder}: no model.safetensors there (a local transformers checkpoint folder)")
        import transformers  # here, not at the top: it takes seconds to import, and --help should not wait
        from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer
        try:
            model_type = AutoConfig.from_pretrained(folder, local_files_only=True).model_type
            if model_type != METRIC_MODELS[kind][0]:  # transformers would load it anyway, with random weights
                raise ModelError(f"--{kind} {folder}: a {model_type} checkpoint, not {METRIC_MODELS[kind][0]}")
            self.processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True, **pil_backend())
            self.tokenizer = None if kind == "dino" else AutoTokenizer.from_pretrained(folder, local_files_only=True)
            model_class = getattr(transformers, METRIC_MODELS[kind][1])
            self.model, info = model_class.from_pretrained(folder, local_files_only=True, use_safetensors=True,
                                                           output_loading_info=True)
        except (OSError, ValueError, RuntimeError, ImportError, SafetensorError) as e:
            first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
            raise ModelError(f"--{kind} {folder}: cannot load: {first}") from None
        missing = sorted(info["missing_keys"]) + sorted(k[0] if isinstance(k, tuple) else k for k in
                                                        info.get("mismatched_keys", []))
        if missing:  # transformers fills them with random weights, and the metric would be noise
            raise ModelError(f"--{kind} {folder}: model.safetensors lacks the weight {missing[0]!r} (or it is "
                             "mis-shaped); is it the whole checkpoint?")
        self.model.eval()
        self.kind, self.device = kind, "cpu"

    def to(self, device):
        self.model.to(device)
        self.device = device
        return self

    @staticmethod
    def pooled(out):
        return out if torch.is_tensor(out) else out.pooler_output  # transformers 5 returns a model output

    @torch.no_grad()
    def images(self, paths):
        out = []
        for i in range(0, len(paths), BATCH):
            images = [load_rgb(p) for p in paths[i:i + BATCH]]  # as training reads them: 16-bit, alpha, EXIF
            pixels = self.processor(images=images, return_tensors="pt").pixel_values.to(self.device)
            if self.kind == "dino":
                emb = self.model(pixel_values=pixels).last_hidden_state[:, 0]  # CLS token
            else:
                emb = self.pooled(self.model.get_image_features(pixel_values=pixels))
            out.append(F.normalize(emb.float(), dim=-1).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def texts(self, texts):
        length = self.model.config.text_config.max_position_embeddings
        ids = self.tokenizer(texts, padding="max_length", max_length=length, truncation=True,
                             return_tensors="pt").input_ids.to(self.device)
        return F.normalize(self.pooled(self.model.get_text_features(input_ids=ids)).float(), dim=-1).cpu()


def score(entries, metrics, refs):
    """Per-image scores: {name: (N,) cosine similarities}. refs: {name: reference image paths} for DINOv2 scores."""
    paths = [e["path"] for e in entries]
    scores = {}
    dino = metrics["dino"].images(paths)
    for name, ref_paths in refs.items():
        scores[name] = (dino @ metrics["dino"].images(ref_paths).T).mean(dim=1)  # mean over reference images
    texts = sorted({e["scored_text"] for e in entries})
    for kind in ("siglip", "clip"):
        if kind in metrics:
            text_emb = dict(zip(texts, metrics[kind].texts(texts)))
            img = metrics[kind].images(paths)
            scores[f"text_{kind}"] = (img * torch.stack([text_emb[e["scored_text"]] for e in entries])).sum(dim=1)
    return {name: s.numpy().astype(np.float64) for name, s in scores.items()}


def with_scored_texts(entries, class_texts):
    """Each entry with the text its prompt fidelity is scored against: class_texts[prompt] ({prompt: the prompt with
    --class-subject}) where given, else its method's base prompt."""
    if class_texts:
        return [dict(e, scored_text=class_texts[e["prompt"]]) for e in entries]
    per_prompt = defaultdict(set)
    for e in entries:
        per_prompt[e["prompt"]].add(e["base_prompt"])
    differ = next((sorted(t) for t in per_prompt.values() if len(t) > 1), None)
    if differ:
        warnings.warn(f"the methods' prompt fidelity is scored against different texts ({differ[0]!r}, {differ[1]!r}: "
                      "each method's learned tokens replaced by their initializer words), so it does not compare "
                      "between them; give --class-subject (e.g. 'dog') to score every method against one text")
    return [dict(e, scored_text=e["base_prompt"]) for e in entries]


def summarize(entries, scores):
    """Mean and standard error of every score per (method, w_con), in the order first seen."""
    groups = defaultdict(list)
    for i, e in enumerate(entries):
        groups[(e["method"], e["w_con"])].append(i)
    rows = []
    for (method, w), idx in groups.items():
        row = {"method": method, "w_con": w_label(w), "n": len(idx)}
        for name, s in scores.items():
            v = s[idx]
            row[f"{name}_mean"] = float(v.mean())
            row[f"{name}_se"] = float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")
        rows.append(row)
    return rows


# --- image cache and generation ---

class ImageCache:
    """PNG files named by a hash of their key, and index.json mapping each hash to what made it. Both are written
    atomically, image first, so an interruption loses at most the image being generated."""

    def __init__(self, folder):
        self.folder = folder
        os.makedirs(folder, exist_ok=True)
        self.index_path = os.path.join(folder, "index.json")
        self.index = {}
        if os.path.exists(self.index_path):
            try:
                with open(self.index_path) as f:
                    self.index = json.load(f)
            except ValueError as e:
                raise ModelError(f"{self.index_path}: not a readable image index ({e}); delete it to start over, "
                                 "its images are made again") from None

    @staticmethod
    def key(method_id, prompt, seed, w_con):
        return hashlib.sha1(json.dumps([method_id, prompt, seed, w_con], sort_keys=True).encode()).hexdigest()[:16]

    def get(self, key):
        entry = self.index.get(key)
        if entry and os.path.exists(os.path.join(self.folder, entry["file"])):
            return dict(entry, path=os.path.join(self.folder, entry["file"]))
        return None

    def put(self, key, image, entry):
        with atomic(os.path.join(self.folder, f"{key}.png")) as tmp:
            image.save(tmp, format="PNG")
        self.index[key] = dict(entry, file=f"{key}.png")
        write_text(self.index_path, json.dumps(self.index, indent=1))


def make_generator(args, loras):
    """Load SDXL with loras applied together -> (draw(prompt, seed, w_con) -> PIL image, base(prompt) -> str)."""
    sample.check_sides(args.model, args.config, width=args.width, height=args.height)  # from the configs, first
    pipe = sample.load_pipeline(args.model, loras=loras, embeds=args.embeds, device=args.device, dtype=args.dtype,
                                config=args.config)
    if args.compile:
        pipe.unet.compile_blocks()

    def draw(prompt, seed, w_con):
        sample.warn_unloaded_tokens(pipe, prompt)
        images = sample.generate(pipe, prompt, seed, w_con=w_con, cfg=args.cfg, steps=args.steps, width=args.width,
                                 height=args.height, negative_prompt=args.negative_prompt, graph=args.cuda_graph)
        return sample.to_pil(images)

    return draw, lambda prompt: sample.base_prompt(pipe.tokens, prompt)


def base_model_id(args):
    """What the images depend on besides the LoRAs: the base model's weight files (path, size, modification time),
    the --config folder, and the resolved device and precision."""
    files = [args.model] if os.path.isfile(args.model) else sorted(
        os.path.join(args.model, sub, f) for sub in ("unet", "vae", "text_encoder", "text_encoder_2")
        if os.path.isdir(os.path.join(args.model, sub))
        for f in os.listdir(os.path.join(args.model, sub)) if f.endswith(".safetensors"))
    device, dtype = cli.resolve_device(args.device, args.dtype)
    return dict(path=args.model, files=[(f, os.path.getsize(f), os.path.getmtime(f)) for f in files],
                config=args.config, device=device.type, dtype=str(dtype))


def sweep(args, methods, prompts, seeds, w_cons, cache, make_generator):
    """Every method x w_con x prompt x seed, from the cache or generated -> list of cache entries."""
    settings = {k: getattr(args, k) for k in ("cfg", "steps", "width", "height", "negative_prompt")}
    settings["model"] = base_model_id(args)
    if args.compile:  # compiled kernels round otherwise; left out when unset, so that earlier caches still match
        settings["compiled"] = True
    if args.embeds:  # as the LoRA files: the specs, and the files' contents
        settings["embeds"] = [[spec, files_digest([cli.split_spec(spec, 1)[0]])] for spec in args.embeds]
    entries = []
    for label, loras in methods:
        method_id = dict(settings, loras=loras, weights=[weights_digest(spec) for spec in loras])
        jobs = [(cache.key(method_id, p, s, w), p, s, w) for w in w_cons for p in prompts for s in seeds]
        missing = [job for job in jobs if cache.get(job[0]) is None]
        if missing:
            draw, base = make_generator(args, loras)
            for key, prompt, seed, w in tqdm(missing, desc=f"generating {label}"):
                cache.put(key, draw(prompt, seed, w), dict(method=label, loras=loras, prompt=prompt,
                                                          base_prompt=base(prompt), seed=seed, w_con=w))
            del draw, base  # frees this method's pipeline before the next one loads
        entries += [dict(cache.get(key), method=label) for key, *_ in jobs]
    return entries


# --- outputs ---

def to_csv(rows):
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def to_markdown(rows, names):
    head = ["method", "w_con", "n"] + names
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], r["w_con"], str(r["n"])] + [
            f"{r[f'{n}_mean']:.4f}" + (f" ± {r[f'{n}_se']:.4f}" if r["n"] > 1 else "") for n in names]  # se: n > 1
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def plot_pareto(rows, x_name, y_name, path, size=(900, 650), margin=80):
    """Mean y_name (e.g. image similarity) against mean x_name (e.g. text similarity) with +-1 SE bars; one curve per
    method through its numeric w_con in the order given, the 'cfg' point unconnected."""
    W, H, m = *size, margin
    def extent(name):  # the means with their error bars, so that every bar fits
        se = [r[f"{name}_se"] if np.isfinite(r[f"{name}_se"]) else 0.0 for r in rows]
        return [r[f"{name}_mean"] - e for r, e in zip(rows, se)] + [r[f"{name}_mean"] + e for r, e in zip(rows, se)]
    (x0, x1), (y0, y1) = [(min(v) - 0.1 * (max(v) - min(v) + 1e-3), max(v) + 0.1 * (max(v) - min(v) + 1e-3))
                          for v in (extent(x_name), extent(y_name))]

    def to_px(x, y):
        return m + (x - x0) / (x1 - x0) * (W - 2 * m), H - m - (y - y0) / (y1 - y0) * (H - 2 * m)
    img = Image.new("RGB", size, "white")
    d, font = ImageDraw.Draw(img), ImageFont.load_default()
    d.rectangle([m, m, W - m, H - m], outline="black")
    for i in range(6):
        x, y = x0 + (x1 - x0) * i / 5, y0 + (y1 - y0) * i / 5
        d.text((to_px(x, y0)[0] - 15, H - m + 8), f"{x:.3f}", fill="black", font=font)
        d.text((m - 45, to_px(x0, y)[1] - 6), f"{y:.3f}", fill="black", font=font)
    d.text((W / 2 - 60, H - m + 30), x_name, fill="black", font=font)
    d.text((m, m - 25), y_name, fill="black", font=font)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for k, method in enumerate(methods):
        color, pts = COLORS[k % len(COLORS)], [r for r in rows if r["method"] == method]
        curve = [to_px(r[f"{x_name}_mean"], r[f"{y_name}_mean"]) for r in pts if r["w_con"] != "cfg"]
        if len(curve) > 1:
            d.line(curve, fill=color, width=2)
        for r in pts:
            (x, xe), (y, ye) = [(r[f"{n}_mean"], r[f"{n}_se"]) for n in (x_name, y_name)]
            px, py = to_px(x, y)
            if np.isfinite(xe) and np.isfinite(ye):
                d.line([to_px(x - xe, y), to_px(x + xe, y)], fill=color)
                d.line([to_px(x, y - ye), to_px(x, y + ye)], fill=color)
            d.ellipse([px - 4, py - 4, px + 4, py + 4], fill=color)
            d.text((px + 6, py - 14), r["w_con"], fill=color, font=font)
        d.rectangle([W - m - 190, m + 10 + 16 * k, W - m - 180, m + 20 + 16 * k], fill=color)
        d.text((W - m - 175, m + 8 + 16 * k), method[:30], fill=color, font=font)
    with atomic(path) as tmp:
        img.save(tmp, format="PNG")


def main(args, make_generator=make_generator):
    merge = bool(args.subject_lora or args.style_lora)
    if merge and (len(args.subject_lora) != len(args.style_lora) or not args.style_images or args.lora):
        raise ModelError("merge mode needs as many --subject-lora as --style-lora, --style-images, and no --lora")
    if not merge and not args.lora:
        raise ModelError("give at least one --lora (or --subject-lora with --style-lora)")
    if not (args.siglip or args.clip):
        raise ModelError("give --siglip and/or --clip for the text similarity")
    methods = ([(f"{a} + {b}", [a, b]) for a, b in zip(args.subject_lora, args.style_lora)] if merge
               else [(spec, [spec]) for spec in args.lora])
    if len({label for label, _ in methods}) != len(methods):
        raise ModelError("a --lora (or subject + style pair) is given twice")
    if args.seeds < 1:
        raise ModelError(f"--seeds {args.seeds}: needs at least 1")
    prompts, w_cons = read_prompts(args.prompts, args.subject, args.suffix), parse_w_con(args.w_con)
    class_prompts = args.class_subject and read_prompts(args.prompts, args.class_subject, args.suffix)
    refs = {"subject_dino": list_images(args.ref_images, "--ref-images"),
            "style_dino": list_images(args.style_images, "--style-images")} if merge \
        else {"image_dino": list_images(args.ref_images, "--ref-images")}
    device = cli.resolve_device(args.device, args.dtype)[0]
    args.cuda_graph = cli.cuda_graph_on(args.cuda_graph, device)
    metrics = {k: Embedder(k, getattr(args, k)) for k in ("dino", "siglip", "clip") if getattr(args, k)}

    cache = ImageCache(os.path.join(args.out, "images"))
    entries = sweep(args, methods, prompts, list(range(args.seeds)), w_cons, cache, make_generator)
    class_texts = class_prompts and dict(zip(prompts, class_prompts))
    entries = with_scored_texts(entries, class_texts)
    scores = score(entries, {k: m.to(device) for k, m in metrics.items()}, refs)
    rows = summarize(entries, scores)

    per_image = [{"method": e["method"], "w_con": w_label(e["w_con"]), "seed": e["seed"], "prompt": e["prompt"],
                  "scored_text": e["scored_text"], "file": e["file"], **{n: float(s[i]) for n, s in scores.items()}}
                 for i, e in enumerate(entries)]
    write_text(os.path.join(args.out, "scores.csv"), to_csv(per_image))
    write_text(os.path.join(args.out, "results.csv"), to_csv(rows))
    write_text(os.path.join(args.out, "results.md"), to_markdown(rows, list(scores)))
    text_name = "text_siglip" if "siglip" in metrics else "text_clip"
    plot_pareto(rows, text_name, next(iter(refs)), os.path.join(args.out, "pareto.png"))
    print(to_markdown(rows, list(scores)) + f"wrote {args.out}/results.csv, results.md, scores.csv, pareto.png")
    return rows


if __name__ == "__main__":
    cli.run(main, parse_args)
