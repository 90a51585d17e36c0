"""The toy world: its metrics read the renderer's ground truth back, and its pretraining makes a real SDXL folder."""
import csv
import json
import os
import re
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import toy
import toyworld
import checkpoint
from checkpoint import load_unet, load_vae
from text import TextEncoders

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = toy.Budget(images=16, vae_steps=4, vae_batch=2, unet_steps=6, unet_batch=2)


def test_every_world_word_is_one_token(tmp_path):
    tok = toy.write_tokenizer(str(tmp_path / "tokenizer"), "<|endoftext|>")
    tok2 = toy.write_tokenizer(str(tmp_path / "tokenizer_2"), "!")
    vocab = tok.get_vocab()
    for word in toyworld.WORDS:
        assert tok(word, add_special_tokens=False).input_ids == [vocab[word + "</w>"]], word
    assert tok.eos_token_id == max(vocab.values())  # CLIP pools the end token by taking the largest id
    pieces = tok.convert_ids_to_tokens(tok("a big <sub0> star", add_special_tokens=False).input_ids)
    assert pieces[:2] == ["a</w>", "big</w>"] and pieces[-1] == "star</w>" and len(pieces) > 4  # unknown: characters
    padded = tok2("a star", padding="max_length", max_length=77).input_ids
    assert tok2.convert_ids_to_tokens(padded[-1]) == "!" and len(padded) == 77


def rendered(n, seed, styles):
    rng = np.random.default_rng(seed)
    scenes = [toyworld.random_scene(rng, styles) for _ in range(n)]
    return scenes, [toyworld.render(s, rng) for s in scenes]


def test_attribute_checks_agree_with_the_renderer():
    scenes, images = rendered(150, 1, toyworld.STYLES[:1] * 2 + toyworld.STYLES[1:] + tuple(toyworld.HELD_OUT_STYLES))
    agree, total = {}, {}
    for scene, image in zip(scenes, images):
        read = toyworld.analyze(image)
        agree["background"] = agree.get("background", 0) + (read["background"] == scene.background)
        agree["count"] = agree.get("count", 0) + (len(read["objects"]) == len(scene.objects))
        for style, score in read["style_scores"].items():
            agree["style"] = agree.get("style", 0) + ((score > 0.5) == (scene.style == style)) / 4
        for obj in scene.objects:
            found = [o for o in read["objects"] if o["position"] == obj.position]
            for a in toyworld.identity(obj) + ("size", "position"):
                agree[a] = agree.get(a, 0) + bool(found and found[0][a] == getattr(obj, a))
                total[a] = total.get(a, 0) + 1
    rates = {a: agree[a] / total.get(a, len(scenes)) for a in agree}
    assert min(rates.values()) >= 0.99, rates  # all 1.0 for these scenes (numpy 2, Pillow 12)


def test_prompt_fidelity_is_high_on_ground_truth_and_low_on_other_images():
    scenes, images = rendered(60, 2, toyworld.STYLES)
    own = np.mean([toyworld.prompt_fidelity(im, s) for im, s in zip(images, scenes)])
    other = np.mean([toyworld.prompt_fidelity(im, s) for im, s in zip(images[1:] + images[:1], scenes)])
    assert own >= 0.97 and other <= 0.5, (own, other)
    # One attribute wrong costs exactly its share: a red circle asked for as a blue one.
    scene = toyworld.Scene((toyworld.Obj("circle", "red", size="big", position="left"),), "sand")
    image = toyworld.render(scene, np.random.default_rng(0))
    asked_blue = toyworld.Scene((replace(scene.objects[0], color="blue"),), "sand")
    assert toyworld.prompt_fidelity(image, scene) == 1.0
    # asked: background, and shape, color, pattern, size, position; one of six is wrong
    assert toyworld.prompt_fidelity(image, asked_blue) == pytest.approx(1 - 1 / 6)
    assert toyworld.prompt_fidelity(image, replace(scene, background="night")) == pytest.approx(1 - 1 / 6)
    for style in toyworld.STYLES[1:]:  # a style asked for and not there: one of seven
        assert toyworld.prompt_fidelity(image, replace(scene, style=style)) == pytest.approx(1 - 1 / 7), style
    # A subject's prompt states only its size and place in words: a big one asked for small misses one of three.
    subject = toyworld.Scene((replace(toyworld.SUBJECTS[0], size="big", position="center"),), "sand")
    image = toyworld.render(subject, np.random.default_rng(0))
    asked_small = toyworld.Scene((replace(subject.objects[0], size="small"),), "sand")
    assert toyworld.prompt_fidelity(image, subject) == 1.0
    assert toyworld.prompt_fidelity(image, asked_small) == pytest.approx(1 - 1 / 3)
    # An object of a color outside the world's palette has no color: asked for as white, it misses the color.
    cyan = toyworld.Scene((toyworld.Obj("circle", "cyan", size="big", position="left"),), "sky")
    with pytest.MonkeyPatch.context() as m:
        m.setitem(toyworld.COLORS, "cyan", (0, 220, 220))
        drawn = toyworld.render(cyan, np.random.default_rng(0))
    asked_white = toyworld.Scene((replace(cyan.objects[0], color="white"),), "sky")
    assert toyworld.prompt_fidelity(drawn, asked_white) == pytest.approx(1 - 1 / 6)
    # The metrics average over images: the subject drawn in one of two images is half there.
    empty = toyworld.render(toyworld.Scene((), "sand"), np.random.default_rng(0))
    assert toyworld.toy_metrics([image, empty], subject)["subject"] == 0.5


def test_subject_scores_high_and_other_objects_low():
    rng = np.random.default_rng(3)
    for subject in toyworld.SUBJECTS:
        index = toyworld.SUBJECTS.index(subject)
        own = [toyworld.subject_fidelity(toyworld.render(s, rng), subject) for s in toyworld.subject_scenes(index, 5)]
        assert min(own) == 1.0, own
        others = [toyworld.subject_fidelity(toyworld.render(s, rng), subject) for s in rendered(40, 4, ("none",))[0]]
        assert np.mean(others) <= 0.4, np.mean(others)
        plain = toyworld.Scene((replace(subject, pattern="plain", token=""),), "night")
        # shape and color, not the pattern
        assert toyworld.subject_fidelity(toyworld.render(plain, rng), subject) == 0.5
        in_style = toyworld.eval_scenes(subject, style="vignette", n=1)[0]
        assert toyworld.subject_fidelity(toyworld.render(in_style, rng), subject) == 1.0
    assert toyworld.subject_fidelity(toyworld.render(toyworld.Scene((), "sky"), rng), toyworld.SUBJECTS[0]) == 0.0


def test_style_fidelity_separates_held_out_styles():
    for style in toyworld.HELD_OUT_STYLES:
        scenes = toyworld.eval_scenes(style=style, n=8)
        rng = np.random.default_rng(5)
        styled = [toyworld.style_fidelity(toyworld.render(s, rng), style) for s in scenes]
        plain = [toyworld.style_fidelity(toyworld.render(replace(s, style="none"), rng), style) for s in scenes]
        assert min(styled) >= 0.8 and max(plain) <= 0.1, (style, styled, plain)
    black = Image.new("RGB", (toyworld.SIZE, toyworld.SIZE))  # what a sample gone NaN decodes to: no style at all
    assert all(toyworld.style_fidelity(black, style) == 0.0 for style in toyworld.HELD_OUT_STYLES)


def test_held_out_subjects_and_styles_never_appear_in_pretraining():
    _, captions = toy.render_dataset(200, 0)
    rng = np.random.default_rng(6)
    scenes = [toyworld.random_scene(rng) for _ in range(500)]
    assert len({repr(s) for s in scenes}) > 400  # 500 draws, not one scene 500 times
    looks = {(s.shape, s.color, s.pattern) for s in toyworld.SUBJECTS}  # a subject in any pattern color is the subject
    assert not any((o.shape, o.color, o.pattern) in looks for s in scenes for o in s.objects)
    assert all(toyworld.is_held_out(replace(s, pattern_color="red", token="")) for s in toyworld.SUBJECTS)
    assert not any("<" in c for c in captions) and {s.style for s in scenes} <= set(toyworld.STYLES)
    merged_scenes = toyworld.eval_scenes(toyworld.SUBJECTS[0], "frame", 2)
    metrics = toyworld.toy_metrics([toyworld.render(s, np.random.default_rng(0)) for s in merged_scenes],
                                   merged_scenes[0])
    assert set(metrics) == {"prompt", "subject", "style"} and all(0 <= v <= 1 for v in metrics.values())


def test_the_pretraining_images_show_their_captions():
    images, captions = toy.render_dataset(40, 3)
    alone = [(im, c) for im, c in zip(images, captions) if " and " not in c]
    for image, text in alone:  # (3, 64, 64) as the UNet takes it: its object where the caption says
        read = toyworld.analyze(Image.fromarray(image.permute(1, 2, 0).numpy()))
        where = read["objects"][0]["position"]
        assert ("in the center" if where == "center" else f"at the {where}") in text, text
    assert len(alone) > 10
    _, styled = toy.render_dataset(8, 3, tuple(toyworld.HELD_OUT_STYLES))  # the autoencoder sees held-out styles
    assert all(c.endswith(("in <sty0>", "in <sty1>")) for c in styled)


def test_captions_name_every_attribute_as_the_readme_shows():
    Obj = toyworld.Obj
    scene = toyworld.Scene((Obj("circle", "red", "stripes", "white", "small", "left"),
                            Obj("star", "blue", size="big", position="right")), "sand", "outline")
    assert toyworld.caption(scene) == ("a small red circle with white stripes at the left and a big blue star at the "
                                       "right on a sand background, in outline style")
    subject = replace(toyworld.SUBJECTS[0], size="big", position="center")
    assert toyworld.caption(toyworld.Scene((subject,), "night", "frame")) == (
        "a big <sub0> in the center on a night background, in <sty0>")


def test_training_and_evaluation_scenes_vary_as_documented():
    rng = np.random.default_rng(6)
    scenes = [toyworld.random_scene(rng) for _ in range(500)]
    pairs = [s.objects for s in scenes if len(s.objects) == 2]
    assert pairs and all(a.color != b.color for a, b in pairs)  # two objects are two colors
    # Only a subject's exact looks are held out: its shape and color still appear in other patterns.
    for subject in toyworld.SUBJECTS:
        assert any((o.shape, o.color) == (subject.shape, subject.color) for s in scenes for o in s.objects)
    # Each subject and each held-out style gets scenes of its own, not the same draw.
    places = [[(s.objects[0].position, s.background) for s in toyworld.subject_scenes(i)] for i in range(3)]
    assert len({tuple(p) for p in places}) == 3
    assert len({repr(toyworld.style_scenes(name)[0].objects) for name in toyworld.HELD_OUT_STYLES}) == 2
    evals = toyworld.eval_scenes(toyworld.SUBJECTS[0], n=20)
    assert {s.objects[0].position for s in evals[:9]} == set(toyworld.POSITIONS)  # every place once n is 9
    assert all(s.objects[1].color != s.objects[0].color for s in toyworld.eval_scenes(toyworld.SUBJECTS[0], n=200)
               if len(s.objects) == 2)
    alone = [(s.objects[0].position, s.background) for s in evals if len(s.objects) == 1]
    assert len(set(alone)) > len(toyworld.POSITIONS)  # a place is not tied to one background


def test_data_command_writes_a_training_folder(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "toy.py"), "data", "--subject", "0", "--out",
                        str(tmp_path / "sub0")], capture_output=True, text=True, check=True)
    assert "<sub0>" in r.stdout and "'star'" in r.stdout
    names = sorted(os.listdir(tmp_path / "sub0"))
    assert names == ["00.png", "00.txt", "01.png", "01.txt", "02.png", "02.txt", "03.png", "03.txt"]
    assert all(re.match(r"a (big|small) <sub0> (at|in) ", (tmp_path / "sub0" / n).read_text())
               for n in names if n.endswith(".txt"))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "toy.py"), "data", "--style", "9", "--out",
                        str(tmp_path / "x")], capture_output=True, text=True)
    assert r.returncode != 0 and r.stderr.strip().startswith("error:") and "Traceback" not in r.stderr
    toy.main(toy.parse_args(["data", "--subject", "0", "--out", str(tmp_path / "sub0")]))  # the same again: fine
    assert sorted(os.listdir(tmp_path / "sub0")) == names
    with pytest.raises(SystemExit, match="holds other files .02.png, 02.txt, 03.png, ...., which train.py would"):
        toy.main(toy.parse_args(["data", "--subject", "1", "--n", "2", "--out", str(tmp_path / "sub0")]))
    with pytest.raises(SystemExit, match="00.png is a file"):
        toy.main(toy.parse_args(["data", "--subject", "1", "--out", str(tmp_path / "sub0" / "00.png")]))
    for flag, bad in (("--subject", "3"), ("--style", "2")):  # one past the last
        with pytest.raises(SystemExit, match=f"^error: {flag} must be in 0.."):
            toy.main(toy.parse_args(["data", flag, bad, "--out", str(tmp_path / "x")]))
    toy.main(toy.parse_args(["data", "--style", "1", "--out", str(tmp_path / "sty1")]))
    assert (tmp_path / "sty1" / "00.txt").read_text().strip().endswith("in <sty1>")
    for flag, n in (("--subject", "0"), ("--style", "1")):  # another seed, other scenes (places, backgrounds)
        toy.main(toy.parse_args(["data", flag, n, "--seed", "1", "--out", str(tmp_path / f"seed1{flag}")]))
        seed0 = tmp_path / ("sub0" if flag == "--subject" else "sty1")
        captions = [sorted(p.read_text() for p in folder.glob("*.txt"))
                    for folder in (seed0, tmp_path / f"seed1{flag}")]
        assert captions[0] != captions[1], flag
    assert sorted(os.listdir(tmp_path / "sub0")) == names and "<sub0>" in (tmp_path / "sub0" / "00.txt").read_text()


def test_bad_numbers_are_refused_before_any_work(capsys):
    for argv, needle in [(["compare", "--beta", "-5"], "expected a number >= 0"),  # not after the DreamBooth runs
                         (["data", "--subject", "0", "--n", "0", "--out", "x"], "expected a positive whole number"),
                         (["--seed", str(2 ** 64 - 1)], "--seed must be below 2^63 for pretraining")]:
        with pytest.raises(SystemExit):
            toy.parse_args(argv)
        assert needle in capsys.readouterr().err
    assert toy.parse_args(["--seed", str(2 ** 63 - 1)]).seed == 2 ** 63 - 1  # its phases' seeds still fit
    assert toy.parse_args(["data", "--subject", "0", "--seed", str(2 ** 64 - 1), "--out", "x"]).seed == 2 ** 64 - 1


@pytest.fixture(scope="module")
def quick_model(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("toy") / "toy-sdxl")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "toy.py"), "--quick", "--out", folder],
                       capture_output=True, text=True, check=True)
    return folder, r.stdout


def test_quick_pretraining_makes_an_sdxl_folder(quick_model):
    folder, stdout = quick_model
    assert "prompt fidelity of base samples" in stdout
    assert not os.path.exists(os.path.join(folder, "pretrain_state.safetensors"))
    unet, vae, text = load_unet(folder), load_vae(folder), TextEncoders(folder)
    context, pooled = text.encode(["a big red star at the left on a sand background", ""], zero_empty=True)
    assert context.shape == (2, 77, unet.cfg.context_dim) and pooled.shape == (2, unet.cfg.pooled_dim)
    assert context[1].abs().max() == 0
    scheduler = json.load(open(os.path.join(folder, "scheduler", "scheduler_config.json")))
    assert (scheduler["beta_schedule"], scheduler["timestep_spacing"], scheduler["steps_offset"]) == \
        ("scaled_linear", "leading", 1)
    assert 0.05 < vae.cfg.scaling_factor < 5
    images = toy.render_dataset(toy.QUICK.images, 0)[0][:256]  # what the factor was measured on: unit variance
    with torch.no_grad():
        mean, _ = vae.encode(images.float() / 127.5 - 1)
    assert (mean * vae.cfg.scaling_factor).std().item() == pytest.approx(1.0, abs=1e-3)
    from transformers import CLIPTokenizer
    assert [CLIPTokenizer.from_pretrained(os.path.join(folder, sub)).pad_token
            for sub in ("tokenizer", "tokenizer_2")] == ["<|endoftext|>", "!"]  # as SDXL's two tokenizers pad
    with pytest.raises(SystemExit, match="pretrained otherwise"):  # not taken for the full model
        toy.pretrain(folder, 0, toy.FULL)
    with pytest.raises(SystemExit, match="holds the --quick toy model"):  # nor compared as if it were
        toy.main(toy.parse_args(["compare", "--model", folder, "--out", os.path.dirname(folder) + "/cmp"]))
    assert not os.path.exists(os.path.dirname(folder) + "/cmp")


def test_quick_model_loads_in_diffusers_and_agrees(quick_model):
    from diffusers import StableDiffusionXLPipeline

    folder = quick_model[0]
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    unet = load_unet(folder)
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 32, 32, generator=g), torch.randn(2, 77, unet.cfg.context_dim, generator=g)
    pooled, ids = torch.randn(2, unet.cfg.pooled_dim, generator=g), torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)
    with torch.no_grad():
        ours = unet(x, torch.tensor([500.0, 20.0]), ctx, pooled, ids)
        ref = pipe.unet(x, torch.tensor([500.0, 20.0]), ctx, added_cond_kwargs={"text_embeds": pooled,
                                                                                "time_ids": ids}).sample
    assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()
    image = pipe("a big red star at the left on a sand background", num_inference_steps=2, width=64, height=64,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)


def weights(folder):
    return {f"{sub}/{k}": v for sub, name in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                                              ("text_encoder", "model"), ("text_encoder_2", "model"))
            for k, v in load_file(os.path.join(folder, sub, name + ".safetensors")).items()}


def test_pretraining_is_deterministic_and_resumes_exactly(tmp_path, monkeypatch):
    a, b, c = (str(tmp_path / n) for n in "abc")
    toy.pretrain(a, seed=0, budget=TINY)
    toy.pretrain(b, seed=0, budget=TINY)
    first, second = weights(a), weights(b)
    assert all(torch.equal(first[k], second[k]) for k in first)

    monkeypatch.setattr(toy, "SAVE_EVERY_S", 0)  # save the state after every step
    calls = {"vae_loss": 0, "unet_loss": 0}  # steps taken by each phase since the last (re)start

    def counted(name, stop_after=None):
        real = getattr(toy, name)

        def loss(*args):
            calls[name] += 1
            if stop_after is not None and calls[name] > stop_after:
                raise KeyboardInterrupt
            return real(*args)
        monkeypatch.setattr(toy, name, loss)
        return real

    real_vae = counted("vae_loss", stop_after=2)  # interrupted in the autoencoder's phase, after 2 steps
    with pytest.raises(KeyboardInterrupt):
        toy.pretrain(c, seed=0, budget=TINY)
    assert not os.path.exists(os.path.join(c, "vae", "config.json"))
    monkeypatch.setattr(toy, "vae_loss", real_vae)
    calls["vae_loss"] = 0
    counted("vae_loss")
    real_unet = counted("unet_loss", stop_after=3)  # then in the UNet's, after 3
    with pytest.raises(KeyboardInterrupt):
        toy.pretrain(c, seed=0, budget=TINY)
    assert calls["vae_loss"] == TINY.vae_steps - 2  # the autoencoder continued from its step 2
    assert not os.path.exists(os.path.join(c, "unet"))
    monkeypatch.setattr(toy, "unet_loss", real_unet)
    with pytest.raises(SystemExit, match="pretrained otherwise"):  # the interrupted run is seed 0's
        toy.pretrain(c, seed=1, budget=TINY)
    calls["unet_loss"] = 0
    counted("unet_loss")
    toy.pretrain(c, seed=0, budget=TINY)
    assert calls["unet_loss"] == TINY.unet_steps - 3  # the UNet continued from its step 3
    resumed = weights(c)
    assert all(torch.equal(first[k], resumed[k]) for k in first)
    toy.pretrain(str(tmp_path / "d"), seed=1, budget=TINY)
    other = weights(str(tmp_path / "d"))
    assert not torch.equal(first["unet/conv_in.weight"], other["unet/conv_in.weight"])
    # A disk full while the trained text encoders are written: the rerun finishes the same model
    e, real_save = str(tmp_path / "e"), checkpoint.save_safetensors

    def full_disk(tensors, path, metadata=None):
        trained = os.path.isdir(os.path.join(e, "unet"))  # the UNet is written just before the text encoders
        if trained and path.endswith(os.path.join("text_encoder_2", "model.safetensors")):
            raise OSError(28, "No space left on device")
        return real_save(tensors, path, metadata)
    monkeypatch.setattr(checkpoint, "save_safetensors", full_disk)
    with pytest.raises(OSError, match="No space left"):
        toy.pretrain(e, seed=0, budget=TINY)
    monkeypatch.setattr(checkpoint, "save_safetensors", real_save)
    toy.pretrain(e, seed=0, budget=TINY)
    finished = weights(e)
    assert all(torch.equal(first[k], finished[k]) for k in first)


def test_compare_quick_runs_the_experiments_end_to_end(quick_model, tmp_path):
    out = tmp_path / "compare"
    command = [sys.executable, os.path.join(ROOT, "toy.py"), "compare", "--quick", "--model", quick_model[0],
               "--out", str(out)]
    r = subprocess.run(command, capture_output=True, text=True, check=True)
    text = (out / "results.md").read_text()
    assert text in r.stdout and all(f"### {t}" in text for t in ("Subjects", "Styles", "Merges"))
    tables = {name: list(csv.DictReader(open(out / f"{name}.csv"))) for name in ("subjects", "styles", "merges")}
    plan = toy.QUICK_COMPARE
    assert [(row["method"], row["w_con"]) for row in tables["subjects"]] == \
        [(m, "cfg" if w is None else f"{w:g}") for m in toy.METHODS for w in plan.w_cons]
    assert {row["method"] for row in tables["merges"]} == {"DreamBooth", "DCO"}
    assert all(0 <= float(row[f"{k}_mean"]) <= 1 for row in tables["merges"] for k in ("prompt", "subject", "style"))
    for name in ("subjects", "styles", "merges"):
        assert (out / f"pareto_{name}.png").stat().st_size > 1000

    # The runs are train.py's: the DCO and DreamBooth LoRAs differ, prior preservation made its class images.
    dco, db = (load_file(str(out / "runs" / f"sub0-{m}" / "pytorch_lora_weights.safetensors"))
               for m in ("DCO", "DreamBooth"))
    assert dco.keys() == db.keys() and any(not torch.equal(dco[k], db[k]) for k in dco)
    assert len([f for f in os.listdir(out / "prior" / "sub0") if f.endswith(".png")]) == plan.num_prior

    # Each table entry is the mean of the toy metrics of its cached images, scored against the prompt's scene.
    index = json.load(open(out / "images" / "index.json"))
    scenes = {toyworld.caption(s): s for s in toyworld.eval_scenes(toyworld.SUBJECTS[0], n=plan.prompts)}
    for row in tables["subjects"]:
        w = None if row["w_con"] == "cfg" else float(row["w_con"])
        entries = [e for e in index.values() if e["method"] == row["method"] and e["w_con"] == w
                   and e["prompt"] in scenes]
        assert len(entries) == int(row["n"]) == plan.prompts * plan.seeds
        images = [Image.open(out / "images" / e["file"]).convert("RGB") for e in entries]
        for key in ("subject", "prompt"):
            expected = np.mean([toyworld.toy_metrics([im], scenes[e["prompt"]])[key] for im, e in zip(images, entries)])
            assert float(row[f"{key}_mean"]) == pytest.approx(expected)

    # The merge rows sample each method's subject LoRA and style LoRA together.
    merged = {toyworld.caption(s): (i, style) for i, style in plan.merges
              for s in toyworld.eval_scenes(toyworld.SUBJECTS[i], style=style, n=plan.prompts)}
    entries = [e for e in index.values() if e["prompt"] in merged]
    assert {e["method"] for e in entries} == {"DreamBooth", "DCO"}
    for e in entries:
        i, style = merged[e["prompt"]]
        assert [os.path.basename(p) for p in e["loras"]] == [f"sub{i}-{e['method']}", f"{style}-{e['method']}"]

    # A run recorded before train.py had some of its resumable options (here --cuda-graph) is still this run.
    settings = out / "runs" / "sub0-DCO" / "settings.json"
    settings.write_text(json.dumps({k: v for k, v in json.loads(settings.read_text()).items() if k != "cuda_graph"}))
    again = subprocess.run(command, capture_output=True, text=True, check=True)  # nothing left to train or draw
    assert "fine-tuning" not in again.stdout and "generating" not in again.stderr
    assert (out / "results.md").read_text() == text
    other_beta = subprocess.run(command + ["--beta", "100"], capture_output=True, text=True)
    assert other_beta.returncode != 0 and "another --out" in other_beta.stderr and "Traceback" not in other_beta.stderr


def test_fine_tune_runs_each_method_as_its_recipe_says(tmp_path, monkeypatch):
    """compare's train.py runs: DreamBooth at beta 0, with class images of the class prompt for its prior variant,
    DCO at the given beta; a run cut short is resumed, a finished one reused."""
    runs = []
    monkeypatch.setattr(toy.train, "main", runs.append)
    subject, style = toy.training_sets(toy.QUICK_COMPARE)
    assert "<" not in subject[4] and subject[3] in subject[4].split()  # the token's initializer word in its place
    assert "<" not in style[4] and not style[4].endswith("style")  # the style's scene without the style
    for method in toy.METHODS:
        toy.fine_tune("model", str(tmp_path), subject, method, toy.QUICK_COMPARE, 500.0)
    assert [(a.beta, a.prior_dir is not None, a.prior_prompt, a.resume) for a in runs] == [
        (0.0, False, None, False), (0.0, True, subject[4], False), (500.0, False, None, False)]
    run = toy.fine_tune("model", str(tmp_path), subject, "DCO", toy.QUICK_COMPARE, 500.0)
    os.makedirs(run)
    with open(os.path.join(run, "settings.json"), "w") as f:
        f.write("{}")
    monkeypatch.setattr(toy.train, "check_resume", lambda args, items: 3)  # cut short at step 3
    toy.fine_tune("model", str(tmp_path), subject, "DCO", toy.QUICK_COMPARE, 500.0)
    assert runs[-1].resume
    monkeypatch.setattr(toy.train, "check_resume", lambda args, items: toy.QUICK_COMPARE.steps)  # finished
    toy.fine_tune("model", str(tmp_path), subject, "DCO", toy.QUICK_COMPARE, 500.0)
    assert len(runs) == 5


def test_an_interrupted_fine_tune_says_to_rerun_compare(tmp_path, monkeypatch):
    """train.py's Ctrl-C message says to continue with --resume, which compare does not take: a rerun resumes."""
    def interrupted(args):
        sys.exit(f"interrupted: saved step 3 in {args.out}; continue with --resume")
    monkeypatch.setattr(toy.train, "main", interrupted)
    target = toy.training_sets(toy.QUICK_COMPARE)[0]
    with pytest.raises(SystemExit, match=r"^interrupted: .* is saved; rerun this command to continue$"):
        toy.fine_tune("model", str(tmp_path), target, "DCO", toy.QUICK_COMPARE, 1000.0)
    monkeypatch.setattr(toy.train, "main", lambda args: sys.exit("error: something else"))
    with pytest.raises(SystemExit, match="^error: something else$"):  # other exits pass through as they are
        toy.fine_tune("model", str(tmp_path), target, "DCO", toy.QUICK_COMPARE, 1000.0)
