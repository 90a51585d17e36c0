"""A tiny SDXL-shaped model with random weights, built by the reference libraries (diffusers + transformers) and
saved in the official download's folder layout. Our code must load it and match the reference."""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WORDS = ["a", "photo", "of", "dog", "cat", "red", "blue", "in", "the", "snow", "style", "cartoon", "on", "beach"]


def write_tokenizer(folder, pad_token):
    """A tiny CLIP BPE tokenizer: single characters, a few words, the two special tokens last (EOS has the largest
    id, as in CLIP, so the pooled output picks it)."""
    os.makedirs(folder, exist_ok=True)
    chars = sorted(set("abcdefghijklmnopqrstuvwxyz!,.<>"))
    vocab = chars + [c + "</w>" for c in chars]
    merges = []
    for w in WORDS:
        if len(w) < 2:
            continue
        pieces = list(w[:-1]) + [w[-1] + "</w>"]
        while len(pieces) > 1:  # merge left to right: "d o" -> "do", "do g</w>" -> "dog</w>"
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            if pieces[0] not in vocab:
                vocab.append(pieces[0])
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(dict.fromkeys(vocab))}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    from transformers import CLIPTokenizer
    tok = CLIPTokenizer.from_pretrained(folder, pad_token=pad_token, model_max_length=77)
    tok.save_pretrained(folder)
    return tok


def reference_tiny_sdxl(folder, seed=0, text_widths=(16, 16)):
    """A tiny random SDXL pipeline saved in the official layout; text_widths: the two text encoders' hidden sizes
    (their sum is the UNet's context size, 32)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tok = write_tokenizer(os.path.join(folder, "tokenizer"), "<|endoftext|>")
    tok2 = write_tokenizer(os.path.join(folder, "tokenizer_2"), "!")
    clip = dict(vocab_size=len(tok), intermediate_size=32, num_hidden_layers=3,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    te = CLIPTextModel(CLIPTextConfig(**clip, hidden_size=text_widths[0], hidden_act="quick_gelu"))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**clip, hidden_size=text_widths[1], hidden_act="gelu",
                                                     projection_dim=32))
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), attention_head_dim=(4, 8, 8), cross_attention_dim=32,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8, norm_num_groups=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, scaling_factor=0.13025, sample_size=32)
    # Random weights everywhere, norms included, so that a swapped or misnamed key cannot hide.
    with torch.no_grad():
        for model in (unet, vae):
            for name, p in model.named_parameters():
                p.copy_(torch.randn_like(p) * (0.3 if p.ndim > 1 else 0.1) + (1.0 if "norm" in name and
                                                                                 name.endswith("weight") else 0.0))
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading",
                                   prediction_type="epsilon", interpolation_type="linear")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok2,
                                     unet=unet, scheduler=sched, force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """(folder, reference pipeline) of a tiny random SDXL in the official layout."""
    folder = str(tmp_path_factory.mktemp("tiny-sdxl"))
    pipe = reference_tiny_sdxl(folder)
    pipe.set_progress_bar_config(disable=True)
    return folder, pipe


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_single_file(folder, path, text_seed=None):
    """The model in `folder` as the official single file, with the two keys real files carry and readers skip. With
    text_seed, the text encoders get random weights first, norms included, so that a swapped key shows."""
    from safetensors.torch import load_file, save_file
    from checkpoint import save_single_file
    from sample import load_sdxl
    unet, vae, text = load_sdxl(folder, torch.device("cpu"), torch.float32)
    if text_seed is not None:
        g = torch.Generator().manual_seed(text_seed)
        with torch.no_grad():
            for p in text.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    save_single_file(path, unet, vae, text, torch.float32)
    tensors = load_file(path)
    tensors["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    tensors["conditioner.embedders.1.model.logit_scale"] = torch.tensor(4.6052)
    save_file(tensors, path)


def run_script(script, *args, check=True):
    """Run one of the command-line tools as a user would; returns the CompletedProcess."""
    import subprocess
    r = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise AssertionError(f"{script} failed:\n{r.stderr[-3000:]}")
    return r


def write_images(folder, captions, size=(40, 48), seed=0):
    """Smooth random images (so the VAE sees structure) with same-name .txt captions."""
    import numpy as np
    from PIL import Image
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, cap in enumerate(captions):
        small = rng.random((4, 5, 3)) * 255
        image = Image.fromarray(small.astype(np.uint8)).resize(size[::-1], Image.BICUBIC)
        image.save(os.path.join(folder, f"{i:02d}.png"))
        with open(os.path.join(folder, f"{i:02d}.txt"), "w") as f:
            f.write(cap)
    return folder


TRAIN_ARGS = ("--resolution", 32, "--rank", 4, "--lr", 1e-2, "--ti-lr", 1e-3, "--save-every", 0, "--seed", 0)


@pytest.fixture(scope="session")
def trained(tiny_sdxl, tmp_path_factory):
    """A train.py output folder: DCO with a learned token on the tiny model."""
    folder = tiny_sdxl[0]
    tmp = tmp_path_factory.mktemp("trained")
    data = write_images(str(tmp / "data"), ["a photo of a <dog> in the snow", "a red <dog> on the beach",
                                            "a photo of a <dog>"])
    out = str(tmp / "out")
    run_script("train.py", "--model", folder, "--data", data, "--out", out, "--token", "<dog>", "--init-token", "dog",
               "--steps", 8, *TRAIN_ARGS)
    return out
