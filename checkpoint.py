"""Reading and writing SDXL in the official download layout. All of the models' key mapping lives here (a LoRA
file's, in its formats, is in lora.py).

A model folder is the diffusers layout of the official download:
    unet/  config.json + diffusion_pytorch_model[.fp16].safetensors (or its shards and their index)
    vae/   config.json + diffusion_pytorch_model[.fp16].safetensors
    text_encoder/, text_encoder_2/  config.json + model[.fp16].safetensors (transformers' CLIP, see text.py)
    tokenizer/, tokenizer_2/
The official single file (sd_xl_base_1.0.safetensors) holds all four models under prefixes; `read_single_file`
splits it, and a folder of that layout then supplies only the configs and tokenizers.
Our modules carry the official (Stability) names; `unet_key_map` / `vae_key_map` give, for a config, the
diffusers name of every one of our parameters. Loading is strict: a missing, unexpected or mis-shaped key is an
error naming the key. Only safetensors are read: pickles (.bin, .ckpt, .pt) can run code when loaded.
"""
import contextlib
import json
import os
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from dco import BETA_END, BETA_START, NUM_TRAIN_TIMESTEPS
from unet_sdxl import TIME_IDS, UNet, UNetConfig
from vae import AutoencoderKL, VAEConfig


class ModelError(Exception):
    """Input the scripts cannot use (a model, LoRA or data file, a setting); the message names the path, key or
    flag, and cli.run prints it as one line."""


# ---------------------------------------------------------------------------------------------- files

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


def check_file(path):
    if not os.path.isfile(path):
        raise ModelError(f"{path}: {'a folder, not a file' if os.path.isdir(path) else 'no such file'}")


def read_safetensors(path):
    if path.endswith(PICKLE_SUFFIXES):
        raise ModelError(f"{path}: only .safetensors files are loaded (pickle files can run code); convert it first")
    check_file(path)
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises several types for a damaged file
        raise ModelError(f"{path}: not a readable safetensors file ({e})") from None


def read_metadata(path):
    """The string metadata in a safetensors file's header ({} when it has none)."""
    try:
        with safe_open(path, "pt") as f:
            return f.metadata() or {}
    except Exception as e:
        raise ModelError(f"{path}: not a readable safetensors file ({e})") from None


@contextlib.contextmanager
def atomic(path):
    """Gives a temporary name to write to, renamed to path once written and synced to disk: a crash, or a power loss,
    leaves either the old file or the new one, never half of one. Makes path's folder if needed."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # on disk before it takes the name: a rename can reach the disk before the data
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # the write failed: no leftover either
            os.remove(tmp)


def write_text(path, text):
    with atomic(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:  # as every reader here reads it
        f.write(text)


def save_safetensors(tensors, path, metadata=None):
    metadata = {"format": "pt", **(metadata or {})}  # as diffusers and transformers mark their files
    with atomic(path) as tmp:
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        except SafetensorError as e:  # a full disk, say: an OSError, as any other file that cannot be written
            raise OSError(f"{path}: could not be written ({e})") from None
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # safetensors makes the file readable by its owner only


def save_training_state(path, tensors, optimizer, generator, metadata):
    """What a training run needs to continue exactly, as safetensors (no pickles): the tensors being trained, the
    optimizer's per-parameter state (AdamW's moments and step) and the generator that makes every random draw.
    The optimizer's settings are the resuming run's own."""
    out = {k: v.detach().cpu() for k, v in tensors.items()}
    out.update({f"opt.{i}.{k}": torch.as_tensor(v).cpu()
                for i, state in optimizer.state_dict()["state"].items() for k, v in state.items()})
    out["generator"] = generator.get_state()
    save_safetensors(out, path, metadata)


def load_training_state(path, optimizer, generator):
    """Restore the optimizer and the generator saved by save_training_state; returns (tensors, metadata)."""
    tensors, meta = read_safetensors(path), read_metadata(path)
    if "generator" not in tensors:
        raise ModelError(f"{path}: not a training state this code wrote; cannot resume from it")
    state = {}
    for k in [k for k in tensors if k.startswith("opt.")]:
        _, i, key = k.split(".", 2)  # opt.<parameter index>.<name>
        # a copy: the file's memory map would stay open under AdamW's state, and a later save could not replace the
        # file where that is refused (Windows)
        state.setdefault(int(i), {})[key] = tensors.pop(k).clone()
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    generator.set_state(tensors.pop("generator"))
    return tensors, meta


def component_files(folder, sub, weights=True):
    """The config and weights of one component folder (unet/ or vae/): (config path, list of weight files); the
    config alone (weights None) of any other (text_encoder/, ...)."""
    d = os.path.join(folder, sub)
    if not os.path.isdir(d):
        raise ModelError(f"{d}: missing (expected the SDXL folder layout: unet/, vae/, text_encoder/, ...)")
    config = os.path.join(d, "config.json")
    if not os.path.isfile(config):
        raise ModelError(f"{config}: missing")
    return config, weights_files(d, "diffusion_pytorch_model") if weights else None


def weights_files(d, stem):
    """A component folder's weight files: stem.safetensors, else the fp16 variant stem.fp16.safetensors (full
    precision first); each either one file or shards listed by an index, as save_pretrained splits a large model
    (an fp32 SDXL UNet is 10.3 GB, over diffusers' default shard size of 10 GB)."""
    for name, index in ((f"{stem}.safetensors", f"{stem}.safetensors.index.json"),
                        (f"{stem}.fp16.safetensors", f"{stem}.safetensors.index.fp16.json")):
        if os.path.isfile(os.path.join(d, name)):
            return [os.path.join(d, name)]
        if os.path.isfile(os.path.join(d, index)):
            weight_map = read_json(os.path.join(d, index)).get("weight_map")  # key -> shard file
            if not isinstance(weight_map, dict) or not weight_map:
                raise ModelError(f"{os.path.join(d, index)}: no weight_map naming the shards")
            return [os.path.join(d, f) for f in sorted(set(weight_map.values()))]
    pickles = [f for f in os.listdir(d) if stem in f and f.endswith(PICKLE_SUFFIXES)]  # model: pytorch_model.bin
    hint = f" ({pickles[0]} is there, but only .safetensors files are loaded: pickles can run code)" if pickles else ""
    raise ModelError(f"{d}: no {stem}[.fp16].safetensors{hint}")


def read_weights(paths):
    """The tensors of a component's weight files (one, or its shards) as one state dict."""
    tensors = {}
    for path in paths:
        shard = read_safetensors(path)
        twice = sorted(shard.keys() & tensors.keys())
        if twice:  # one would silently replace the other
            raise ModelError(f"{path}: {twice[0]!r} is in another shard too")
        tensors.update(shard)
    return tensors


def read_json(path, kind=dict):
    """The value a JSON file holds, which must be a `kind`: an object unless told otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except OSError as e:
        raise ModelError(f"{path}: {e.strerror or e}") from None
    except ValueError as e:  # not JSON, or not UTF-8 text (JSON files are)
        raise ModelError(f"{path}: not a JSON file ({e})") from None
    if not isinstance(value, kind):
        raise ModelError(f"{path}: not a JSON {'object' if kind is dict else kind.__name__}")
    return value


def check_keys(expected, tensors, source):
    """expected: name -> shape. Every missing, unexpected or mis-shaped key is an error that names it."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    for kind, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            raise ModelError(f"{source}: {kind} key {keys[0]!r}{more}; is this the right model?")
    for k, v in tensors.items():
        if tuple(v.shape) != tuple(expected[k]):
            raise ModelError(f"{source}: {k} has shape {tuple(v.shape)}, the model expects {tuple(expected[k])}")


# ---------------------------------------------------------------------------------------------- UNet

# The UNet config's fields that change what it computes, beyond its weights' shapes, at SDXL's values. A field a config
# leaves out takes diffusers' default, which is SDXL's value for all but the two in DIFFUSERS_DEFAULT.
SDXL_UNET = {"addition_embed_type": "text_time", "use_linear_projection": True, "flip_sin_to_cos": True,
             "freq_shift": 0, "act_fn": "silu", "mid_block_type": "UNetMidBlock2DCrossAttn",
             "center_input_sample": False, "norm_eps": 1e-5, "downsample_padding": 1, "mid_block_scale_factor": 1,
             "only_cross_attention": False, "mid_block_only_cross_attention": None, "dual_cross_attention": False,
             "cross_attention_norm": None, "attention_type": "default", "resnet_time_scale_shift": "default",
             "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional",
             "time_embedding_act_fn": None, "timestep_post_act": None, "time_cond_proj_dim": None,
             "class_embed_type": None, "class_embeddings_concat": False, "encoder_hid_dim_type": None}
DIFFUSERS_DEFAULT = {"addition_embed_type": None, "use_linear_projection": False}  # SD 1.x configs lack both


def unet_config_from_diffusers(c, source="unet/config.json"):
    """diffusers UNet2DConditionModel config -> UNetConfig; refuses anything that is not SDXL-shaped."""
    for k, v in SDXL_UNET.items():
        given = c.get(k, DIFFUSERS_DEFAULT.get(k, v))
        if (given or None) != (v or None):  # null and false alike, as diffusers reads them
            raise ModelError(f"{source}: {k}={given!r} is not an SDXL UNet (expected {v!r})")
    chs = c["block_out_channels"]
    depth = c.get("transformer_layers_per_block", 1)
    depth = [depth] * len(chs) if isinstance(depth, int) else list(depth)
    depth = tuple(d if "CrossAttn" in t else 0 for d, t in zip(depth, c["down_block_types"]))
    if not depth[-1]:  # the refiner's deepest level has no attention
        raise ModelError(f"{source}: no attention at the deepest level; this is not the SDXL base UNet (the refiner?)")
    heads = c.get("num_attention_heads") or c["attention_head_dim"]  # SDXL's configs give the head count there
    heads = [heads] * len(chs) if isinstance(heads, int) else heads
    head_dims = {ch // h for ch, h, d in zip(chs, heads, depth) if d}
    if len(head_dims) != 1:
        raise ModelError(f"{source}: attention head sizes {head_dims} differ between levels")
    time_id_dim = c["addition_time_embed_dim"]
    return UNetConfig(in_channels=c["in_channels"], out_channels=c["out_channels"], model_channels=chs[0],
                      channel_mult=tuple(ch // chs[0] for ch in chs), num_res_blocks=c["layers_per_block"],
                      transformer_depth=depth, head_dim=head_dims.pop(), context_dim=c["cross_attention_dim"],
                      pooled_dim=c["projection_class_embeddings_input_dim"] - TIME_IDS * time_id_dim,
                      time_id_dim=time_id_dim, norm_groups=c["norm_num_groups"])


def unet_config_to_diffusers(cfg):
    chs = [cfg.model_channels * m for m in cfg.channel_mult]
    kinds = ["CrossAttn" if d else "" for d in cfg.transformer_depth]
    return {"_class_name": "UNet2DConditionModel", "sample_size": 128, "in_channels": cfg.in_channels,
            "out_channels": cfg.out_channels, "block_out_channels": chs, "layers_per_block": cfg.num_res_blocks,
            "down_block_types": [f"{k}DownBlock2D" for k in kinds],
            "up_block_types": [f"{k}UpBlock2D" for k in reversed(kinds)],
            "transformer_layers_per_block": [max(d, 1) for d in cfg.transformer_depth],
            "attention_head_dim": [ch // cfg.head_dim for ch in chs],  # a head count, despite the name (as SDXL's)
            "cross_attention_dim": cfg.context_dim,
            "use_linear_projection": True, "addition_embed_type": "text_time",
            "addition_time_embed_dim": cfg.time_id_dim,
            "projection_class_embeddings_input_dim": cfg.adm_in_channels, "norm_num_groups": cfg.norm_groups}


RESBLOCK = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
            "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def unet_block_prefixes(cfg):
    """(our prefix, diffusers prefix, inner renames) for every layer, in the order the official code builds them."""
    pairs = [("time_embed.0", "time_embedding.linear_1", {}), ("time_embed.2", "time_embedding.linear_2", {}),
             ("label_emb.0.0", "add_embedding.linear_1", {}), ("label_emb.0.2", "add_embedding.linear_2", {}),
             ("input_blocks.0.0", "conv_in", {}), ("out.0", "conv_norm_out", {}), ("out.2", "conv_out", {}),
             ("middle_block.0", "mid_block.resnets.0", RESBLOCK), ("middle_block.1", "mid_block.attentions.0", {}),
             ("middle_block.2", "mid_block.resnets.1", RESBLOCK)]
    levels, n = len(cfg.channel_mult), cfg.num_res_blocks
    i = 1
    for level in range(levels):
        for j in range(n):
            pairs.append((f"input_blocks.{i}.0", f"down_blocks.{level}.resnets.{j}", RESBLOCK))
            if cfg.transformer_depth[level]:
                pairs.append((f"input_blocks.{i}.1", f"down_blocks.{level}.attentions.{j}", {}))
            i += 1
        if level < levels - 1:
            pairs.append((f"input_blocks.{i}.0.op", f"down_blocks.{level}.downsamplers.0.conv", {}))
            i += 1
    for up, level in enumerate(reversed(range(levels))):  # diffusers numbers up_blocks deepest first
        has_attn = bool(cfg.transformer_depth[level])
        for j in range(n + 1):
            o = up * (n + 1) + j
            pairs.append((f"output_blocks.{o}.0", f"up_blocks.{up}.resnets.{j}", RESBLOCK))
            if has_attn:
                pairs.append((f"output_blocks.{o}.1", f"up_blocks.{up}.attentions.{j}", {}))
            if level and j == n:
                pairs.append((f"output_blocks.{o}.{1 + has_attn}.conv", f"up_blocks.{up}.upsamplers.0.conv", {}))
    return pairs


def rename(key, prefixes):
    """Rename key by its longest matching (ours, theirs, inner) prefix; inner renames the submodule that follows."""
    for ours, theirs, inner in sorted(prefixes, key=lambda p: -len(p[0])):
        if key.startswith(ours + "."):
            rest = key[len(ours) + 1:]
            for a, b in inner.items():
                if rest.startswith(a + "."):
                    rest = b + rest[len(a):]
            return f"{theirs}.{rest}"
    raise KeyError(key)


def unet_key_map(cfg):
    """Our UNet parameter name -> its diffusers name."""
    prefixes = unet_block_prefixes(cfg)
    with torch.device("meta"):
        keys = UNet(cfg).state_dict().keys()
    return {k: rename(k, prefixes) for k in keys}


# ---------------------------------------------------------------------------------------------- VAE

def vae_config_from_diffusers(c, source="vae/config.json"):
    for k, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        if any(t != block for t in c[k]):
            raise ModelError(f"{source}: {k}={c[k]} is not an SDXL autoencoder")
    if c.get("latents_mean") or c.get("shift_factor"):
        raise ModelError(f"{source}: latents_mean/shift_factor are not SDXL's autoencoder")
    if c.get("act_fn", "silu") != "silu":  # the same weights would load and compute something else
        raise ModelError(f"{source}: act_fn={c['act_fn']!r} is not SDXL's autoencoder (silu)")
    return VAEConfig(in_channels=c["in_channels"], latent_channels=c["latent_channels"],
                     block_out_channels=tuple(c["block_out_channels"]), layers_per_block=c["layers_per_block"],
                     norm_groups=c["norm_num_groups"], scaling_factor=c["scaling_factor"])


def vae_config_to_diffusers(cfg):
    n = len(cfg.block_out_channels)
    return {"_class_name": "AutoencoderKL", "in_channels": cfg.in_channels, "out_channels": cfg.in_channels,
            "latent_channels": cfg.latent_channels, "block_out_channels": list(cfg.block_out_channels),
            "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
            "layers_per_block": cfg.layers_per_block, "norm_num_groups": cfg.norm_groups,
            "scaling_factor": cfg.scaling_factor, "force_upcast": True, "sample_size": 1024}


VAE_RESNET = {"nin_shortcut": "conv_shortcut"}
VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def vae_block_prefixes(cfg):
    """(our prefix, diffusers prefix, inner renames); diffusers numbers the decoder's levels deepest first."""
    n = len(cfg.block_out_channels)
    pairs = [("quant_conv", "quant_conv", {}), ("post_quant_conv", "post_quant_conv", {})]
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.conv_in", f"{part}.conv_in", {}), (f"{part}.norm_out", f"{part}.conv_norm_out", {}),
                  (f"{part}.conv_out", f"{part}.conv_out", {}),
                  (f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", VAE_RESNET),
                  (f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", VAE_RESNET),
                  (f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", VAE_ATTN)]
    for i in range(n):
        pairs += [(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", VAE_RESNET)
                  for j in range(cfg.layers_per_block)]
        pairs += [(f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{n - 1 - i}.resnets.{j}", VAE_RESNET)
                  for j in range(cfg.layers_per_block + 1)]
        pairs += [(f"encoder.down.{i}.downsample", f"encoder.down_blocks.{i}.downsamplers.0", {}),
                  (f"decoder.up.{i}.upsample", f"decoder.up_blocks.{n - 1 - i}.upsamplers.0", {})]
    return pairs


def vae_key_map(cfg):
    """Our VAE parameter name -> its diffusers name."""
    prefixes = vae_block_prefixes(cfg)
    with torch.device("meta"):
        keys = AutoencoderKL(cfg).state_dict().keys()
    return {k: rename(k, prefixes) for k in keys}


# ---------------------------------------------------------------------------------------------- load / save

class Component(NamedTuple):
    """What loading and saving one model folder takes: its class, its config's two conversions and its key map."""
    cls: type
    config_from_diffusers: Callable
    config_to_diffusers: Callable
    key_map: Callable


COMPONENTS = {"unet": Component(UNet, unet_config_from_diffusers, unet_config_to_diffusers, unet_key_map),
              "vae": Component(AutoencoderKL, vae_config_from_diffusers, vae_config_to_diffusers, vae_key_map)}


def component_config(folder, sub):
    """The UNetConfig or VAEConfig of folder/sub/config.json."""
    config_path, _ = component_files(folder, sub, weights=False)
    try:
        return COMPONENTS[sub].config_from_diffusers(read_json(config_path), config_path)
    except (KeyError, TypeError, ZeroDivisionError) as e:
        raise ModelError(f"{config_path}: not a valid {sub} config ({e!r})") from None


def load_component(folder, sub, dtype=torch.float32, device="cpu", tensors=None):
    """Build unet/ or vae/ from its config.json and load its weights strictly: the folder's safetensors (diffusers
    names), or `tensors` under our (official) names, as read from the single-file checkpoint."""
    component = COMPONENTS[sub]
    cfg = component_config(folder, sub)
    _, weights = component_files(folder, sub, weights=tensors is None)
    with torch.device("meta"):
        model = component.cls(cfg)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    if tensors is None:
        mapping = component.key_map(cfg)  # ours -> diffusers
        theirs = read_weights(weights)
        source = weights[0] if len(weights) == 1 else f"{os.path.dirname(weights[0])} (its {len(weights)} shards)"
        check_keys({mapping[k]: shape for k, shape in shapes.items()}, theirs, source)
        tensors = {k: theirs[mapping[k]] for k in mapping}
    else:
        check_keys(shapes, tensors, f"the single file's {sub}")
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.to(device=device, dtype=dtype)


def check_parts_fit(folder):
    """Refuse a folder whose models do not fit together, from their configs, before any weights load: an
    inpainting UNet (9 input channels) or text encoders of other widths would otherwise fail inside a layer."""
    unet, vae = component_config(folder, "unet"), component_config(folder, "vae")
    te, te2 = (read_json(component_files(folder, p, weights=False)[0]) for p in ("text_encoder", "text_encoder_2"))
    fits = {"the UNet's input channels and the VAE's latent channels": (unet.in_channels, vae.latent_channels),
            "the UNet's output channels and the VAE's latent channels": (unet.out_channels, vae.latent_channels),
            "the UNet's context width and the two text encoders' widths added":
                (unet.context_dim, te.get("hidden_size", 0) + te2.get("hidden_size", 0)),
            "the UNet's pooled width and text_encoder_2's projection": (unet.pooled_dim, te2.get("projection_dim"))}
    for what, (a, b) in fits.items():
        if a != b:
            raise ModelError(f"{folder}: {what} differ ({a} and {b}); is this an SDXL base model?")
    for tokenizer, encoder in (("tokenizer", te), ("tokenizer_2", te2)):  # prompts are padded to the tokenizer's length
        path = os.path.join(folder, tokenizer, "tokenizer_config.json")
        length = read_json(path).get("model_max_length") if os.path.isfile(path) else None
        positions = encoder.get("max_position_embeddings", 77)  # transformers' default, SDXL's value
        if length != positions:
            raise ModelError(f"{path}: {'missing' if length is None else f'model_max_length {length}'}; the text "
                             f"encoder reads prompts of {positions} tokens (SDXL's tokenizer_config.json says "
                             "model_max_length 77)")


def save_text_encoder(encoder, folder):
    """A transformers text encoder as its save_pretrained lays it out, written atomically: a save cut short leaves no
    half file for a resumed run to stop at."""
    encoder.config.architectures = [type(encoder).__name__]
    write_text(os.path.join(folder, "config.json"), encoder.config.to_json_string())
    save_safetensors(encoder.state_dict(), os.path.join(folder, "model.safetensors"))


def save_component(model, folder, sub):
    """Write a UNet or VAE in the diffusers folder layout, as the official download has it."""
    component = COMPONENTS[sub]
    d = os.path.join(folder, sub)
    os.makedirs(d, exist_ok=True)
    mapping = component.key_map(model.cfg)
    save_safetensors({mapping[k]: v for k, v in model.state_dict().items()},
                     os.path.join(d, "diffusion_pytorch_model.safetensors"))
    write_text(os.path.join(d, "config.json"), json.dumps(component.config_to_diffusers(model.cfg), indent=2))


def load_unet(folder, dtype=torch.float32, device="cpu", tensors=None):
    return load_component(folder, "unet", dtype, device, tensors)


def load_vae(folder, dtype=torch.float32, device="cpu", tensors=None):
    return load_component(folder, "vae", dtype, device, tensors)


# ---------------------------------------------------------------------------------------------- the single file

SINGLE_FILE = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
               "text_encoder": "conditioner.embedders.0.transformer.",
               "text_encoder_2": "conditioner.embedders.1.model."}
UNUSED = {"conditioner.embedders.1.model.transformer.text_model.embeddings.position_ids",  # ComfyUI's saver, 2023
          "conditioner.embedders.1.model.logit_scale",  # CLIP's image-text temperature
          "denoiser.sigmas"}  # a noise schedule, which some tools save; the sampler computes its own
EMA = "model_ema."  # a training run's exponential moving average of the UNet, which some fine-tunes keep


# The noise schedule and the prediction that training (dco.py) and sampling (sampler.py) assume, as a diffusers
# scheduler_config.json states them.
SCHEDULE = {"prediction_type": "epsilon", "beta_schedule": "scaled_linear", "beta_start": BETA_START,
            "beta_end": BETA_END, "num_train_timesteps": NUM_TRAIN_TIMESTEPS}


def check_schedule(folder):
    """Refuse a model trained for another schedule or prediction (a v-prediction fine-tune, say): our loss and
    sampler would use it wrongly without a sign. A folder without scheduler/ (a --config folder) is taken as SDXL's.
    Returns the config ({} without one)."""
    path = os.path.join(folder, "scheduler", "scheduler_config.json")
    if not os.path.isfile(path):
        return {}
    config = read_json(path)
    other = [f"{k} {config[k]!r}" for k, v in SCHEDULE.items() if k in config and config[k] != v]
    for k in ("rescale_betas_zero_snr", "trained_betas"):  # another set of betas: zero terminal SNR, or given outright
        if config.get(k):
            other.append(f"{k} {config[k]!r:.40}")
    if other:
        raise ModelError(f"{path}: {', '.join(other)}; only SDXL's own schedule is supported "
                         f"({', '.join(f'{k} {v!r}' for k, v in SCHEDULE.items())})")
    return config


def model_folder(model, config=None):
    """(the folder with the configs, the single file or None) for --model and --config."""
    if not os.path.exists(model):
        raise ModelError(f"{model}: no such model folder or file")
    if not os.path.isfile(model):
        if config:  # a folder holds its own configs: another folder's would be silently ignored
            raise ModelError(f"--config is for a single-file --model; {model} is a folder, with configs of its own")
        return model, None
    if not config:
        raise ModelError(f"{model}: a single-file checkpoint needs --config DIR, a folder with the diffusers layout's "
                         "configs and tokenizers (its weights are not needed)")
    return config, model


def read_single_file(path):
    """The official single file (sd_xl_base_1.0.safetensors) -> {component: tensors}: the UNet and the VAE under our
    names (the official ones), the text encoders under transformers' names."""
    parts = {name: {} for name in SINGLE_FILE}
    tensors = read_safetensors(path)
    if any(key.startswith(EMA) for key in tensors):
        warnings.warn(f"{path}: the file also holds EMA weights ({EMA}*); the model's own weights are loaded")
    for key, value in tensors.items():
        if key in UNUSED or key.startswith(EMA):
            continue
        name = next((n for n, prefix in SINGLE_FILE.items() if key.startswith(prefix)), None)
        if name is None:
            raise ModelError(f"{path}: unexpected key {key!r}; is this the SDXL base checkpoint?")
        parts[name][key[len(SINGLE_FILE[name]):]] = value
    # The autoencoder's attention projections are 1x1 convolutions there and linear layers here: (C, C, 1, 1) -> (C, C).
    # Any other shape stays as it is, for check_keys to refuse.
    parts["vae"] = {k: v[:, :, 0, 0] if ".attn_1." in k and v.shape[2:] == (1, 1) else v
                    for k, v in parts["vae"].items()}
    try:
        parts["text_encoder_2"] = openclip_to_transformers(parts["text_encoder_2"])
    except KeyError as e:
        raise ModelError(f"{path}: the OpenCLIP text encoder's keys are not SDXL's ({e})") from None
    return parts


OPENCLIP_TOP = {"token_embedding.weight": "text_model.embeddings.token_embedding.weight",
                "positional_embedding": "text_model.embeddings.position_embedding.weight",
                "ln_final.weight": "text_model.final_layer_norm.weight",
                "ln_final.bias": "text_model.final_layer_norm.bias"}
OPENCLIP_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
                  "attn.out_proj": "self_attn.out_proj"}


def openclip_to_transformers(t):
    """OpenCLIP's text tower (resblocks with fused q/k/v, a (width, dim) projection) -> CLIPTextModelWithProjection."""
    t = dict(t)
    out = {ours: t.pop(theirs) for theirs, ours in OPENCLIP_TOP.items()}
    out["text_projection.weight"] = t.pop("text_projection").T  # x @ P there, a Linear (P^T) here
    for key, value in t.items():
        if not key.startswith("transformer.resblocks."):
            raise KeyError(f"unexpected {key}")
        layer, _, rest = key[len("transformer.resblocks."):].partition(".")
        prefix = f"text_model.encoder.layers.{layer}."
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):  # (3 width, ...) -> q, k, v
            kind = rest.rsplit("_", 1)[1]
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3)):
                out[f"{prefix}self_attn.{proj}.{kind}"] = part
        else:
            module, _, kind = rest.rpartition(".")
            out[f"{prefix}{OPENCLIP_LAYER[module]}.{kind}"] = value
    return out


def with_text_model_prefix(t):
    """A CLIP text model's state dict under the classic names: newer transformers drop CLIPTextModel's "text_model."."""
    return {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v for k, v in t.items()}


def for_this_transformers(t, model_keys):
    """The inverse: classic names -> the names of the installed transformers' model (model_keys)."""
    if any(k.startswith("text_model.") for k in model_keys):
        return t
    return {k.removeprefix("text_model."): v for k, v in t.items()}


def transformers_to_openclip(t):
    """CLIPTextModelWithProjection's state dict -> OpenCLIP's text tower: the inverse of openclip_to_transformers."""
    t = with_text_model_prefix(t)
    out = {theirs: t.pop(ours) for theirs, ours in OPENCLIP_TOP.items()}
    out["text_projection"] = t.pop("text_projection.weight").T
    openclip_name, qkv = {v: k for k, v in OPENCLIP_LAYER.items()}, {}
    for key, value in t.items():
        layer, _, rest = key[len("text_model.encoder.layers."):].partition(".")
        module, _, kind = rest.rpartition(".")
        prefix = f"transformer.resblocks.{layer}."
        if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            qkv.setdefault(f"{prefix}attn.in_proj_{kind}", {})[module] = value
        else:
            out[prefix + openclip_name[module] + "." + kind] = value
    for key, parts in qkv.items():  # q, k, v -> (3 width, ...)
        out[key] = torch.cat([parts[f"self_attn.{p}_proj"] for p in "qkv"])
    return out


def save_single_file(path, unet, vae, text_encoders, dtype=torch.float16, metadata=None):
    """UNet, VAE and text encoders in the official single file's layout (the one A1111 and ComfyUI read), which
    read_single_file and diffusers' from_single_file read back."""
    te, te2 = (encoder.state_dict() for encoder in text_encoders.encoders)
    parts = {"unet": unet.state_dict(),
             "vae": {k: v[:, :, None, None] if ".attn_1." in k and v.ndim == 2 else v  # 1x1 convolutions there
                     for k, v in vae.state_dict().items()},
             "text_encoder": with_text_model_prefix(te),
             "text_encoder_2": transformers_to_openclip(te2)}
    save_safetensors({SINGLE_FILE[name] + k: v.to(dtype) for name, part in parts.items() for k, v in part.items()},
                     path, metadata)
