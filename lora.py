"""Low-rank adaptation, by hand: W x  ->  W x + scale * (alpha / rank) * B A x.

A LoRALinear is an nn.Linear (same weight and bias, so the official key names stay) plus A (rank x in) and
B (out x rank, zero at the start). Its `scale` is explicit: a float, or a per-sample tensor (B,) so that one batched
call can run some samples with the LoRA and some without. Scale 0 is the frozen base model.

On disk a LoRA is {module: (down, up)} with the alpha/rank factor folded into `up`, so the delta is exactly
up @ down. Files are written in two formats, and read in these and peft's:
  - diffusers (what the official DCO code writes, and what `pipe.load_lora_weights(dir)` reads):
      unet.<diffusers module>.lora.down.weight / .lora.up.weight   (also read: .lora_A/.lora_B, peft's names)
  - kohya (ComfyUI, AUTOMATIC1111): lora_unet_<official module, '.' -> '_'>.lora_down.weight / .lora_up.weight / .alpha
    (also read: diffusers' module names in place of the official ones, as diffusers' kohya converter writes them)
  - read only, peft's save_pretrained folder: adapter_model.safetensors, its lora_alpha in adapter_config.json
"""
import contextlib
import functools
import json
import os
import re
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import ModelError, read_json, read_metadata, read_safetensors, unet_key_map
from unet_sdxl import UNet

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # the attention projections the official DCO code trains
DIFFUSERS_FILE, KOHYA_FILE = "pytorch_lora_weights.safetensors", "lora_kohya.safetensors"  # in an output folder


class LoRALinear(nn.Linear):
    def __init__(self, base: nn.Linear, rank, alpha=None, down=None, up=None):
        # On the meta device: no weight of its own is made; the base layer's weight and bias are shared, not copied.
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias
        self.rank, self.alpha, self.scale = rank, float(rank if alpha is None else alpha), 1.0
        dev = base.weight.device
        # peft's "gaussian" init: A ~ N(0, 1/rank^2), B = 0. The update B A starts at zero (the layer is the base
        # layer), and B gets a gradient through the random A at once; with A = 0 too, neither would ever move. A is
        # drawn on the CPU, so that a seed starts the same LoRA on every device.
        self.lora_A = nn.Parameter(torch.randn(rank, self.in_features).to(dev) / rank) if down is None else down
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=dev)) if up is None else up

    def forward(self, x):
        if isinstance(self.scale, float) and self.scale == 0.0:
            return F.linear(x, self.weight, self.bias)
        # Trained parameters stay fp32; like autocast, the product runs in the activations' dtype (bf16 on a GPU).
        h = F.linear(x, self.lora_A.to(x.dtype))  # (..., rank)
        factor = self.alpha / self.rank
        # A per-sample scale multiplies the narrow h, in its dtype (in bf16, exact for consistency guidance's 0s and
        # 1s); a float scale goes into addmm_'s alpha, exactly.
        if torch.is_tensor(self.scale):
            if self.scale.shape != x.shape[:1]:  # broadcast, a scale for another batch would pass unnoticed
                raise ValueError(f"per-sample LoRA scales of shape {tuple(self.scale.shape)} for a batch of {len(x)}")
            h = h * self.scale.to(h.dtype).view(-1, *[1] * (x.ndim - 1))  # (B,) -> (B, 1, ..., 1)
        else:
            factor *= self.scale
        y = F.linear(x.reshape(-1, self.in_features), self.weight, self.bias)  # (N, out), N = all leading dims
        # y += factor * h B^T, accumulated by the matmul into the base output: no elementwise pass over (N, out).
        # In place is safe: the base linear does not keep its output for the backward pass.
        y.addmm_(h.reshape(-1, self.rank), self.lora_B.to(y.dtype).t(), alpha=factor)  # y's: autocast's, if on
        return y.view(*x.shape[:-1], self.out_features)

    def delta(self):
        """The weight change (out, in) this LoRA adds at scale 1."""
        return self.lora_B.float() @ self.lora_A.float() * (self.alpha / self.rank)


def lora_modules(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def targets_in(model, targets=TARGETS):
    """Names of the nn.Linear modules whose name ends with one of the targets."""
    return [name for name, m in model.named_modules()
            if type(m) is nn.Linear and any(name == t or name.endswith("." + t) for t in targets)]


def replace(model, name, module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def inject(model, rank, alpha=None, targets=TARGETS):
    """Wrap every targeted nn.Linear in a fresh, trainable LoRALinear (fp32); returns the LoRA parameters."""
    names = targets_in(model, targets)
    if not names:
        raise ValueError(f"no nn.Linear module matches the LoRA targets {targets}")
    params = []
    for name in names:
        m = LoRALinear(model.get_submodule(name), rank, alpha)
        replace(model, name, m)
        params += [m.lora_A, m.lora_B]
    return params


def remove(model, fold=False):
    """Unwrap every LoRALinear back to an nn.Linear; with fold, W <- W + scale * delta first, summed in fp32."""
    for name, m in lora_modules(model).items():
        if fold:  # in place: new weights would leave the old ones' memory as holes between the layers that stay
            with torch.no_grad():
                m.weight.copy_(m.weight.float() + float(m.scale) * m.delta())
        base = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        base.weight, base.bias = m.weight, m.bias
        replace(model, name, base)


@contextlib.contextmanager
def lora_scale(model, scale):
    """Run the model with every LoRA at `scale` (a float, or a (B,) tensor of per-sample scales)."""
    modules = lora_modules(model).values()
    saved = [m.scale for m in modules]
    for m in modules:
        m.scale = scale
    try:
        yield
    finally:
        for m, s in zip(modules, saved):
            m.scale = s


# ------------------------------------------------------------------------------------- {module: (down, up)}

def get_lora(model):
    """The model's LoRA as {module: (down (r, in), up (out, r))}, alpha/rank folded into up, fp32."""
    return {name: (m.lora_A.detach().float().clone(), m.lora_B.detach().float() * (m.alpha / m.rank))
            for name, m in lora_modules(model).items()}


def check_pair(name, down, up, shape):
    """Refuse a (down, up) pair that is not a low-rank (out, in) = shape matrix, the shape of the layer it adapts."""
    if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0] or not down.shape[0]:
        raise ModelError(f"LoRA module {name!r}: up {tuple(up.shape)} and down {tuple(down.shape)} do not "
                         "make a linear low-rank pair")
    if (up.shape[0], down.shape[1]) != tuple(shape):
        raise ModelError(f"LoRA module {name!r} is {up.shape[0]}x{down.shape[1]}, the model's layer is "
                         f"{shape[0]}x{shape[1]}: is it a LoRA for another model?")
    if not (down.isfinite().all() and up.isfinite().all()):  # it would turn every image black
        raise ModelError(f"LoRA module {name!r} holds NaN or infinite values (did its training diverge?)")


def apply_lora(model, lora, dtype=torch.float32, fold=False):
    """Add a {module: (down, up)} LoRA to the model's linear layers, frozen, at scale 1, stored in dtype (sampling
    gives the activations' dtype: the product is computed in it anyway, and then no cast runs on every call). With fold,
    it goes into the weights instead, W + up @ down summed in fp32 and rounded once to W's dtype."""
    modules = dict(model.named_modules())
    for name, (down, up) in lora.items():  # all checked before any layer changes
        if type(modules.get(name)) is not nn.Linear:
            raise ModelError(f"LoRA module {name!r} matches no (unadapted) linear layer of this model")
        check_pair(name, down, up, modules[name].weight.shape)
    for name, (down, up) in lora.items():
        base = modules[name]
        dev, rank = base.weight.device, down.shape[0]
        held = torch.float32 if fold else dtype
        m = LoRALinear(base, rank, alpha=rank, down=nn.Parameter(down.to(dev, held), requires_grad=False),
                       up=nn.Parameter(up.to(dev, held), requires_grad=False))  # alpha / rank is already in up
        replace(model, name, m)
    untouched = len(targets_in(model))
    if untouched:
        warnings.warn(f"the LoRA adapts {len(lora)} layers; {untouched} attention projections of the model are "
                      "left as they are")
    if fold:
        remove(model, fold=True)


def merge(loras, weights):
    """Sum of LoRAs, exactly: concatenating ranks, down (sum r_i, in) and up (out, sum r_i), gives
    up @ down = sum_i w_i up_i @ down_i per module."""
    out = {}
    for name in dict.fromkeys(n for lora in loras for n in lora):
        parts = [(lora[name], w) for lora, w in zip(loras, weights, strict=True) if name in lora]
        out[name] = (torch.cat([d for (d, _), _ in parts]), torch.cat([w * u for (_, u), w in parts], dim=1))
    return out


def compress(lora, rank):
    """Best rank-r approximation of each module's delta (truncated SVD); returns (lora, the relative Frobenius error
    of all modules' deltas together)."""
    out, err2, total2 = {}, 0.0, 0.0
    for name, (down, up) in lora.items():
        delta = up @ down
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        r = min(rank, down.shape[0], S.numel())  # never more than the LoRA already has
        out[name] = (Vh[:r] * S[:r, None].sqrt(), U[:, :r] * S[:r].sqrt())
        err2, total2 = err2 + S[r:].pow(2).sum().item(), total2 + S.pow(2).sum().item()
    return out, (err2 / max(total2, 1e-30)) ** 0.5


# ------------------------------------------------------------------------------------- file formats

@functools.cache  # each builds the UNet on the meta device: once per config, not on every file read
def module_names(unet_cfg):
    """{official module name: diffusers module name} for every weight of the UNet (read-only)."""
    return {k[: -len(".weight")]: v[: -len(".weight")] for k, v in unet_key_map(unet_cfg).items()
            if k.endswith(".weight")}


@functools.cache
def linear_shapes(unet_cfg):
    """{official module name: (out, in)} of the UNet's linear layers (read-only)."""
    with torch.device("meta"):
        return {name: m.weight.shape for name, m in UNet(unet_cfg).named_modules() if type(m) is nn.Linear}


def at_one_rank(lora):
    """Every module at the largest rank, padded with zero rows (its delta is unchanged). A merge of LoRAs that adapt
    different layers or have different ranks has mixed ranks, and diffusers reads such files at wrong scales: older
    versions gave every module the first module's alpha, and 0.42 reads a kohya file's per-module alphas wrongly."""
    rank = max(down.shape[0] for down, _ in lora.values())
    # (r, in) -> (rank, in), (out, r) -> (out, rank)
    return {name: (F.pad(down, (0, 0, 0, rank - down.shape[0])), F.pad(up, (0, rank - down.shape[0])))
            for name, (down, up) in lora.items()}


def to_diffusers(lora, unet_cfg):
    names, out = module_names(unet_cfg), {}
    for name, (down, up) in at_one_rank(lora).items():
        out[f"unet.{names[name]}.lora.down.weight"], out[f"unet.{names[name]}.lora.up.weight"] = down, up
    return out


def kohya_name(module):
    """kohya's name for a UNet module: output_blocks.0.1 -> lora_unet_output_blocks_0_1."""
    return "lora_unet_" + module.replace(".", "_")


def to_kohya(lora):
    out = {}
    for name, (down, up) in at_one_rank(lora).items():
        key = kohya_name(name)
        out[f"{key}.lora_down.weight"], out[f"{key}.lora_up.weight"] = down, up
        out[f"{key}.alpha"] = torch.tensor(float(down.shape[0]))  # alpha = rank: the scale is already in up
    return out


SUFFIXES = {  # key ending -> which matrix it holds; the module name is what precedes it
    ".lora.down.weight": "down", ".lora.up.weight": "up", ".lora_A.weight": "down", ".lora_B.weight": "up",
    ".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha"}


def parse_lora(tensors, unet_cfg, source):
    """Read a diffusers / official DCO / peft / kohya LoRA file into {official module: (down, up)}."""
    diffusers_to_ours = {v: k for k, v in module_names(unet_cfg).items()}
    # kohya names come from the official module names (sd-scripts, ours) or from diffusers' (its kohya converter)
    kohya_to_ours = {kohya_name(name): k for k, v in module_names(unet_cfg).items() for name in (k, v)}
    parts, text_encoder_key = {}, None
    for key, value in tensors.items():
        # diffusers 0.19-0.20 (the first SDXL DreamBooth-LoRA scripts) named them after attention processors
        key = re.sub(r"\.processor\.(to_[qkv])_lora\.", r".\1.lora.", key).replace(".processor.to_out_lora.",
                                                                                 ".to_out.0.lora.")
        suffix = next((s for s in SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            dora = " (a DoRA magnitude: DoRA is not supported)" if "dora_scale" in key or "magnitude" in key else ""
            raise ModelError(f"{source}: {key!r} is not a LoRA key this reader knows{dora}")
        stem = key[: -len(suffix)]
        for prefix in ("unet.", "base_model.model."):
            stem = stem[len(prefix):] if stem.startswith(prefix) else stem
        if stem.startswith(("text_encoder", "lora_te")):
            # refused after the loop: a file for another model (SD 1.5, say) is refused first as that
            text_encoder_key = text_encoder_key or key
            continue
        name = kohya_to_ours.get(stem) or diffusers_to_ours.get(stem)
        if name is None:
            raise ModelError(f"{source}: {key!r} matches no module of this UNet")
        part = parts.setdefault(name, {})
        if SUFFIXES[suffix] in part:  # one module under two names (kohya's from both naming schemes, say)
            raise ModelError(f"{source}: {key!r} gives module {name!r} its {SUFFIXES[suffix]} a second time")
        part[SUFFIXES[suffix]] = value.float()
    if text_encoder_key:
        raise ModelError(f"{source}: {text_encoder_key!r} is a text-encoder LoRA, which is not supported")
    if not parts:
        raise ModelError(f"{source}: holds no LoRA weights")
    linear = linear_shapes(unet_cfg)
    lora = {}
    for name, p in parts.items():
        if "down" not in p or "up" not in p:
            raise ModelError(f"{source}: module {name!r} lacks its {'up' if 'down' in p else 'down'} matrix")
        if name not in linear:
            raise ModelError(f"{source}: module {name!r} is not a linear layer (a convolution LoRA?), which is not "
                             "supported")
        try:
            check_pair(name, p["down"], p["up"], linear[name])
        except ModelError as e:
            raise ModelError(f"{source}: {e}") from None
        rank = p["down"].shape[0]
        lora[name] = (p["down"], p["up"] * (p["alpha"].item() / rank if "alpha" in p else 1.0))
    return lora


PEFT_FILE, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"  # what peft's save_pretrained writes
PEFT_ALPHA = 8  # LoraConfig's lora_alpha where a config leaves it out


def lora_path(path):
    """A LoRA file, or the one in a folder: a train.py / merge.py output's diffusers file, else its kohya file, else
    a peft save_pretrained folder's."""
    if not os.path.isdir(path):
        return path
    for name in (DIFFUSERS_FILE, KOHYA_FILE, PEFT_FILE):
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    raise ModelError(f"{path}: no {DIFFUSERS_FILE}, {KOHYA_FILE} or {PEFT_FILE} in this folder")


def peft_config_path(path):
    """The adapter_config.json beside a peft weights file, or None."""
    beside = os.path.join(os.path.dirname(path), PEFT_CONFIG)
    return beside if os.path.basename(path) == PEFT_FILE and os.path.isfile(beside) else None


def lora_config(path):
    """peft's LoraConfig of a LoRA file, where it has one: in the header of newer diffusers files (its keys prefixed
    "unet." as a pipeline saves them, unprefixed as a model's save_lora_adapter does), or beside a peft file in
    adapter_config.json. {} for the files the official code writes (alpha = rank)."""
    try:
        header = json.loads(read_metadata(path).get("lora_adapter_metadata") or "{}")
    except ValueError:
        header = None
    if not isinstance(header, dict):
        raise ModelError(f"{path}: its lora_adapter_metadata header is not a JSON object")
    config = {k[len("unet."):]: v for k, v in header.items() if k.startswith("unet.")}
    if not config and not any("." in k for k in header):  # one model's config, unprefixed
        config = header
    beside = peft_config_path(path)
    if not config and beside:
        config = read_json(beside)
    patterns = config.get("alpha_pattern") or {}
    alphas = [config.get("lora_alpha", PEFT_ALPHA), *(patterns.values() if isinstance(patterns, dict) else [None])]
    if not all(type(a) in (int, float) for a in alphas):  # as peft reads them: numbers, and {module pattern: number}
        raise ModelError(f"{beside or path}: its LoRA config has no numeric lora_alpha and alpha_pattern")
    return config


def read_lora(path, unet_cfg):
    """A LoRA file or folder, with peft's lora_alpha (and alpha_pattern) applied where its config states them: alpha /
    rank scales `up`."""
    path = lora_path(path)
    lora = parse_lora(read_safetensors(path), unet_cfg, path)
    config = lora_config(path)
    if not config:
        return lora
    if config.get("use_rslora"):
        raise ModelError(f"{path}: rank-stabilized LoRA (alpha / sqrt(rank)) is not supported")
    diffusers_name = module_names(unet_cfg)
    patterns = config.get("alpha_pattern") or {}
    for name, (down, up) in lora.items():  # peft's alpha_pattern keys match the end of a module name
        alpha = next((a for p, a in patterns.items() if re.match(rf"(.*\.)?({p})$", diffusers_name[name])),
                     config.get("lora_alpha", PEFT_ALPHA))
        lora[name] = (down, up * (alpha / down.shape[0]))
    return lora
