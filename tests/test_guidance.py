"""Consistency guidance, several LoRAs at once, and merge.py."""
import argparse
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import lora as lora_lib
from checkpoint import ModelError, load_unet, read_metadata
from conftest import ROOT, run_script, write_single_file
import cli
from cli import split_spec
from sample import Pipeline, base_prompt, generate, grid, load_pipeline, warn_unloaded_tokens, warn_unused_tokens
from sampler import guidance

PROMPT = "a photo of a <dog> in the snow"
KW = dict(steps=6, width=64, height=64, cfg=5.0)


def test_guidance_formula():
    u, b, l = torch.tensor(1.0), torch.tensor(3.0), torch.tensor(4.0)
    assert guidance(u, b, 5.0).item() == 1 + 5 * 2
    assert guidance(u, b, 5.0, l, w_con=2.0).item() == 1 + 5 * 2 + 2 * 1
    assert guidance(u, b, 5.0, l, w_con=0.0).item() == guidance(u, b, 5.0).item()


@torch.no_grad()
def test_w_con_zero_is_the_base_model(tiny_sdxl, trained):
    tuned = load_pipeline(tiny_sdxl[0], loras=[trained])
    plain = load_pipeline(tiny_sdxl[0])
    assert base_prompt(tuned.tokens, PROMPT) == "a photo of a dog in the snow"
    cg0 = generate(tuned, PROMPT, [0, 1], w_con=0.0, **KW)
    base = generate(plain, "a photo of a dog in the snow", [0, 1], **KW)
    torch.testing.assert_close(cg0, base, rtol=0, atol=1e-4)
    assert (generate(tuned, PROMPT, [0, 1], w_con=3.0, **KW) - base).abs().max() > 0.05  # and w_con matters
    wide = dict(KW, width=64, height=32)  # not square: every prompt's size conditioning is (height, width)
    torch.testing.assert_close(generate(tuned, PROMPT, [0], w_con=0.0, **wide),
                               generate(plain, "a photo of a dog in the snow", [0], **wide), rtol=0, atol=1e-4)


@torch.no_grad()
def test_a_folded_lora_samples_as_one_apart_and_refuses_consistency_guidance(tiny_sdxl, trained):
    folded, apart = (load_pipeline(tiny_sdxl[0], loras=[trained + ":0.7"], fold=fold) for fold in (True, False))
    assert not lora_lib.lora_modules(folded.unet) and lora_lib.lora_modules(apart.unet)
    torch.testing.assert_close(generate(folded, PROMPT, [0], **KW), generate(apart, PROMPT, [0], **KW),
                               rtol=0, atol=1e-4)
    for w in (2.0, 0.0):  # w_con 0 too: the base model's CFG, which a folded UNet no longer has
        with pytest.raises(ModelError, match="needs the LoRAs apart"):  # its base model is gone
            generate(folded, PROMPT, [0], w_con=w, **KW)


@torch.no_grad()
def test_a_token_without_its_initializer_word_refuses_consistency_guidance(tiny_sdxl, trained, tmp_path):
    # The official code's output folder: its learned_embeds names no token (only the keys clip_l and clip_g).
    emb, lora = str(tmp_path / "learned_embeds.safetensors"), str(tmp_path / "pytorch_lora_weights.safetensors")
    save_file(load_file(os.path.join(trained, "learned_embeds.safetensors")), emb)
    save_file(load_file(os.path.join(trained, "pytorch_lora_weights.safetensors")), lora)
    with pytest.raises(ModelError, match=f"load it with --embeds {emb}:TOKEN:INITWORD"):
        load_pipeline(tiny_sdxl[0], loras=[str(tmp_path)])
    pipe = load_pipeline(tiny_sdxl[0], loras=[str(tmp_path)], embeds=[emb + ":<dog>"])  # --embeds replaces the guess
    generate(pipe, PROMPT, [0], steps=2, width=64, height=64)  # plain sampling needs no base prompt
    with pytest.raises(ModelError, match="initializer word"):  # but with only FILE:TOKEN, c_base is unknown
        generate(pipe, PROMPT, [0], w_con=2.0, steps=2, width=64, height=64)
    pipe = load_pipeline(tiny_sdxl[0], loras=[lora], embeds=[emb + ":<dog>:dog"])
    assert base_prompt(pipe.tokens, PROMPT) == "a photo of a dog in the snow"
    with pytest.warns(UserWarning, match="<dog> is not a learned token of this model"):  # the LoRA file alone
        warn_unloaded_tokens(load_pipeline(tiny_sdxl[0], loras=[lora]), PROMPT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_unloaded_tokens(pipe, PROMPT)  # loaded: no warning
        warn_unused_tokens(pipe, PROMPT)  # and named in the prompt
    with pytest.warns(UserWarning, match=r"names none of the learned tokens loaded \(<dog>\)"):
        warn_unused_tokens(pipe, "a photo of a dog in the snow")
    # CLIP's tokenizer reads a learned token in any case: so must c_base, which the base model must see without it
    upper = PROMPT.replace("<dog>", "<DOG>")
    learned = pipe.text.tokenizers[0].convert_tokens_to_ids("<dog>")
    assert learned in pipe.text.tokens([upper])[0]
    assert base_prompt(pipe.tokens, upper) == "a photo of a dog in the snow"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_unused_tokens(pipe, upper)
    # and where two learned tokens overlap, the longer one
    tokenizer = copy.deepcopy(pipe.text.tokenizers[0])
    tokenizer.add_tokens(["<sub>", "<sub>x"])
    assert tokenizer.convert_tokens_to_ids("<sub>x") in tokenizer("a <sub>x").input_ids
    assert base_prompt({"<sub>": "cat", "<sub>x": "dog"}, "a <sub>x by a <SUB>") == "a dog by a cat"
    with warnings.catch_warnings():  # one token of two named is enough
        warnings.simplefilter("error")
        warn_unused_tokens(Pipeline(None, None, None, {"<dog>": "dog", "<cat>": "cat"}), PROMPT)
    # FILE:TOKEN:WORD names the token even where the file names another: a rename
    assert load_pipeline(tiny_sdxl[0], embeds=[os.path.join(trained, "learned_embeds.safetensors") + ":<pet>:animal"]
                         ).tokens == {"<pet>": "animal"}
    other = str(tmp_path / "other_embeds.safetensors")  # another file that learned <dog>: which to keep is the user's
    save_file({k: v + 1 for k, v in load_file(emb).items()}, other)
    with pytest.raises(ModelError, match="the token '<dog>' is already loaded"):
        load_pipeline(tiny_sdxl[0], embeds=[emb + ":<dog>:dog", other + ":<dog>:dog"])
    for scale in ("x", "nan"):
        with pytest.raises(ModelError, match=f"the scale '{scale}' is not a number"):
            load_pipeline(tiny_sdxl[0], loras=[lora + ":" + scale])
    # The folder's token file named by --embeds under another spelling of its path is that file, loaded once; a
    # backup beside it is not a token file.
    (tmp_path / "learned_embeds.safetensors.bak").write_bytes(b"an old copy")
    spelled = os.path.join(str(tmp_path), ".", "learned_embeds.safetensors")
    pipe = load_pipeline(tiny_sdxl[0], loras=[str(tmp_path)], embeds=[spelled + ":<dog>:dog"])
    assert pipe.tokens == {"<dog>": "dog"}


@torch.no_grad()
def test_one_batched_call_equals_three_calls(tiny_sdxl, trained):
    pipe = load_pipeline(tiny_sdxl[0], loras=[trained])
    from sample import conditioning
    from text import Cond
    c = Cond.cat([conditioning(pipe.text, [p], 64, 64, zero_empty=True) for p in ("", "a photo of a dog", PROMPT)])
    x, t = torch.randn(1, 4, 32, 32).repeat(3, 1, 1, 1), torch.tensor(500.0)
    with lora_lib.lora_scale(pipe.unet, torch.tensor([0.0, 0.0, 1.0])):
        batched = pipe.unet(x, t, c.context, c.pooled, c.time_ids)
    for i, s in enumerate((0.0, 0.0, 1.0)):
        with lora_lib.lora_scale(pipe.unet, s):
            one = pipe.unet(x[i:i + 1], t, c.context[i:i + 1], c.pooled[i:i + 1], c.time_ids[i:i + 1])
        torch.testing.assert_close(batched[i:i + 1], one, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def reference_cg_image(folder, out, prompt, base, w_con, seed, steps, size, cfg):
    """Consistency guidance written over diffusers' components, as the official code does it (two UNet calls)."""
    from diffusers import StableDiffusionXLPipeline
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.load_lora_weights(out)
    emb = load_file(os.path.join(out, "learned_embeds.safetensors"))
    pipe.load_textual_inversion(emb["clip_l"], token="<dog>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(emb["clip_g"], token="<dog>", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    lora_ctx, _, lora_pooled, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False)
    base_ctx, neg_ctx, base_pooled, neg_pooled = pipe.encode_prompt(base, do_classifier_free_guidance=True)
    ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32)
    sched = pipe.scheduler
    sched.set_timesteps(steps)
    latents = torch.randn((1, 4, size // 2, size // 2), generator=torch.Generator("cpu").manual_seed(seed))
    latents = latents * sched.init_noise_sigma
    for t in sched.timesteps:
        inp = sched.scale_model_input(torch.cat([latents] * 2), t)
        eps_u, eps_b = pipe.unet(inp, t, torch.cat([neg_ctx, base_ctx]), cross_attention_kwargs={"scale": 0.0},
                                 added_cond_kwargs={"text_embeds": torch.cat([neg_pooled, base_pooled]),
                                                    "time_ids": ids.repeat(2, 1)}).sample.chunk(2)
        eps_l = pipe.unet(inp[:1], t, lora_ctx, added_cond_kwargs={"text_embeds": lora_pooled, "time_ids": ids}).sample
        eps = eps_u + cfg * (eps_b - eps_u) + w_con * (eps_l - eps_b)
        latents = sched.step(eps, t, latents).prev_sample
    image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return np.asarray(pipe.image_processor.postprocess(image)[0], dtype=int)


def test_sample_py_consistency_guidance_matches_a_reference_loop(tiny_sdxl, trained, tmp_path):
    folder = tiny_sdxl[0]
    png = str(tmp_path / "cg.png")
    run_script("sample.py", "--model", folder, "--lora", trained, "--prompt", PROMPT, "--w-con", 3, "--steps", 6,
               "--width", 64, "--height", 64, "--seed", 5, "--out", png, "--quiet")
    ours = np.asarray(Image.open(png), dtype=int)
    ref = reference_cg_image(folder, trained, PROMPT, "a photo of a dog in the snow", 3.0, 5, 6, 64, 5.0)
    assert np.abs(ours - ref).max() <= 2


def test_w_con_sweep_makes_a_labelled_grid(tiny_sdxl, trained, tmp_path):
    png = str(tmp_path / "grid.png")
    run_script("sample.py", "--model", tiny_sdxl[0], "--lora", trained, "--prompt", PROMPT, "--w-con", "0,2,4",
               "--n", 2, "--steps", 2, "--width", 32, "--height", 32, "--out", png, "--quiet")
    im = Image.open(png)
    assert im.size == (3 * 32, 2 * 32 + 14)
    settings = json.loads(im.info["parameters"])  # what made the image, as given
    assert (settings["lora"], settings["prompt"], settings["w_con"], settings["n"]) == ([trained], PROMPT, [0, 2, 4], 2)
    assert not {"quiet", "compile", "cuda_graph"} & settings.keys()  # how it ran, not what it made
    # The columns in --w-con's order, a row per seed: column 0 is w_con 0, the base model's image for seed 0 and 1
    pipe = load_pipeline(tiny_sdxl[0], loras=[trained])
    for col, w in enumerate((0.0, 2.0, 4.0)):
        want = np.asarray(grid([generate(pipe, PROMPT, [0, 1], w_con=w, steps=2, width=32, height=32)], [""]))[14:]
        assert np.abs(np.asarray(im.convert("RGB"))[14:, 32 * col:32 * (col + 1)].astype(int) - want).max() <= 1, w
    r = run_script("sample.py", "--model", tiny_sdxl[0], "--prompt", "x", "--w-con", "abc", check=False)
    assert r.returncode == 2 and "expected a number" in r.stderr


def test_grid_columns_follow_their_labels_and_rows_their_seeds():
    g = torch.Generator().manual_seed(0)
    columns = [torch.rand(2, 3, 16, 24, generator=g) for _ in range(3)]  # 3 labels x 2 seeds of 16x24 images
    image = np.asarray(grid(columns, ["w_con=0", "w_con=1", "w_con=2"]))
    assert image.shape == (14 + 2 * 16, 3 * 24, 3)
    for j, col in enumerate(columns):
        for i, im in enumerate(col):
            want = (im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            assert np.array_equal(image[14 + 16 * i: 14 + 16 * (i + 1), 24 * j: 24 * (j + 1)], want), (i, j)
        assert (image[:14, 24 * j: 24 * j + 6] < 128).any(), j  # its label starts above it, in black on white


def test_specs_split_at_colons_but_not_a_drive_letter():
    assert split_spec("out/dog", 2) == ["out/dog", None]
    assert split_spec("out/dog:0.8", 2) == ["out/dog", "0.8"]
    assert split_spec(r"C:\loras\dog.safetensors:0.8", 2) == [r"C:\loras\dog.safetensors", "0.8"]
    assert split_spec("C:/e.safetensors:<dog>:dog", 3) == ["C:/e.safetensors", "<dog>", "dog"]
    assert split_spec("a:0.5", 2) == ["a", "0.5"]  # a one-letter folder, not a drive
    assert cli.lora_spec("C:/d.safetensors:0.5") == "C:/d.safetensors:0.5"
    for typo in ("out/dog::0.5", "out/dog:0.5:0.7", "out/dog:", "out/dog:x"):  # a scale that would be dropped
        with pytest.raises(argparse.ArgumentTypeError, match="expected PATH.:SCALE."):
            cli.lora_spec(typo)
    assert cli.embeds_spec("e.safetensors:<dog>:dog") == "e.safetensors:<dog>:dog"
    for typo in ("e.safetensors:<dog>:dog:x", "e.safetensors::dog", "e.safetensors:<dog>:"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected FILE"):
            cli.embeds_spec(typo)


def test_base_prompt_replaces_only_the_tokens_it_uses():
    tokens = {"<dog>": "dog", "<cat>": None}
    assert base_prompt(tokens, "a <dog> and a <dog>") == "a dog and a dog"  # <cat> has no word, but is not used
    with pytest.raises(ModelError, match="'<cat>' has no initializer word"):
        base_prompt(tokens, "a <Cat>")


def random_lora_file(folder, path, seed, targets=("to_q", "to_v"), rank=2):
    unet = load_unet(folder)
    lora_lib.inject(unet, rank=rank, targets=targets)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_lib.lora_modules(unet).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)
    save_file(lora_lib.to_diffusers(lora_lib.get_lora(unet), unet.cfg), path)
    return path


def unet_inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([700.0, 30.0]), torch.randn(2, 77, 32, generator=g),
            torch.randn(2, 32, generator=g), torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2))


def merge_here(*args):
    """merge.py in this process (each test runs the command line once; a process per call costs seconds)."""
    import merge
    merge.main(merge.parse_args([str(a) for a in args]))


def test_merge_equals_both_loras_applied_together(tiny_sdxl, trained, tmp_path, monkeypatch):
    from diffusers import StableDiffusionXLPipeline
    folder = tiny_sdxl[0]
    style = random_lora_file(folder, str(tmp_path / "style.safetensors"), seed=1)
    run_script("merge.py", trained, style, "--weights", 1, 0.5, "--model", folder, "--out", tmp_path / "merged")
    merged = tmp_path / "merged"
    assert sorted(os.listdir(merged)) == ["learned_embeds.safetensors", "pytorch_lora_weights.safetensors"]
    # to_q and to_v have rank 4 + 2, to_k and to_out.0 rank 4, written padded to one rank (older diffusers need it)
    written = load_file(str(merged / "pytorch_lora_weights.safetensors"))
    ranks = {k.split(".lora.")[0].rsplit(".", 1)[-1]: v.shape[0]
             for k, v in written.items() if k.endswith("down.weight")}
    assert set(ranks) == {"to_q", "to_k", "to_v", "0"} and set(ranks.values()) == {6}
    x, t, ctx, pooled, ids = unet_inputs()
    ref = StableDiffusionXLPipeline.from_pretrained(folder)
    ref.load_lora_weights(trained, adapter_name="subject")
    ref.load_lora_weights(style, adapter_name="style")
    ref.set_adapters(["subject", "style"], adapter_weights=[1.0, 0.5])
    with torch.no_grad():
        want = ref.unet(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
        ours = load_pipeline(folder, loras=[str(merged)]).unet(x, t, ctx, pooled, ids)
        both = load_pipeline(folder, loras=[trained, style + ":0.5"]).unet(x, t, ctx, pooled, ids)
    torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(both, want, rtol=1e-4, atol=1e-4)
    merged_ref = StableDiffusionXLPipeline.from_pretrained(folder)  # the merged file loads in diffusers too
    merged_ref.load_lora_weights(str(merged))
    with torch.no_grad():
        again = merged_ref.unet(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
    torch.testing.assert_close(again, want, rtol=1e-4, atol=1e-4)
    merge_here(trained, style, "--weights", 1, 0.5, "--model", folder, "--kohya", "--out",
               tmp_path / "kohya")  # a kohya folder reads back as the same LoRA
    assert not (tmp_path / "kohya" / lora_lib.DIFFUSERS_FILE).exists()
    assert all(re.fullmatch(r"lora_unet_\w+\.(lora_down\.weight|lora_up\.weight|alpha)", k)  # kohya's key names
               for k in load_file(str(tmp_path / "kohya" / lora_lib.KOHYA_FILE)))
    with pytest.raises(ModelError, match="is one of the inputs"):
        merge_here(trained, "--model", folder, "--out", trained)
    kohya_file = str(tmp_path / "kohya" / lora_lib.KOHYA_FILE)  # an input file as --out: it would be gone
    base_file = str(tmp_path / "sd_xl_tiny.safetensors")
    write_single_file(folder, base_file)
    before = {f: load_file(f) for f in (kohya_file, base_file)}
    with pytest.raises(ModelError, match="is one of the inputs; write the merge to another file"):
        merge_here(kohya_file, trained, "--model", folder, "--out", kohya_file)
    with pytest.raises(ModelError, match="is one of the inputs; write the merge to another file"):  # the base model
        merge_here(trained, "--fuse", "--model", base_file, "--config", folder, "--out", base_file)
    for f, tensors in before.items():
        assert all(torch.equal(v, tensors[k]) for k, v in load_file(f).items())
    with torch.no_grad():
        kohya = load_pipeline(folder, loras=[str(tmp_path / "kohya")]).unet(x, t, ctx, pooled, ids)
    torch.testing.assert_close(kohya, want, rtol=1e-4, atol=1e-4)
    # --rank at the summed rank (4 + 2) compresses nothing: still the weighted sum
    merge_here(trained, style, "--weights", 1, 0.5, "--model", folder, "--rank", 6, "--out", tmp_path / "r")
    with torch.no_grad():
        compressed = load_pipeline(folder, loras=[str(tmp_path / "r")]).unet(x, t, ctx, pooled, ids)
    torch.testing.assert_close(compressed, want, rtol=1e-4, atol=1e-4)
    # Two folders with a learned token each: both tokens are carried, and nothing stale stays in --out
    cat = tmp_path / "cat"
    cat.mkdir()
    os.rename(style, cat / "pytorch_lora_weights.safetensors")
    save_file(load_file(os.path.join(trained, "learned_embeds.safetensors")), str(cat / "learned_embeds.safetensors"),
              {"token": "<cat>", "init_token": "cat"})
    merge_here(trained, "--model", folder, "--kohya", "--out", tmp_path / "both")  # an earlier merge, other format
    merge_here(trained, cat, "--model", folder, "--out", tmp_path / "both")
    assert sorted(os.listdir(tmp_path / "both")) == ["learned_embeds.safetensors", "learned_embeds_1.safetensors",
                                                     "pytorch_lora_weights.safetensors"]
    assert load_pipeline(folder, loras=[str(tmp_path / "both")]).tokens == {"<dog>": "dog", "<cat>": "cat"}
    # Merging again into that folder, with a token it holds: the token is read before the folder is cleared out
    merge_here(cat / "pytorch_lora_weights.safetensors", "--embeds", tmp_path / "both" / "learned_embeds_1.safetensors",
               "--model", folder, "--out", tmp_path / "both")
    assert load_pipeline(folder, loras=[str(tmp_path / "both")]).tokens == {"<cat>": "cat"}
    with pytest.raises(ModelError, match="holds a training run"):  # its LoRA and token would be replaced
        merge_here(cat, "--model", folder, "--out", trained)
    mine = tmp_path / "mine"  # LoRA files that no merge wrote are not replaced, nor removed
    mine.mkdir()
    shutil.copy(cat / "pytorch_lora_weights.safetensors", mine / "lora_kohya.safetensors")
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(ModelError, match="holds lora_kohya.safetensors, which no merge wrote"):
        merge_here(trained, "--model", folder, "--out", mine)
    assert sorted(os.listdir(mine)) == ["lora_kohya.safetensors", "notes.txt"]
    os.remove(mine / "lora_kohya.safetensors")  # a learned token of the user's own, with no LoRA beside it
    shutil.copy(os.path.join(trained, "learned_embeds.safetensors"), mine)
    with pytest.raises(ModelError, match="holds learned_embeds.safetensors, which no merge wrote"):
        merge_here(trained, "--model", folder, "--out", mine)
    assert sorted(os.listdir(mine)) == ["learned_embeds.safetensors", "notes.txt"]
    adapter = tmp_path / "adapter"  # beside a peft adapter, the merge would be what `--lora adapter` reads
    adapter.mkdir()
    shutil.copy(cat / "pytorch_lora_weights.safetensors", adapter / lora_lib.PEFT_FILE)
    with pytest.raises(ModelError, match="holds adapter_model.safetensors, which no merge wrote"):
        merge_here(trained, "--model", folder, "--out", adapter)
    assert os.listdir(adapter) == [lora_lib.PEFT_FILE]
    with pytest.raises(ModelError, match="holds a training run"):
        merge_here(cat, "--model", folder, "--out", os.path.join(trained, "pytorch_lora_weights.safetensors"))
    # A merge that fails to write its LoRA (a full disk, say) leaves the earlier merge in --out as it was.
    before = {f: (tmp_path / "both" / f).read_bytes() for f in os.listdir(tmp_path / "both")}
    import merge

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(merge, "save_safetensors", full_disk)
    with pytest.raises(OSError, match="No space left"):
        merge_here(trained, cat, "--model", folder, "--kohya", "--out", tmp_path / "both")
    assert {f: (tmp_path / "both" / f).read_bytes() for f in os.listdir(tmp_path / "both")} == before


def test_each_learned_token_is_carried_once(tiny_sdxl, trained, tmp_path):
    folder = tiny_sdxl[0]
    merge_here(trained, trained, "--model", folder, "--out", tmp_path / "twice")  # the same run twice: its token once
    assert sorted(os.listdir(tmp_path / "twice")) == ["learned_embeds.safetensors", "pytorch_lora_weights.safetensors"]
    assert json.loads(read_metadata(str(tmp_path / "twice" / "pytorch_lora_weights.safetensors"))["dco.weights"]) \
        == [1.0, 1.0]  # the weights used, unset given as 1 each
    shutil.copytree(trained, tmp_path / "copy")  # and a copy of it elsewhere: the same bytes, so one token too
    merge_here(trained, tmp_path / "copy", "--model", folder, "--out", tmp_path / "copied")
    assert sorted(os.listdir(tmp_path / "copied")) == ["learned_embeds.safetensors", "pytorch_lora_weights.safetensors"]
    assert load_pipeline(folder, loras=[str(tmp_path / "twice"), trained + ":0.5"]).tokens == {"<dog>": "dog"}
    other = tmp_path / "other"  # another run that learned <dog>, as other vectors: which to keep is the user's call
    other.mkdir()
    shutil.copy(os.path.join(trained, "pytorch_lora_weights.safetensors"), other)
    embeds = load_file(os.path.join(trained, "learned_embeds.safetensors"))
    save_file({k: v + 1 for k, v in embeds.items()}, str(other / "learned_embeds.safetensors"),
              read_metadata(os.path.join(trained, "learned_embeds.safetensors")))
    with pytest.raises(ModelError, match="both learned '<dog>'"):
        merge_here(trained, other, "--model", folder, "--out", tmp_path / "clash")
    assert not os.path.exists(tmp_path / "clash")
    merge_here(trained, other / "pytorch_lora_weights.safetensors", "--model", folder, "--out", tmp_path / "kept")
    assert load_pipeline(folder, loras=[str(tmp_path / "kept")]).tokens == {"<dog>": "dog"}
    with pytest.raises(ModelError, match="a folder, not a file"):
        merge_here(trained, "--embeds", trained, "--model", folder, "--out", tmp_path / "e")
    official = tmp_path / "official.safetensors"  # as the official code writes it: no token named
    save_file({k: v + 2 for k, v in embeds.items()}, str(official))
    with pytest.raises(ModelError, match=f"{official}: the file does not name its token; give it as --embeds"):
        merge_here(trained, "--embeds", official, "--model", folder, "--out", tmp_path / "unnamed")  # sample.py's error
    assert not os.path.exists(tmp_path / "unnamed")
    merge_here(trained, "--embeds", f"{official}:<cat>:cat", "--model", folder, "--out", tmp_path / "named")
    assert load_pipeline(folder, loras=[str(tmp_path / "named")]).tokens == {"<dog>": "dog", "<cat>": "cat"}
    # An official output folder (its token file names no token) with the file named by --embeds: carried once, named
    run_official = tmp_path / "run_official"
    run_official.mkdir()
    shutil.copy(os.path.join(trained, "pytorch_lora_weights.safetensors"), run_official)
    shutil.copy(official, run_official / "learned_embeds.safetensors")
    merge_here(run_official, "--embeds", f"{run_official / 'learned_embeds.safetensors'}:<cat>:cat", "--model", folder,
               "--out", tmp_path / "official_named")
    assert sorted(os.listdir(tmp_path / "official_named")) == ["learned_embeds.safetensors",
                                                               "pytorch_lora_weights.safetensors"]
    assert load_pipeline(folder, loras=[str(tmp_path / "official_named")]).tokens == {"<cat>": "cat"}
    with pytest.raises(ModelError) as e:  # a LoRA file given as learned tokens: a short error, not all its keys
        load_pipeline(folder, embeds=[os.path.join(trained, "pytorch_lora_weights.safetensors") + ":<x>"])
    assert re.search(r"expected keys clip_l and clip_g, found [^,]+, [^,]+, [^,]+ and \d+ more: is it a learned_embeds "
                     r"file\?$", str(e.value))
    # Into one file, the tokens stay behind, and it is said
    with pytest.warns(UserWarning, match="learned tokens are not in the file"):
        merge_here(trained, "--model", folder, "--out", tmp_path / "one.safetensors")


def test_fused_checkpoint_equals_base_plus_lora(tiny_sdxl, trained, tmp_path):
    folder = tiny_sdxl[0]
    run_script("merge.py", trained, "--fuse", "--model", folder, "--dtype", "float32", "--out",
               tmp_path / "f.safetensors")
    x = unet_inputs()
    with torch.no_grad():
        want = load_pipeline(folder, loras=[trained]).unet(*x)
        fused = load_pipeline(str(tmp_path / "f.safetensors"), config=folder)  # the official single-file layout
        torch.testing.assert_close(fused.unet(*x), want, rtol=1e-4, atol=1e-4)
    write_single_file(folder, str(tmp_path / "sdxl.safetensors"))  # the same base as one file: the same result
    merge_here(trained, "--fuse", "--model", tmp_path / "sdxl.safetensors", "--config", folder,
               "--dtype", "float32", "--out", tmp_path / "f2.safetensors")
    a, b = (load_file(str(tmp_path / f)) for f in ("f.safetensors", "f2.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    merge_here(trained, "--fuse", "--model", folder, "--out", tmp_path / "f16.safetensors")
    assert {v.dtype for v in load_file(str(tmp_path / "f16.safetensors")).values()} == {torch.float16}


def test_rank_compression_prints_its_error(tiny_sdxl, trained, tmp_path, capsys):
    merge_here(trained, trained, "--model", tiny_sdxl[0], "--rank", 2, "--out", tmp_path / "m.safetensors")
    out = capsys.readouterr().out
    err = float(out.split("relative error of the summed delta ")[1].split()[0])
    assert 0 < err < 1 and out.endswith(", rank 2\n")
    merge_here(trained, "--model", tiny_sdxl[0], "--rank", 64, "--out", tmp_path / "m64.safetensors")
    assert capsys.readouterr().out.endswith(", rank 4\n")  # never more than the LoRA has
    style = random_lora_file(tiny_sdxl[0], str(tmp_path / "style.safetensors"), seed=1)  # rank 2 on to_q and to_v
    merge_here(trained, style, "--model", tiny_sdxl[0], "--out", tmp_path / "mixed.safetensors")
    assert capsys.readouterr().out.endswith(", rank 6\n")  # as written: every module at the largest rank, 4 + 2
    written = load_file(str(tmp_path / "m.safetensors"))
    assert {v.shape[0] for k, v in written.items() if k.endswith("lora.down.weight")} == {2}
    # The error printed is the written file's: its deltas against twice the run's, over all layers together
    cfg = load_unet(tiny_sdxl[0]).cfg
    run, m = (lora_lib.read_lora(p, cfg) for p in (trained, str(tmp_path / "m.safetensors")))
    diff2 = sum((2 * up @ down - m[k][1] @ m[k][0]).pow(2).sum() for k, (down, up) in run.items())
    total2 = sum((2 * up @ down).pow(2).sum() for down, up in run.values())
    assert err == pytest.approx((diff2 / total2).sqrt().item(), rel=1e-3)


def test_merge_refuses_to_fuse_into_a_folder_or_read_a_missing_input(tmp_path, capsys):
    import merge
    with pytest.raises(SystemExit):
        merge.parse_args(["a.safetensors", "--fuse", "--model", "m", "--out", str(tmp_path / "fused")])
    assert "--out NAME.safetensors" in capsys.readouterr().err
    assert merge.parse_args(["a.safetensors", "--fuse", "--model", "m", "--out", "F.SAFETENSORS"]).to_file
    with pytest.raises(SystemExit):
        merge.parse_args(["a.safetensors", "--fuse", "--kohya", "--model", "m", "--out", "f.safetensors"])
    assert "--fuse writes a whole model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        merge.parse_args(["a.safetensors", "b.safetensors", "--weights", "1", "nan", "--out", "m.safetensors"])
    assert "expected a number, got 'nan'" in capsys.readouterr().err
    for bad, needle in ((["--rank", "0"], "expected a positive whole number"),  # refused before any file is read
                        (["--embeds", "e.safetensors"], "--embeds needs a folder as --out"),
                        (["b.safetensors", "--weights", "1"], "--weights needs one number per LoRA (2)"),
                        (["--fuse"], "--fuse needs --model")):
        with pytest.raises(SystemExit):
            merge.parse_args(["a.safetensors", *bad, "--out", "m.safetensors"])
        assert needle in capsys.readouterr().err
    assert merge.parse_args(["a.safetensors", "--fuse", "--model", "m", "--embeds", "e.safetensors", "--out",
                             "f.safetensors"]).fuse  # the tokens are named on the side, as --fuse's files have none
    (tmp_path / "notes").write_text("")
    with pytest.raises(SystemExit):  # not "[Errno 17] File exists" once the LoRAs are read
        merge.parse_args(["a.safetensors", "--out", str(tmp_path / "notes")])
    assert "is a file; a merge is written to a folder, or to a .safetensors file" in capsys.readouterr().err
    with pytest.raises(ModelError, match="nowhere.safetensors: no such LoRA file or folder$"):
        merge.main(merge.parse_args([str(tmp_path / "nowhere.safetensors"), "--out", str(tmp_path / "m.safetensors")]))
    # A file that cannot be written is a one-line error too: here a file stands where --out's folder would be.
    name = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"  # a layer of SDXL base, 640 x 640
    save_file({f"{name}.lora_down.weight": torch.zeros(2, 640), f"{name}.lora_up.weight": torch.zeros(640, 2)},
              str(tmp_path / "l.safetensors"))
    (tmp_path / "taken").write_text("")
    r = run_script("merge.py", tmp_path / "l.safetensors", "--out", tmp_path / "taken" / "m.safetensors", check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr and r.stderr.startswith("error: [Errno"), r.stderr

    def full_disk():  # a file-size limit stands for a full disk: safetensors fails to write, with its own error type
        import resource
        import signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "merge.py"), str(tmp_path / "l.safetensors"), "--out",
                        str(tmp_path / "full" / "m.safetensors")], capture_output=True, text=True, preexec_fn=full_disk)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("error: ") and "m.safetensors: could not be written" in r.stderr, r.stderr
    assert os.listdir(tmp_path / "full") == []  # no partial file


def test_foreign_lora_is_refused_in_one_line(tiny_sdxl, tmp_path):
    bad = str(tmp_path / "bad.safetensors")
    module = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    save_file({f"{module}.lora.down.weight": torch.zeros(2, 320), f"{module}.lora.up.weight": torch.zeros(640, 2)}, bad)
    r = run_script("sample.py", "--model", tiny_sdxl[0], "--lora", bad, "--prompt", "x", check=False)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode != 0 and last.startswith("error:")
    assert "input_blocks.4.1.transformer_blocks.0.attn1.to_q" in last
