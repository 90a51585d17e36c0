"""Training data: a folder of images with captions, or the official code's data config, read into the images the
VAE encodes (short side resized to the resolution, center-cropped, [-1, 1]) and their latent posteriors.

    folder/00.jpg + folder/00.txt ...        same-name captions (or folder/metadata.jsonl: file_name, text)
    config.json:NAME                         the official DCO code's config: images, prompts, inserting_tokens, ...
"""
import json
import os
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from checkpoint import ModelError
from cli import split_spec

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jfif", ".jpe", ".png", ".webp", ".avif", ".bmp", ".tif", ".tiff", ".gif")
Image.MAX_IMAGE_PIXELS = None  # a user's own 200-megapixel photo is not a decompression bomb


def image_files(folder):
    """The names of a folder's images, sorted; hidden files (a Mac's ._NAME.jpg beside each photo) are not images."""
    return sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES) and not f.startswith("."))


def read_text(path):
    """UTF-8 text, or UTF-16 where a byte-order mark says so (Windows PowerShell 5's `>` writes it)."""
    with open(path, "rb") as f:
        raw = f.read()
    try:  # utf-8-sig: a UTF-8 byte-order mark, as Windows tools write, is not text
        return raw.decode("utf-16" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig")
    except UnicodeDecodeError:
        raise ModelError(f"{path}: not UTF-8 text") from None


def read_metadata_jsonl(path):
    """{file_name: text} of a Hugging Face imagefolder's metadata.jsonl, one JSON object per line."""
    captions = {}
    for i, line in enumerate(read_text(path).split("\n")):  # not splitlines: JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row["file_name"], str) or not isinstance(row["text"], str):
                raise TypeError
        except (ValueError, KeyError, TypeError):  # not JSON, or not an object with both keys as strings
            raise ModelError(f"{path}: line {i + 1} needs file_name and text") from None
        name = os.path.normpath(row["file_name"])  # ./00.jpg is 00.jpg
        if name in captions:  # which caption was meant is the user's call
            raise ModelError(f"{path}: line {i + 1} names {row['file_name']!r} a second time")
        captions[name] = row["text"].strip()
    return captions


def read_captions(folder, caption):
    """[(image path, caption)] from same-name .txt files, metadata.jsonl, or one caption for all."""
    if not os.path.isdir(folder):
        raise ModelError(f"{folder}: no such data folder")
    meta = os.path.join(folder, "metadata.jsonl")
    captions = read_metadata_jsonl(meta) if os.path.isfile(meta) else {}
    # metadata.jsonl may name images in subfolders (file_name "images/00.jpg"), as Hugging Face's imagefolder does
    in_subfolders = [f for f in captions if os.path.dirname(f) and f.lower().endswith(IMAGE_SUFFIXES)
                     and os.path.isfile(os.path.join(folder, f))]
    files = image_files(folder) + sorted(in_subfolders)
    below = sorted(os.path.join(d, f) for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d))
                   and not d.startswith(".") for f in image_files(os.path.join(folder, d)))
    below = [f for f in below if f not in captions]
    if not files:
        hint = f"; images in subfolders ({below[0]}, ...) are read where metadata.jsonl names them" if below else ""
        raise ModelError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}){hint}")
    other_case = {os.path.splitext(f)[0]: f for f in os.listdir(folder) if f.lower().endswith(".txt")}  # NAME.TXT
    items = []
    for f in files:
        stem = os.path.splitext(f)[0]
        txt = os.path.join(folder, stem + ".txt")
        if not os.path.isfile(txt) and stem in other_case:
            txt = os.path.join(folder, other_case[stem])
        text = caption or captions.get(f) or (read_text(txt).strip() if os.path.isfile(txt) else None)
        if not text:
            why = ("its text in metadata.jsonl is blank" if f in captions
                   else f"{os.path.basename(txt)} is missing or empty")
            raise ModelError(f"{os.path.join(folder, f)}: no caption ({why}; or use --caption)")
        items.append((os.path.join(folder, f), text))
    stems = {os.path.splitext(f)[0] for f in files}
    unused = sorted({t for s, t in other_case.items() if s not in stems and not t.startswith(".")}
                    | (set(captions) - set(files)))
    if unused:  # an image of another type (.heic, say), or one that was deleted
        warnings.warn(f"{folder}: captions without an image of a type read here ({', '.join(IMAGE_SUFFIXES)}): "
                      f"{', '.join(unused[:3])}{', ...' if len(unused) > 3 else ''}; they are not trained on")
    if below:
        warnings.warn(f"{folder}: images in subfolders are not read unless metadata.jsonl names them: "
                      f"{', '.join(below[:3])}{', ...' if len(below) > 3 else ''}")
    return items


def is_config(data):
    return split_spec(data, 1)[0].endswith(".json")


def read_config(spec, init_word=None):
    """The official code's data config, 'config.json[:NAME]' (NAME may be left out if it holds one): [(image path,
    prompt)] and its learned token and initializer word (None, None without one; init_word, --init-token, replaces
    the config's). An image path is read as the official code reads it, from the current directory, or else from the
    config's folder (with or without its folders: a config copied next to its images)."""
    path, name = split_spec(spec, 2)
    try:
        configs = json.loads(read_text(path))
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: not a readable data config ({e})") from None
    if not isinstance(configs, dict) or not all(isinstance(c, dict) for c in configs.values()):
        raise ModelError(f"{path}: not a data config (an object of named configs, as the official code's)")
    if name is None and len(configs) == 1:
        name = next(iter(configs))
    if name not in configs:
        raise ModelError(f"{path}: give one of its configs as --data {path}:NAME, NAME one of: {', '.join(configs)}")
    cfg, where, here = configs[name], f"{path}:{name}", os.path.dirname(path)

    def strings(key):
        value = cfg.get(key) or []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ModelError(f"{where}: {key} must be a list of strings")
        return value
    images, prompts = strings("images"), strings("prompts")
    if not images or len(images) != len(prompts):
        raise ModelError(f"{where}: needs a list of images and as many prompts")
    tokens, words = strings("inserting_tokens"), strings("initializer_tokens")
    if len(tokens) > 1 or len(words) != len(tokens) or "" in words:
        raise ModelError(f"{where}: train.py learns one token from an initializer word; the config has "
                         f"inserting_tokens {tokens} and initializer_tokens {words}")
    token, word = (tokens[0], init_word or words[0]) if tokens else (None, None)
    # base_prompts (what the frozen model sees; the official code needs them with a token and DCO) are derived so.
    if token and "base_prompts" in cfg and cfg["base_prompts"] != [p.replace(token, word) for p in prompts]:
        given = " (--init-token)" if init_word and init_word != words[0] else ""
        raise ModelError(f"{where}: base_prompts must be the prompts with {token} replaced by {word}{given}, as "
                         "train.py makes them")
    items = []
    for image, prompt in zip(images, prompts):
        found = [p for p in (image, os.path.join(here, image), os.path.join(here, os.path.basename(image)))
                 if os.path.isfile(p)]
        if not found:
            raise ModelError(f"{where}: image {image} not found, from here or from {here or '.'}")
        items.append((found[0], prompt))
    return items, token, word


def load_rgb(path):
    """A PIL image (RGBA, palette, grayscale, CMYK, 16-bit, EXIF-rotated) as upright 8-bit RGB. 32-bit integer
    grayscale is read as 16-bit (older Pillow opens 16-bit PNGs so); floating-point images are refused."""
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ModelError(f"{path}: not a readable image ({e})") from None
    if im.mode == "F":  # no one scale fits: [0, 1] and [0, 255] both occur
        raise ModelError(f"{path}: a floating-point image; save it with 8 or 16 bits per channel")
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grayscale: scale to 8 bits, keep the contrast
        values, key = np.asarray(im, dtype=np.float64), im.info.get("transparency")
        im = Image.fromarray((values / 257).clip(0, 255).astype(np.uint8))
        if key is not None:  # the transparent gray, matched at 16 bits (several may round to its 8-bit value)
            im.putalpha(Image.fromarray(np.where(values == key, 0, 255).astype(np.uint8)))
    if im.mode in ("P", "LA", "PA") or "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode == "RGBA":  # composite on white, not black, where the image is transparent
        im = Image.alpha_composite(Image.new("RGBA", im.size, "white"), im)
    return im.convert("RGB")


def prepare_image(path, res):
    """Resize the short side to res (bilinear) and center-crop: (3, res, res) in [-1, 1]. The sizes and offsets round
    as the official code's torchvision Resize and CenterCrop do, so the pixels are the same."""
    im = load_rgb(path)
    w, h = im.size
    if min(w, h) < res:
        warnings.warn(f"{path}: {w}x{h} is smaller than the resolution {res}; upscaling")
    nw, nh = (res, int(res * h / w)) if w <= h else (int(res * w / h), res)
    left, top = int(round((nw - res) / 2)), int(round((nh - res) / 2))
    im = im.resize((nw, nh), Image.BILINEAR).crop((left, top, left + res, top + res))
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)


@torch.no_grad()
def encode_images(vae, items, res, device):
    """Encode every image once: latent mean and std (N, 4, h, w), times the VAE's scaling factor. Posterior samples
    are drawn per step from these, as the official code does with latent_dist.sample()."""
    means, stds = [], []
    for path, _ in tqdm(items, desc="encoding images"):
        mean, std = vae.encode(prepare_image(path, res)[None].to(device))
        means.append(mean.float() * vae.cfg.scaling_factor)
        stds.append(std.float() * vae.cfg.scaling_factor)
    return torch.cat(means), torch.cat(stds)
