"""A CPU-sized SDXL world: procedural captioned images with exact ground truth, and a tiny SDXL pretrained on them.

    python toy.py [--out toy-sdxl] [--seed 0] [--quick]      pretrain (resumable) and save in the SDXL layout
    python toy.py data --subject 0 --out data/sub0           a held-out subject's training folder (NAME.png + NAME.txt)
    python toy.py data --style 0 --out data/sty0             a held-out style's single training image
    python toy.py compare [--model toy-sdxl] [--quick]       DreamBooth vs prior preservation vs DCO, in miniature

The world: 64x64 images of one or two objects (shape, color, pattern, size, position) on a background, optionally
in a whole-image style. Held out of pretraining are a few personal subjects (a shape + color + pattern combination
the model never saw) and styles (never seen at all); their captions name them with a learned token ("<sub0> star").
The metrics read the same attributes back from any image, so subject, style and prompt fidelity have exact meaning.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, replace
from itertools import permutations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter
from safetensors import safe_open
from tqdm import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

import evaluate
from checkpoint import load_vae, save_component, save_safetensors
from dco import alphas_cumprod, eps_mse, min_snr_weight, q_sample
from sample import conditioning, initial_noise, load_sdxl
from sampler import sample
from text import TextEncoders, time_ids
from unet_sdxl import UNet, UNetConfig
from vae import AutoencoderKL, VAEConfig, decode_latents

SIZE = 64  # image side in pixels

# ---------------------------------------------------------------------------------------------- the world

SHAPES = ("circle", "square", "triangle", "star", "cross")
COLORS = {"red": (220, 40, 40), "yellow": (240, 215, 40), "green": (40, 180, 70), "blue": (40, 90, 230),
          "purple": (150, 60, 200), "white": (245, 245, 245)}
PATTERNS = ("plain", "stripes", "dots")
BACKGROUNDS = {"sand": (205, 180, 125), "grass": (80, 115, 55), "sky": (140, 185, 225), "night": (30, 40, 90),
               "stone": (125, 125, 125)}
SIZES = {"small": 16, "big": 28}  # side of the box the shape fills, in pixels
POSITIONS = {"left": (18, 32), "right": (46, 32), "top": (32, 18), "bottom": (32, 46), "center": (32, 32)}
STYLES = ("none", "shadow", "outline")  # seen in pretraining
HELD_OUT_STYLES = {"frame": "<sty0>", "vignette": "<sty1>"}  # never seen in pretraining; captions use the token
BLACK, FRAME = (10, 10, 10), (230, 110, 190)
PAIRS = (("left", "right"), ("top", "bottom"))  # where the two objects of a two-object scene stand


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    pattern: str = "plain"
    pattern_color: str = "white"  # the stripes' or dots' color; unused when plain
    size: str = "big"
    position: str = "center"
    token: str = ""  # a learned word naming a held-out subject; the caption then says "<sub0> star" only


@dataclass(frozen=True)
class Scene:
    objects: tuple
    background: str
    style: str = "none"


# A subject is an object whose (shape, color, pattern) never occurs in pretraining; init_word is its shape.
SUBJECTS = (Obj("star", "blue", "dots", "yellow", token="<sub0>"),
            Obj("circle", "purple", "stripes", "yellow", token="<sub1>"),
            Obj("square", "green", "dots", "white", token="<sub2>"))


def is_held_out(obj):
    return any((obj.shape, obj.color, obj.pattern) == (s.shape, s.color, s.pattern) for s in SUBJECTS)


def random_object(rng, size, position):
    while True:
        color, pattern_color = rng.choice(list(COLORS), 2, replace=False)
        obj = Obj(str(rng.choice(SHAPES)), str(color), str(rng.choice(PATTERNS, p=[0.4, 0.3, 0.3])),
                  str(pattern_color), size, position)
        if not is_held_out(obj):
            return obj


def random_scene(rng, styles=STYLES):
    """A pretraining scene: one object anywhere, or two of distinct colors side by side (at most one of them big,
    so that they never touch)."""
    if rng.random() < 0.6:
        objects = (random_object(rng, str(rng.choice(list(SIZES))), str(rng.choice(list(POSITIONS)))),)
    else:
        pair, sizes = PAIRS[rng.integers(2)], (("small", "small"), ("big", "small"), ("small", "big"))[rng.integers(3)]
        a = random_object(rng, sizes[0], pair[0])
        b = a
        while b.color == a.color:
            b = random_object(rng, sizes[1], pair[1])
        objects = (a, b)
    style = str(rng.choice(styles, p=[0.6, 0.2, 0.2] if styles == STYLES else None))
    return Scene(objects, str(rng.choice(list(BACKGROUNDS))), style)


def describe(obj):
    if obj.token:
        return f"a {obj.size} {obj.token} {obj.shape}"
    pattern = "" if obj.pattern == "plain" else f" with {obj.pattern_color} {obj.pattern}"
    return f"a {obj.size} {obj.color} {obj.shape}{pattern}"


def caption(scene):
    """'a small red circle with white stripes at the left and a big blue star at the right on a sand background,
    in shadow style': every attribute of the scene, except a subject's looks, which its token carries."""
    where = {p: "in the center" if p == "center" else f"at the {p}" for p in POSITIONS}
    text = " and ".join(f"{describe(o)} {where[o.position]}" for o in scene.objects)
    text += f" on a {scene.background} background"
    if scene.style != "none":
        text += f", in {HELD_OUT_STYLES.get(scene.style, scene.style)} style"
    return text


def shape_mask(shape, cx, cy, side, scale, grow=0):
    """A filled shape centred at (cx, cy) with a box of `side` pixels, drawn `scale` times larger: (H, W) bool.
    grow > 0 widens it by that many pixels all round (the outline style's black edge)."""
    img = Image.new("L", (SIZE * scale, SIZE * scale))
    draw, r = ImageDraw.Draw(img), side * scale / 2
    x, y = cx * scale, cy * scale
    if shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=255)
    elif shape == "square":
        draw.rectangle([x - 0.88 * r, y - 0.88 * r, x + 0.88 * r, y + 0.88 * r], fill=255)
    elif shape == "triangle":
        draw.polygon([(x, y - r), (x + r, y + 0.8 * r), (x - r, y + 0.8 * r)], fill=255)
    elif shape == "star":
        angles = np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        draw.polygon([(x + q * np.cos(a), y - q * np.sin(a) + 0.1 * r) for q, a in zip(radii, angles)], fill=255)
    elif shape == "cross":
        w = 0.36 * r
        draw.polygon([(x - w, y - r), (x + w, y - r), (x + w, y - w), (x + r, y - w), (x + r, y + w), (x + w, y + w),
                      (x + w, y + r), (x - w, y + r), (x - w, y + w), (x - r, y + w), (x - r, y - w), (x - w, y - w)],
                     fill=255)
    if grow:
        img = img.filter(ImageFilter.MaxFilter(2 * grow * scale + 1))
    return np.asarray(img) > 127


def pattern_mask(pattern, cx, cy, scale):
    """Vertical stripes (4 px on, 4 off) or dots (radius 2.5 px on an 8 px grid), anchored at the object's centre."""
    xx = (np.arange(SIZE * scale) + 0.5) / scale
    if pattern == "stripes":
        return np.broadcast_to(((xx - cx + 2) // 4) % 2 == 0, (SIZE * scale, SIZE * scale))
    if pattern == "dots":
        dx, dy = ((xx - cx + 4) % 8 - 4) ** 2, ((xx - cy + 4) % 8 - 4) ** 2
        return dy[:, None] + dx[None, :] < 2.5 ** 2
    return np.zeros((SIZE * scale, SIZE * scale), bool)


def apply_style(arr, style):
    """The held-out styles, on a (64, 64, 3) float array (the pretraining ones are drawn with the objects)."""
    if style == "frame":
        arr = arr.copy()
        arr[:4], arr[-4:], arr[:, :4], arr[:, -4:] = FRAME, FRAME, FRAME, FRAME
        return arr
    if style == "vignette":  # darken towards the corners, leaving the middle (where objects stand) alone
        yy, xx = np.mgrid[:SIZE, :SIZE] + 0.5
        r = np.hypot(xx - SIZE / 2, yy - SIZE / 2) / (SIZE / 2 * np.sqrt(2))
        return arr * (1 - 0.8 * np.clip((r - 0.6) / 0.4, 0, 1) ** 1.5)[..., None]
    return arr


def render(scene, rng, scale=2):
    """Draw a scene (anti-aliased by drawing `scale` times larger) -> 64x64 RGB PIL image. rng jitters placement."""
    arr = np.empty((SIZE * scale, SIZE * scale, 3), np.float32)
    arr[:] = BACKGROUNDS[scene.background]
    places = [(*(np.array(POSITIONS[o.position]) + rng.uniform(-2, 2, 2)), SIZES[o.size] + rng.uniform(-1, 1))
              for o in scene.objects]
    if scene.style == "shadow":  # the background, darker, under each object moved 3 px right and down
        for obj, (cx, cy, side) in zip(scene.objects, places):
            arr[shape_mask(obj.shape, cx + 3, cy + 3, side, scale)] = np.multiply(BACKGROUNDS[scene.background], 0.5)
    for obj, (cx, cy, side) in zip(scene.objects, places):
        if scene.style == "outline":
            arr[shape_mask(obj.shape, cx, cy, side, scale, grow=2)] = BLACK
        arr[shape_mask(obj.shape, cx, cy, side, scale)] = COLORS[obj.color]
        inner = shape_mask(obj.shape, cx, cy, side - 6, scale)  # a rim of the main color keeps it the majority
        arr[inner & pattern_mask(obj.pattern, cx, cy, scale)] = COLORS[obj.pattern_color]
    arr = arr.reshape(SIZE, scale, SIZE, scale, 3).mean((1, 3))  # box-filter down to 64x64
    return Image.fromarray(np.clip(apply_style(arr, scene.style), 0, 255).round().astype(np.uint8))


# ---------------------------------------------------------------------------------------------- reading images back

def dist(arr, color):
    return np.linalg.norm(arr - np.asarray(color, np.float32), axis=-1)


def estimate_background(arr):
    """The most common color inside the 4-px border (the frame style paints it): mean of the pixels near the mode."""
    inner = arr[4:-4, 4:-4].reshape(-1, 3)
    bins = (inner // 32).astype(int) @ np.array([64, 8, 1])
    mode = inner[bins == np.bincount(bins).argmax()].mean(0)
    return inner[dist(inner, mode) < 40].mean(0)


def shift(mask, dy, dx):
    """mask moved dy pixels down and dx right, with False coming in."""
    out = np.zeros_like(mask)
    out[max(dy, 0):SIZE + min(dy, 0), max(dx, 0):SIZE + min(dx, 0)] = \
        mask[max(-dy, 0):SIZE - max(dy, 0), max(-dx, 0):SIZE - max(dx, 0)]
    return out


def dilate(mask, r):
    return np.any([shift(mask, dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1)], axis=0)


def components(mask, min_area=20):
    """4-connected components of a bool mask, largest first: list of (N, 2) arrays of (y, x)."""
    seen, found = np.zeros_like(mask), []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0], queue, pixels = True, deque([(y0, x0)]), []
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < SIZE and 0 <= nx < SIZE and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        if len(pixels) >= min_area:
            found.append(np.array(pixels))
    return sorted(found, key=len, reverse=True)


def normalized(coverage, box):
    """Coverage in [0, 1] cropped to a bounding box (y0, y1, x0, x1) and resized to 16x16: a shape at any size."""
    crop = Image.fromarray(coverage[box[0]:box[1] + 1, box[2]:box[3] + 1].astype(np.float32), mode="F")
    return np.asarray(crop.resize((16, 16), Image.BILINEAR))


def template(shape):
    m = shape_mask(shape, 32, 32, 40, 4).reshape(SIZE, 4, SIZE, 4).mean((1, 3))
    ys, xs = np.nonzero(m > 0.5)
    return normalized(m, (ys.min(), ys.max(), xs.min(), xs.max()))


TEMPLATES = {s: template(s) for s in SHAPES}


def read_object(arr, pixels, names, labels, coverage):
    """Attributes of one detected object; labels: per-pixel palette index (-1 where the color is a blend),
    coverage: how far each pixel is from background to object color, in [0, 1]."""
    mask = np.zeros((SIZE, SIZE), bool)
    mask[pixels[:, 0], pixels[:, 1]] = True
    ys, xs = pixels[:, 0], pixels[:, 1]
    counts = np.bincount(labels[mask][labels[mask] >= 0], minlength=len(names))
    main, second = np.argsort(counts)[::-1][:2]
    pattern, pattern_color = "plain", None
    if counts[second] and counts[second] >= 0.06 * counts.sum():
        pattern_color = names[second]
        blob = components(mask & (labels == second), min_area=1)[0]  # stripes: tall; dots: round
        pattern = "stripes" if np.ptp(blob[:, 0]) + 1 >= 1.5 * (np.ptp(blob[:, 1]) + 1) else "dots"
    norm = normalized(coverage * dilate(mask, 1), (ys.min(), ys.max(), xs.min(), xs.max()))
    iou = {s: np.minimum(norm, t).sum() / np.maximum(norm, t).sum() for s, t in TEMPLATES.items()}
    center = ((xs.min() + xs.max()) / 2 + 0.5, (ys.min() + ys.max()) / 2 + 0.5)
    return {"shape": max(iou, key=iou.get), "color": names[main], "pattern": pattern, "pattern_color": pattern_color,
            "size": "big" if max(np.ptp(xs), np.ptp(ys)) + 1 >= 22 else "small",
            "position": min(POSITIONS, key=lambda p: np.hypot(*np.subtract(POSITIONS[p], center))),
            "area": len(pixels)}


def style_scores(arr, objects_mask, bg, t, on_line):
    """How strongly each style shows, in [0, 1]: 0 means absent, 1 means as strong as the renderer draws it."""
    shaded, black = on_line & (t > 0.3) & (t < 0.75), on_line & (t < 0.4)
    below, above = (shift(objects_mask, d, d) & ~objects_mask for d in (3, -3))
    shadow = shaded[below].mean() - shaded[above].mean() if below.any() and above.any() else 0.0
    ring = dilate(objects_mask, 2) & ~objects_mask
    ring[:4], ring[-4:], ring[:, :4], ring[:, -4:] = False, False, False, False
    outline = (black & ring).sum() / max(ring.sum(), 1)
    border = np.ones((SIZE, SIZE), bool)
    border[3:-3, 3:-3] = False
    frame = (dist(arr[border], FRAME) < 70).mean()
    lum = arr @ np.array([0.3, 0.59, 0.11])
    corners = np.concatenate([lum[:4, :4], lum[:4, -4:], lum[-4:, :4], lum[-4:, -4:]]).mean()
    dark = 1 - corners / max(float(bg @ np.array([0.3, 0.59, 0.11])), 1.0)
    clip = lambda v: float(np.clip(v, 0, 1))
    return {"shadow": clip((shadow - 0.1) / 0.4), "outline": clip((outline - 0.15) / 0.45),
            "frame": clip((frame - 0.2) / 0.6), "vignette": clip((dark - 0.15) / 0.4)}


def analyze(image):
    """Read a scene back from an image: background, style scores and the objects' attributes."""
    arr = np.asarray(image.convert("RGB"), np.float32)
    bg = estimate_background(arr)
    names = list(COLORS)
    palette = np.array([COLORS[n] for n in names], np.float32)
    d = np.linalg.norm(arr[:, :, None] - palette, axis=-1)  # (64, 64, colors)
    labels = np.where(d.min(-1) < 70, d.argmin(-1), -1)
    # Background is any shade of its color between black and itself: the vignette's darkening, the outline's
    # black and their anti-aliased edges. t: where a pixel projects on that line, 0 at black and 1 at the background.
    t = np.clip(arr @ bg / (bg @ bg), 0, 1)
    off_line = np.linalg.norm(arr - t[..., None] * bg, axis=-1)
    objects_mask = off_line > 50
    objects_mask[:4], objects_mask[-4:], objects_mask[:, :4], objects_mask[:, -4:] = False, False, False, False
    coverage = np.clip(off_line / 100, 0, 1)
    objects = [read_object(arr, c, names, labels, coverage) for c in components(objects_mask)]
    scores = style_scores(arr, objects_mask, bg, t, ~objects_mask)
    return {"background": min(BACKGROUNDS, key=lambda b: dist(bg, BACKGROUNDS[b])), "style_scores": scores,
            "objects": [o for o in objects if o["area"] >= 30]}


# ---------------------------------------------------------------------------------------------- metrics

def identity(obj):
    """What makes an object itself: shape, color and, when patterned, pattern and pattern color."""
    return ("shape", "color", "pattern") + (("pattern_color",) if obj.pattern != "plain" else ())


def asked(obj):
    """The attributes a prompt states in words: a subject's looks are its token's, so only its size and place."""
    return ("size", "position") if obj.token else identity(obj) + ("size", "position")


def object_matches(obj, found, attributes):
    return sum(found[a] == getattr(obj, a) for a in attributes)


def subject_fidelity(image, subject):
    """Is the subject there and right: the best fraction of its identity attributes that a detected object shows."""
    keys = identity(subject)
    return max((object_matches(subject, o, keys) / len(keys) for o in analyze(image)["objects"]), default=0.0)


def style_fidelity(image, style):
    """How strongly the image shows the style, in [0, 1] (see style_scores)."""
    return analyze(image)["style_scores"][style]


def prompt_fidelity(image, scene):
    """The fraction of the attributes the prompt (caption(scene)) states in words that the image satisfies:
    background, a pretraining style, and each object's attributes; objects are paired with detected ones in the
    way that satisfies the most. A subject's identity and a held-out style are scored by the functions above."""
    read = analyze(image)
    found = read["objects"][:4] + [None] * len(scene.objects)
    score, total = float(read["background"] == scene.background), 1
    if scene.style in STYLES[1:]:
        score, total = score + (read["style_scores"][scene.style] > 0.5), total + 1
    best = max(sum(object_matches(o, f, asked(o)) for o, f in zip(scene.objects, pick) if f is not None)
               for pick in permutations(found, len(scene.objects)))
    total += sum(len(asked(o)) for o in scene.objects)
    return (score + best) / total


def toy_metrics(images, scene):
    """Mean fidelities of images generated for caption(scene): "prompt" always, "subject" when the scene holds a
    subject (an object with a token), "style" when it is in a held-out style. Each in [0, 1]."""
    result = {"prompt": float(np.mean([prompt_fidelity(im, scene) for im in images]))}
    for obj in scene.objects:
        if obj.token:
            result["subject"] = float(np.mean([subject_fidelity(im, obj) for im in images]))
    if scene.style in HELD_OUT_STYLES:
        result["style"] = float(np.mean([style_fidelity(im, scene.style) for im in images]))
    return result


# ---------------------------------------------------------------------------------------------- held-out sets

def subject_scenes(index, n=4, seed=0):
    """A subject's training scenes: alone, at varied places, sizes and backgrounds, in no style."""
    rng = np.random.default_rng([seed, index])
    places, backgrounds = rng.permutation(list(POSITIONS)), rng.permutation(list(BACKGROUNDS))
    return [Scene((replace(SUBJECTS[index], size=("big", "small")[i % 2], position=str(places[i % 5])),),
                  str(backgrounds[i % 5])) for i in range(n)]


def style_scenes(name, seed=0):
    """A held-out style's single training scene."""
    rng = np.random.default_rng([seed, list(HELD_OUT_STYLES).index(name), 1])
    return [replace(random_scene(rng), style=name)]


def learned_token(index=None, style=None):
    """(token, initializer word) for subject `index` or a held-out style: the initializer is a world word."""
    if style is not None:
        return HELD_OUT_STYLES[style], "style"
    return SUBJECTS[index].token, SUBJECTS[index].shape


def eval_scenes(subject=None, style=None, n=8, seed=0):
    """Evaluation prompts as scenes (the prompt is caption(scene), the scene its ground truth): the subject (or a
    world object) at every place and both sizes on every background, every other pair beside a small world object,
    in the pretraining styles, or all in a held-out style when one is given."""
    rng = np.random.default_rng([seed, 7])
    scenes = []
    for i in range(n):
        size, places = ("big", "small")[i % 2], (list(POSITIONS)[i % 5],) if i % 4 < 2 else PAIRS[i % 2]
        main = random_object(rng, size, places[0]) if subject is None else replace(subject, size=size,
                                                                                    position=places[0])
        objects = [main]
        while len(objects) < len(places):
            other = random_object(rng, "small", places[1])
            objects += [other] if other.color != main.color else []
        look = style or ("none", "none", "shadow", "outline")[(i // 2) % 4]
        scenes.append(Scene(tuple(objects), list(BACKGROUNDS)[(i + i // 5) % 5], look))
    return scenes


def write_training_folder(scenes, out, seed=0):
    """Render scenes into out/ as NAME.png + NAME.txt (its caption), the format train.py reads."""
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, scene in enumerate(scenes):
        render(scene, rng).save(os.path.join(out, f"{i:02d}.png"))
        with open(os.path.join(out, f"{i:02d}.txt"), "w") as f:
            f.write(caption(scene) + "\n")


# ---------------------------------------------------------------------------------------------- tokenizers and models

WORDS = ("a", "with", "at", "the", "in", "on", "and", "background", "style", ",", *SHAPES, *COLORS, *PATTERNS,
         *BACKGROUNDS, *SIZES, *POSITIONS, *STYLES[1:])
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
    for word in WORDS:
        while len(pieces := bpe(word, merges)) > 1:
            merges.append((pieces[0], pieces[1]))
            vocab.append(pieces[0] + pieces[1])
    vocab += ["<|startoftext|>", "<|endoftext|>"]  # the end token has the largest id, as in CLIP
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(dict.fromkeys(vocab))}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tokenizer = CLIPTokenizer.from_pretrained(folder, pad_token=pad_token, model_max_length=77)
    tokenizer.save_pretrained(folder)
    return tokenizer


def text_encoder_configs(tokenizer):
    """Two tiny CLIP text encoders, shaped like SDXL's pair: CLIP-L (quick_gelu) and bigG with a projection."""
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
TRAIN_TEXT_ENCODERS = True  # jointly with the UNet (see the report in the docstring of pretrain)
CAPTION_DROPOUT = 0.1  # the empty prompt's zero embedding is trained too, so classifier-free guidance works
KL_WEIGHT = 1e-4
LAYOUT_NOISE = 0.3  # see layout_noise
SAVE_EVERY_S = 60


def render_dataset(n, seed, styles=STYLES):
    """n world scenes (never a held-out subject): images (n, 3, 64, 64) uint8 and captions."""
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng, styles) for _ in range(n)]
    images = np.stack([np.asarray(render(s, rng)) for s in tqdm(scenes, desc="rendering", leave=False)])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), [caption(s) for s in scenes]


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


def layout_noise(shape, g, strength=None):
    """White noise plus coarse noise: noise drawn at 1/8, 1/16 and 1/32 of the latent size (4x4, 2x2 and 1x1 cells
    at 32x32, the last one being offset noise), upsampled, times strength, then scaled back to unit variance.
    Why: the schedule's last step (sqrt(a_999) = 0.07) still leaks the layout of a 32x32 latent, where the object
    is and the background's color, through white noise; a model trained on white noise learns to read the layout
    from the noise and to ignore "at the left" or "on a sand background". Sampling still starts from white noise."""
    strength = LAYOUT_NOISE if strength is None else strength
    B, C, H, W = shape
    noise = torch.randn(shape, generator=g)
    for factor in (8, 16, 32):
        coarse = torch.randn(B, C, max(H // factor, 1), max(W // factor, 1), generator=g)
        noise += strength * F.interpolate(coarse, size=(H, W), mode="bilinear", align_corners=False)
    return noise / noise.std()


def unet_loss(unet, text, latents, captions, batch, g):
    """The denoising loss on a posterior sample of the latents, weighted by min-SNR-5; captions are dropped to the
    empty prompt (zero embedding, as SDXL's empty negative prompt) with probability CAPTION_DROPOUT."""
    mean, std = latents
    idx = torch.randint(0, len(mean), (batch,), generator=g)
    x0 = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    noise = layout_noise(x0.shape, g)
    keep = torch.rand(batch, generator=g) >= CAPTION_DROPOUT
    prompts = [captions[i] if k else "" for i, k in zip(idx.tolist(), keep.tolist())]
    context, pooled = text.encode(prompts, zero_empty=True)
    ids = time_ids((SIZE, SIZE), (0, 0), (SIZE, SIZE)).expand(batch, 6)
    a_bar = alphas_cumprod()
    eps = unet(q_sample(x0, t, noise, a_bar), t, context, pooled, ids)
    return (min_snr_weight(t, 5.0, a_bar) * eps_mse(eps, noise)).mean()


def save_state(path, phase, step, modules, opt, g, run):
    """Everything a phase needs to continue exactly: weights, AdamW moments, the generator, the step."""
    tensors = {f"{name}.{k}": v for name, m in modules.items() for k, v in m.state_dict().items()}
    opt_state = opt.state_dict()
    tensors.update({f"opt.{i}.{k}": torch.as_tensor(v) for i, s in opt_state["state"].items() for k, v in s.items()})
    tensors["generator"] = g.get_state()
    save_safetensors(tensors, path, metadata={"phase": phase, "step": str(step), "run": run,
                                              "param_groups": json.dumps(opt_state["param_groups"])})


def load_state(path, phase, modules, opt, g, run):
    """Restore a phase saved by save_state; returns the step to continue from (0 when there is nothing to resume)."""
    if not os.path.exists(path):
        return 0
    with safe_open(path, "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    if meta["run"] != run:
        sys.exit(f"error: {path} was saved by a run with other settings ({meta['run']}); delete it to start over")
    if meta["phase"] != phase:
        return 0
    for name, m in modules.items():
        m.load_state_dict({k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")})
    state = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, i, key = k.split(".", 2)
            state.setdefault(int(i), {})[key] = v
    opt.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    g.set_state(tensors["generator"])
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


SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0", "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
             "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
             "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
             "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False}
MODEL_INDEX = {"_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.19.0.dev0",
               "force_zeros_for_empty_prompt": True, "add_watermarker": None,
               "scheduler": ["diffusers", "EulerDiscreteScheduler"],
               "text_encoder": ["transformers", "CLIPTextModel"],
               "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
               "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
               "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}


def write_json(obj, path):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)


def pretrain(out, seed=0, budget=FULL):
    """Pretrain the toy SDXL into out/ in the official folder layout. Rerunning after an interruption continues.

    Phases: tokenizers and random text encoders; the autoencoder (it sees every style, held-out ones included: like
    SDXL's, it is a generic image codec, and what is held out is held out of the UNet and text encoders); then the
    UNet, with the text encoders trained jointly when TRAIN_TEXT_ENCODERS."""
    if os.path.exists(os.path.join(out, "model_index.json")):
        print(f"{out} is already pretrained; delete it to pretrain again")
        return False
    torch.manual_seed(seed)
    os.makedirs(out, exist_ok=True)
    state_path, run = os.path.join(out, "pretrain_state.safetensors"), json.dumps([seed, vars(budget)])
    vae_cfg, unet_cfg = model_configs()
    tokenizer = write_tokenizer(os.path.join(out, "tokenizer"), "<|endoftext|>")
    write_tokenizer(os.path.join(out, "tokenizer_2"), "!")
    if not os.path.exists(os.path.join(out, "text_encoder_2", "model.safetensors")):
        for sub, cls, cfg in zip(("text_encoder", "text_encoder_2"), (CLIPTextModel, CLIPTextModelWithProjection),
                                 text_encoder_configs(tokenizer)):
            torch.manual_seed(seed + len(sub))
            cls(cfg).save_pretrained(os.path.join(out, sub))
    images, captions = render_dataset(budget.images, seed)

    if not os.path.exists(os.path.join(out, "vae", "config.json")):
        torch.manual_seed(seed + 2)
        vae = AutoencoderKL(vae_cfg)
        with torch.no_grad():  # start nearly deterministic: log-variance -8 (std 0.02), learned from there
            vae.quant_conv.bias[vae_cfg.latent_channels:] = -8.0
        held_out_styles = render_dataset(budget.images // 8, seed + 1, tuple(HELD_OUT_STYLES))[0]
        vae_images = torch.cat([images, held_out_styles])
        train_phase("vae", {"vae": vae}, lambda g: vae_loss(vae, vae_images, budget.vae_batch, g),
                    budget.vae_steps, LR["vae"], state_path, seed + 2, run)
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
                budget.unet_steps, LR["unet"], state_path, seed + 3, run)
    save_component(unet, out, "unet")
    for sub, encoder in zip(("text_encoder", "text_encoder_2"), text.encoders):
        encoder.save_pretrained(os.path.join(out, sub))
    os.makedirs(os.path.join(out, "scheduler"), exist_ok=True)
    write_json(SCHEDULER, os.path.join(out, "scheduler", "scheduler_config.json"))
    write_json(MODEL_INDEX, os.path.join(out, "model_index.json"))
    os.remove(state_path)
    return True


# ---------------------------------------------------------------------------------------------- base model report

def generate(folder, scenes, seed=0, steps=30, cfg=5.0):
    """Images the model in folder makes for caption(scene) of each scene, as sample.py makes them."""
    unet, vae, text = load_sdxl(folder, torch.device("cpu"), torch.float32)
    prompts = [caption(s) for s in scenes]
    with torch.no_grad():
        cond = conditioning(text, prompts, SIZE, SIZE)
        uncond = conditioning(text, [""] * len(prompts), SIZE, SIZE, zero_empty=True)
        latents = sample(unet, initial_noise(len(prompts), vae, SIZE, SIZE, seed), cond, uncond, steps, cfg)
        images = decode_latents(vae, latents)
    arr = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def report(folder, n=40, seed=1):
    """Prompt fidelity of base-model samples on new scenes of the pretraining world (held-in attribute
    combinations), against chance (a random world image for each prompt) and the renderer itself."""
    rng = np.random.default_rng([seed, 11])
    scenes = [random_scene(rng) for _ in range(n)]
    images = generate(folder, scenes, seed)
    model = np.mean([prompt_fidelity(im, s) for im, s in zip(images, scenes)])
    chance = np.mean([prompt_fidelity(render(random_scene(rng), rng), s) for s in scenes for _ in range(4)])
    oracle = np.mean([prompt_fidelity(render(s, rng), s) for s in scenes])
    grid = Image.new("RGB", (SIZE * 10, SIZE * ((n + 9) // 10)))
    for i, im in enumerate(images):
        grid.paste(im, (SIZE * (i % 10), SIZE * (i // 10)))
    grid.save(os.path.join(folder, "samples.png"))
    print(f"prompt fidelity of base samples on {n} held-in prompts: {model:.3f} "
          f"(chance {chance:.3f}, rendered ground truth {oracle:.3f}); samples in {folder}/samples.png")
    return model, chance, oracle


# ---------------------------------------------------------------------------------------------- the paper's experiments

@dataclass(frozen=True)
class Plan:
    subjects: tuple  # indices into SUBJECTS
    styles: tuple  # names in HELD_OUT_STYLES
    merges: tuple  # (subject index, style name): the two LoRAs loaded together
    steps: int  # fine-tuning steps, the same for every method
    prompts: int  # evaluation prompts (eval_scenes) per subject, style or merge
    seeds: int
    w_cons: tuple  # None: plain CFG with the fine-tuned model
    merge_w_cons: tuple
    num_prior: int  # class images for prior preservation
    sample_steps: int


COMPARE = Plan(subjects=(0, 1, 2), styles=tuple(HELD_OUT_STYLES), merges=((0, "frame"), (1, "vignette")), steps=400,
               prompts=8, seeds=2, w_cons=(None, 0.0, 1.0, 2.0, 3.0, 5.0), merge_w_cons=(None, 2.0, 3.0),
               num_prior=20, sample_steps=30)
QUICK_COMPARE = Plan(subjects=(0,), styles=("frame",), merges=((0, "frame"),), steps=10, prompts=2, seeds=1,
                     w_cons=(None, 2.0), merge_w_cons=(2.0,), num_prior=2, sample_steps=8)
METHODS = {"DreamBooth": dict(beta=0.0, prior=False), "DreamBooth + prior": dict(beta=0.0, prior=True),
           "DCO": dict(beta=1000.0, prior=False)}
FINE_TUNE = ["--rank", "8", "--lr", "1e-3", "--ti-lr", "1e-3", "--resolution", str(SIZE), "--save-every", "0"]


def targets(plan):
    """(name, training scenes, token, initializer word, class prompt) for every subject and style of the plan. The
    class prompt (prior preservation's) is the first caption with the subject's token or the style removed."""
    found = []
    for i in plan.subjects:
        scenes, (token, init) = subject_scenes(i), learned_token(i)
        found.append((f"sub{i}", scenes, token, init, caption(scenes[0]).replace(token + " ", "")))
    for name in plan.styles:
        scenes, (token, init) = style_scenes(name), learned_token(style=name)
        found.append((name, scenes, token, init, caption(replace(scenes[0], style="none"))))
    return found


def fine_tune(model, out, target, method, plan):
    """train.py on one target with one method, as a user runs it; skipped when out/ already holds the finished run."""
    name, scenes, token, init, class_prompt = target
    run = os.path.join(out, "runs", f"{name}-{method.replace(' + ', '-')}")
    settings = os.path.join(run, "settings.json")
    if os.path.exists(settings) and json.load(open(settings))["step"] == plan.steps:
        return run
    data = os.path.join(out, "data", name)
    write_training_folder(scenes, data)
    argv = ["--model", model, "--data", data, "--out", run, "--token", token, "--init-token", init,
            "--beta", str(METHODS[method]["beta"]), "--steps", str(plan.steps), "--sample-steps", str(plan.sample_steps),
            *FINE_TUNE]
    if METHODS[method]["prior"]:
        argv += ["--prior-dir", os.path.join(out, "prior", name), "--prior-prompt", class_prompt,
                 "--num-prior", str(plan.num_prior)]
    if os.path.exists(os.path.join(run, "checkpoint.safetensors")):
        argv.append("--resume")  # an interrupted run continues where it stopped
    print(f"fine-tuning {name} with {method}")
    train = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
    if subprocess.run([sys.executable, train, *argv]).returncode:
        sys.exit(f"error: train.py stopped on {name} with {method} (its message is above); rerun to continue")
    return run


def score_table(model, out, title, jobs, w_cons, plan, axes):
    """Sample every job (label, LoRA folders, evaluation scenes) at every w_con, prompt and seed through evaluate.py's
    cached sweep, score each image with toy_metrics against its scene; write the table as csv and the Pareto plot
    (axes: the x and y metric), and return the table in markdown. Jobs with the same label are summarized together."""
    settings = argparse.Namespace(model=model, cfg=5.0, steps=plan.sample_steps, width=SIZE, height=SIZE,
                                  negative_prompt="", device="cpu", dtype="float32")
    cache, entries = evaluate.ImageCache(os.path.join(out, "images")), []
    for label, loras, scenes in jobs:
        by_prompt = {caption(s): s for s in scenes}
        found = evaluate.sweep(settings, [(label, loras)], list(by_prompt), list(range(plan.seeds)), list(w_cons),
                               cache, evaluate.make_generator)
        for e in found:
            e["metrics"] = toy_metrics([Image.open(e["path"]).convert("RGB")], by_prompt[e["prompt"]])
        entries += found
    names = list(entries[0]["metrics"])
    rows = evaluate.summarize(entries, {n: np.array([e["metrics"][n] for e in entries]) for n in names})
    slug = title.split(":")[0].lower()
    evaluate.plot_pareto(rows, *axes, os.path.join(out, f"pareto_{slug}.png"))
    evaluate.write_atomic(os.path.join(out, f"{slug}.csv"), evaluate.to_csv(rows))
    return f"### {title}\n\n" + evaluate.to_markdown(rows, names)


def compare(model, out, plan):
    """DreamBooth, DreamBooth + prior preservation and DCO on every subject and style of the plan (same steps and
    learning rate), a w_con sweep over evaluation prompts, and per method the merge of a subject and a style LoRA.
    Writes out/results.md (three tables), out/*.csv and out/pareto_*.png; a rerun reuses finished runs and images."""
    runs = {(t[0], m): fine_tune(model, out, t, m, plan) for t in targets(plan) for m in METHODS}
    subjects = [([f"sub{i}"], eval_scenes(SUBJECTS[i], n=plan.prompts)) for i in plan.subjects]
    styles = [([s], eval_scenes(style=s, n=plan.prompts)) for s in plan.styles]
    merges = [([f"sub{i}", s], eval_scenes(SUBJECTS[i], style=s, n=plan.prompts)) for i, s in plan.merges]
    tables = [("Subjects: subject fidelity and prompt fidelity", subjects, METHODS, plan.w_cons, ("prompt", "subject")),
              ("Styles: style fidelity and prompt fidelity", styles, METHODS, plan.w_cons, ("prompt", "style")),
              ("Merges: a subject LoRA and a style LoRA loaded together", merges, ("DreamBooth", "DCO"),
               plan.merge_w_cons, ("prompt", "subject"))]
    text = "\n".join(score_table(model, out, title, [(m, [runs[(n, m)] for n in names], scenes)
                                                     for m in methods for names, scenes in sets], w_cons, plan, axes)
                     for title, sets, methods, w_cons, axes in tables)
    evaluate.write_atomic(os.path.join(out, "results.md"), text)
    print(text + f"\nwrote {out}/results.md, the tables as csv and the Pareto plots")
    return text


# ---------------------------------------------------------------------------------------------- command line

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command")
    pre = commands.add_parser("pretrain", help="pretrain the toy SDXL (the default command)")
    pre.add_argument("--out", default="toy-sdxl")
    pre.add_argument("--seed", type=int, default=0)
    pre.add_argument("--quick", action="store_true", help="a few hundred steps: a working folder, not a good model")
    data = commands.add_parser("data", help="write a held-out subject's or style's training folder")
    which = data.add_mutually_exclusive_group(required=True)
    which.add_argument("--subject", type=int, help=f"0..{len(SUBJECTS) - 1}")
    which.add_argument("--style", type=int, help=f"0..{len(HELD_OUT_STYLES) - 1}")
    data.add_argument("--out", required=True)
    data.add_argument("--n", type=int, default=4, help="images of a subject (a style has one)")
    data.add_argument("--seed", type=int, default=0)
    cmp = commands.add_parser("compare", help="DreamBooth vs DreamBooth + prior vs DCO: Pareto and merge tables")
    cmp.add_argument("--model", default="toy-sdxl", help="pretrained first if the folder holds no model")
    cmp.add_argument("--out", default="toy-compare")
    cmp.add_argument("--quick", action="store_true", help="one subject and style, a few steps: minutes, not results")
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in ("pretrain", "data", "compare", "-h", "--help"):
        argv = ["pretrain", *argv]
    return p.parse_args(argv)


def main(args):
    if args.command == "data":
        if args.subject is not None and not 0 <= args.subject < len(SUBJECTS):
            sys.exit(f"error: --subject must be in 0..{len(SUBJECTS) - 1}")
        if args.style is not None and not 0 <= args.style < len(HELD_OUT_STYLES):
            sys.exit(f"error: --style must be in 0..{len(HELD_OUT_STYLES) - 1}")
        if args.subject is not None:
            scenes, (token, init) = subject_scenes(args.subject, args.n, args.seed), learned_token(args.subject)
        else:
            name = list(HELD_OUT_STYLES)[args.style]
            scenes, (token, init) = style_scenes(name, args.seed), learned_token(style=name)
        write_training_folder(scenes, args.out, args.seed)
        print(f"wrote {len(scenes)} images to {args.out}; token {token}, initializer word {init!r}")
        return
    if args.command == "compare":
        if not os.path.exists(os.path.join(args.model, "model_index.json")):
            pretrain(args.model, 0, QUICK if args.quick else FULL)
        start = time.time()
        compare(args.model, args.out, QUICK_COMPARE if args.quick else COMPARE)
        print(f"compared in {time.time() - start:.0f} s")
        return
    start = time.time()
    if pretrain(args.out, args.seed, QUICK if args.quick else FULL):
        print(f"pretrained {args.out} in {time.time() - start:.0f} s")
    report(args.out, n=10 if args.quick else 40)


if __name__ == "__main__":
    main(parse_args())
