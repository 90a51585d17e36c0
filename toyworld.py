"""The toy world: procedural 64x64 captioned images with exact ground truth, and metrics that read them back.

An image holds one or two objects (shape, color, pattern, size, position) on a background, optionally in a
whole-image style; its caption states every attribute. Held out of pretraining are a few personal subjects (a shape
+ color + pattern combination never shown) and styles (never shown to the UNet or the text encoders); their captions
name them with a learned token in place of the noun ("a big <sub0> at the left", "in <sty0>"), as the official data
config does ("a <dog>").
analyze() reads the same attributes back from any image, so subject, style and prompt fidelity have exact meaning.
toy.py pretrains a tiny SDXL on this world and runs the paper's experiments in it.
"""
import os
from collections import deque
from dataclasses import dataclass, replace
from itertools import permutations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

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
    token: str = ""  # a learned word naming a held-out subject; the caption then says "<sub0>" only


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
    if obj.token:  # the token stands for the noun: with its initializer word in its place, "a big star"
        return f"a {obj.size} {obj.token}"
    pattern = "" if obj.pattern == "plain" else f" with {obj.pattern_color} {obj.pattern}"
    return f"a {obj.size} {obj.color} {obj.shape}{pattern}"


def caption(scene):
    """'a small red circle with white stripes at the left and a big blue star at the right on a sand background,
    in shadow style': every attribute of the scene, except a subject's looks, which its token carries. A held-out
    style is its token alone, "in <sty0>", which the initializer word "style" replaces in the base prompt."""
    where = {p: "in the center" if p == "center" else f"at the {p}" for p in POSITIONS}
    text = " and ".join(f"{describe(o)} {where[o.position]}" for o in scene.objects)
    text += f" on a {scene.background} background"
    if scene.style in HELD_OUT_STYLES:
        text += f", in {HELD_OUT_STYLES[scene.style]}"
    elif scene.style != "none":
        text += f", in {scene.style} style"
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


def read_object(pixels, names, labels, coverage):
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
    color = names[main] if counts[main] else None  # no pixel near any palette color: no color of the world
    return {"shape": max(iou, key=iou.get), "color": color, "pattern": pattern, "pattern_color": pattern_color,
            "size": "big" if max(np.ptp(xs), np.ptp(ys)) + 1 >= 22 else "small",
            "position": min(POSITIONS, key=lambda p: np.hypot(*np.subtract(POSITIONS[p], center))),
            "area": len(pixels)}


LUMA = np.array([0.3, 0.59, 0.11])  # luminance of an RGB color


def style_scores(arr, objects_mask, bg, t):
    """How strongly each style shows, in [0, 1]: 0 means absent, 1 means as strong as the renderer draws it."""
    shaded, black = ~objects_mask & (t > 0.3) & (t < 0.75), ~objects_mask & (t < 0.4)
    below, above = (shift(objects_mask, d, d) & ~objects_mask for d in (3, -3))
    shadow = shaded[below].mean() - shaded[above].mean() if below.any() and above.any() else 0.0
    ring = dilate(objects_mask, 2) & ~objects_mask
    ring[:4], ring[-4:], ring[:, :4], ring[:, -4:] = False, False, False, False
    outline = (black & ring).sum() / max(ring.sum(), 1)
    border = np.ones((SIZE, SIZE), bool)
    border[3:-3, 3:-3] = False
    frame = (dist(arr[border], FRAME) < 70).mean()
    lum, bg_lum = arr @ LUMA, float(bg @ LUMA)
    corners = np.concatenate([lum[:4, :4], lum[:4, -4:], lum[-4:, :4], lum[-4:, -4:]]).mean()
    # How much darker the corners are than the background. A background near black (the night's is 42) cannot show
    # it: an all-black image, as a sample gone NaN decodes to, would read as the strongest vignette.
    dark = 1 - corners / bg_lum if bg_lum > 20 else 0.0
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
    t = np.clip(arr @ bg / max(float(bg @ bg), 1.0), 0, 1)
    off_line = np.linalg.norm(arr - t[..., None] * bg, axis=-1)
    objects_mask = off_line > 50
    objects_mask[:4], objects_mask[-4:], objects_mask[:, :4], objects_mask[:, -4:] = False, False, False, False
    coverage = np.clip(off_line / 100, 0, 1)
    objects = [read_object(c, names, labels, coverage) for c in components(objects_mask)]
    scores = style_scores(arr, objects_mask, bg, t)
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
    """Evaluation prompts as scenes (the prompt is caption(scene), the scene its ground truth). Scene i has the subject
    (or a world object) big and small in turn: in two scenes of four alone at place i mod 5, in the other two beside
    a small world object; the backgrounds and pretraining styles cycle, or all are in a held-out style when one is
    given. It stands at every place once n is 9 or more."""
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
    """Render scenes into out/ as NAME.png + NAME.txt (its caption), the format train.py reads. A folder that holds
    other files is refused: train.py would take them as part of the training set (another subject, say)."""
    names = [f"{i:02d}" for i in range(len(scenes))]
    if os.path.isfile(out):
        raise ValueError(f"{out} is a file; the training images go in a folder")
    mine = {n + suffix for n in names for suffix in (".png", ".txt")}
    other = sorted(set(os.listdir(out) if os.path.isdir(out) else ()) - mine)
    if other:
        raise ValueError(f"{out} holds other files ({', '.join(other[:3])}{', ...' if len(other) > 3 else ''}), which "
                         "train.py would read as training data too; give a new folder")
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, scene in zip(names, scenes):
        render(scene, rng).save(os.path.join(out, f"{name}.png"))
        with open(os.path.join(out, f"{name}.txt"), "w") as f:
            f.write(caption(scene) + "\n")


WORDS = ("a", "with", "at", "the", "in", "on", "and", "background", "style", ",", *SHAPES, *COLORS, *PATTERNS,
         *BACKGROUNDS, *SIZES, *POSITIONS, *STYLES[1:])  # the vocabulary of every caption, tokens aside
