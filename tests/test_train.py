"""train.py as a user runs it, on the tiny random SDXL: outputs, interchange, resume, bad data."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode

import lora as lora_lib
import train
from checkpoint import ModelError
from conftest import ROOT, TRAIN_ARGS, run_script, write_images
from data import encode_images, load_rgb, prepare_image, read_captions, read_config
from dco import eps_mse, q_sample
from sample import load_pipeline
from text import Cond, TextEncoders, time_ids
from train import TokenEmbeddings
from unet_sdxl import UNet


@torch.no_grad()
def dco_margin(folder, out, data):
    """Mean of ||eps - eps_theta||^2 - ||eps - eps_phi||^2 over fixed draws on the training images: negative means
    the DCO loss is below its starting value ln 2."""
    pipe = load_pipeline(folder, loras=[out])
    items = read_captions(data, None)
    mean, _ = encode_images(pipe.vae, items, 32, "cpu")
    ids = time_ids((32, 32), (0, 0), (32, 32)).expand(len(items), 6)
    cond = Cond(*pipe.text.encode([c for _, c in items]), ids)
    base = Cond(*pipe.text.encode([c.replace("<dog>", "dog") for _, c in items]), ids)
    g, margins = torch.Generator().manual_seed(123), []
    for _ in range(16):
        t, noise = torch.randint(0, 1000, (len(items),), generator=g), torch.randn(mean.shape, generator=g)
        x_t = q_sample(mean, t, noise)
        err_theta = eps_mse(pipe.unet(x_t, t, cond.context, cond.pooled, cond.time_ids), noise)
        with lora_lib.lora_scale(pipe.unet, 0.0):
            err_phi = eps_mse(pipe.unet(x_t, t, base.context, base.pooled, base.time_ids), noise)
        margins.append((err_theta - err_phi).mean().item())
    return float(np.mean(margins))


def test_training_lowers_the_dco_loss(tiny_sdxl, trained):
    out = trained
    for f in ("pytorch_lora_weights.safetensors", "lora_kohya.safetensors", "learned_embeds.safetensors",
              "settings.json", "checkpoint.safetensors"):
        assert os.path.isfile(os.path.join(out, f)), f
    settings = json.load(open(os.path.join(out, "settings.json")))
    assert settings["beta"] == 1000.0 and settings["step"] == settings["steps"]
    for name in ("pytorch_lora_weights.safetensors", "lora_kohya.safetensors", "learned_embeds.safetensors"):
        with safe_open(os.path.join(out, name), "pt") as f:
            assert f.metadata()["format"] == "pt"  # as diffusers marks its files
            if "lora" in name:
                assert json.loads(f.metadata()["dco.settings"])["token"] == "<dog>"
    assert dco_margin(tiny_sdxl[0], out, os.path.join(os.path.dirname(out), "data")) < 0


def diffusers_image(folder, out, prompt, weight_name=None):
    from diffusers import StableDiffusionXLPipeline
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    if out:
        pipe.load_lora_weights(out, weight_name=weight_name)
        emb = load_file(os.path.join(out, "learned_embeds.safetensors"))
        pipe.load_textual_inversion(emb["clip_l"], token="<dog>", text_encoder=pipe.text_encoder,
                                    tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(emb["clip_g"], token="<dog>", text_encoder=pipe.text_encoder_2,
                                    tokenizer=pipe.tokenizer_2)
    image = pipe(prompt, num_inference_steps=8, width=64, height=64, guidance_scale=5.0,
                 generator=torch.Generator("cpu").manual_seed(3)).images[0]
    return np.asarray(image, dtype=int)


def test_outputs_load_in_diffusers_and_agree_with_sample_py(tiny_sdxl, trained, tmp_path):
    folder, prompt = tiny_sdxl[0], "a photo of a <dog> on the beach"
    png = str(tmp_path / "ours.png")
    run_script("sample.py", "--model", folder, "--lora", trained, "--prompt", prompt, "--steps", 8, "--width", 64,
               "--height", 64, "--seed", 3, "--out", png, "--quiet")
    ours = np.asarray(Image.open(png), dtype=int)
    base = diffusers_image(folder, None, "a photo of a dog on the beach")
    assert np.abs(ours - base).max() > 20  # LoRA and token change the image, so the comparisons below mean something
    for weight_name in (None, "lora_kohya.safetensors"):
        ref = diffusers_image(folder, trained, prompt, weight_name)
        assert np.abs(ours - ref).max() <= 2, weight_name


def test_resume_is_bit_exact(tiny_sdxl, trained, tmp_path):
    folder, data = tiny_sdxl[0], os.path.join(os.path.dirname(trained), "data")
    common = ("--model", folder, "--data", data, "--token", "<dog>", "--init-token", "dog", *TRAIN_ARGS)
    run_script("train.py", *common, "--steps", 3, "--out", tmp_path / "r")
    with open(tmp_path / "r" / "log.jsonl", "a") as f:  # a step logged after the last save, and one cut short by
        f.write(json.dumps({"step": 3, "loss": 9.0, "err_theta": 9.0, "err_phi": 9.0}) + "\n")  # the crash
        f.write('\n{}\n[1]\n{"step": "2"}\n')  # and lines that are no step's record: dropped, not a traceback
        f.write('{"step": 4, "loss": 0.6')
    run_script("train.py", *common, "--steps", 8, "--out", tmp_path / "r", "--resume")
    for f in ("pytorch_lora_weights.safetensors", "learned_embeds.safetensors"):
        a, b = load_file(os.path.join(trained, f)), load_file(str(tmp_path / "r" / f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    logs = [[json.loads(line) for line in open(os.path.join(out, "log.jsonl"))] for out in (trained, tmp_path / "r")]
    assert logs[0] == logs[1] and [r["step"] for r in logs[0]] == list(range(8))  # the stale step 3 is gone
    r = run_script("train.py", *common, "--steps", 9, "--lr", 0.25, "--out", tmp_path / "r", "--resume", check=False)
    last = r.stderr.strip().splitlines()[-1]  # a changed recipe is refused, naming what changed
    assert r.returncode != 0 and "other settings" in last and "-> 0.25" in last, last
    # The same folders spelled otherwise are the same run; fewer steps than done, or no --resume, are refused.
    spelled = ["--model", folder + "/", "--data", os.path.relpath(data), "--token", "<dog>", "--init-token", "dog",
               *map(str, TRAIN_ARGS), "--out", str(tmp_path / "r") + "/"]
    items = read_captions(data, None)
    train.check_resume(train.parse_args([*spelled, "--steps", "8", "--resume"]), items)
    # What the README says a resume may change, and a change of anything else, each refused naming it
    allowed = ["--save-every", "4", "--sample-steps", "3", "--grad-checkpointing", "--compile", "--cuda-graph",
               "--device", "cpu", "--sample-prompt", "a <dog> on the moon"]
    train.check_resume(train.parse_args([*spelled, "--steps", "8", "--resume", *allowed]), items)
    # The same settings given otherwise: alpha = rank 4; auto on the CPU is float32; min-SNR 0 is off, as unset; the
    # style preset with its offset noise overridden gives the run's settings
    for same in (["--alpha", "4", "--dtype", "float32"], ["--snr-gamma", "0"], ["--preset", "style", "--offset-noise",
                                                                                 "0"]):
        train.check_resume(train.parse_args([*spelled, "--steps", "8", "--resume", *same]), items)
    with pytest.raises(ModelError) as e:  # a changed setting is named once, as given (alpha follows the rank)
        train.check_resume(train.parse_args([*spelled, "--steps", "8", "--resume", "--rank", "8"]), items)
    assert "--rank 4 -> 8)" in str(e.value) and "--alpha" not in str(e.value)
    # Data that changed since: a caption edited, an image added or left out
    for other_data in ([(p, c + " again") if i == 0 else (p, c) for i, (p, c) in enumerate(items)],
                       items + items[:1], items[1:]):
        with pytest.raises(ModelError, match="was trained on other data: images or captions in --data were changed"):
            train.check_resume(train.parse_args([*spelled, "--steps", "8", "--resume"]), other_data)
    for change in (["--ti-lr", "1e-4"], ["--batch-size", "2"], ["--weight-decay", "0.1"], ["--max-grad-norm", "2"],
                   ["--offset-noise", "0.05"], ["--snr-gamma", "5"], ["--prior-weight", "0.5"], ["--alpha", "3"],
                   ["--rank", "8"], ["--beta", "10"], ["--seed", "3"], ["--resolution", "64"], ["--dtype", "bfloat16"],
                   ["--caption", "a <dog>"], ["--num-prior", "7"], ["--config", folder], ["--init-token", "cat"],
                   ["--model", str(tmp_path)], ["--prior-dir", str(tmp_path / "class"), "--prior-prompt", "a dog"]):
        with pytest.raises(ModelError, match=re.escape(change[0])):
            train.check_resume(train.parse_args([*spelled, "--steps", "8", "--resume", *change]), items)
    settings_path = tmp_path / "r" / "settings.json"
    settings = settings_path.read_text()
    settings_path.write_text(json.dumps({k: v for k, v in json.loads(settings).items() if k != "data_sha256"}))
    train.check_resume(train.parse_args([*spelled, "--steps", "8", "--resume"]), items[1:])  # an older run's: unknown
    prior = ["--prior-dir", str(tmp_path / "class"), "--prior-prompt", "a dog"]
    settings_path.write_text(json.dumps({**json.loads(settings), "prior_dir": prior[1] + "/", "prior_prompt": "a dog"}))
    train.check_resume(train.parse_args([*spelled, "--steps", "8", "--resume", *prior]), items)  # spelled otherwise
    # A relative path is read from where the run started (settings.json's cwd), wherever the run resumes from
    rel = os.path.relpath(data, tmp_path)
    settings_path.write_text(json.dumps({**json.loads(settings), "data": rel, "cwd": str(tmp_path)}))
    train.check_resume(train.parse_args([*spelled, "--steps", "8", "--resume"]), items)
    settings_path.write_text(json.dumps({**json.loads(settings), "data": rel, "cwd": str(tmp_path / "r")}))
    with pytest.raises(ModelError, match=re.escape(f"--data {os.path.join(tmp_path / 'r', rel)} -> ")):
        train.check_resume(train.parse_args([*spelled, "--steps", "8", "--resume"]), items)
    settings_path.write_text(settings)
    with pytest.raises(ModelError, match="at step 8, past --steps 7"):  # one step short is short
        train.check_resume(train.parse_args([*spelled, "--steps", "7", "--resume"]), items)
    with pytest.raises(ModelError, match="holds this run at step 8; continue it with --resume"):
        train.main(train.parse_args([*spelled, "--steps", "9"]))
    train.main(train.parse_args([*spelled, "--steps", "8"]))  # the same finished command again: nothing to do
    os.rename(tmp_path / "r" / "checkpoint.safetensors", tmp_path / "ckpt")  # deleted: not continued, either way
    for resume in ([], ["--resume"]):
        with pytest.raises(ModelError, match="checkpoint.safetensors: no checkpoint to resume from; train into"):
            train.main(train.parse_args([*spelled, "--steps", "9", *resume]))
    os.rename(tmp_path / "ckpt", tmp_path / "r" / "checkpoint.safetensors")
    with pytest.raises(ModelError, match="other settings"):  # and another recipe never overwrites it
        train.main(train.parse_args([*spelled, "--steps", "8", "--beta", "5"]))
    settings = json.loads((tmp_path / "r" / "settings.json").read_text())  # a save cut short before settings.json
    (tmp_path / "r" / "settings.json").write_text(json.dumps({**settings, "step": 5}))
    with pytest.raises(ModelError, match="checkpoint.safetensors is at step 8, past --steps 6"):
        train.main(train.parse_args([*spelled, "--steps", "6", "--resume"]))
    # A first save cut short before settings.json: the checkpoint names the run, which resumes to a whole save
    (tmp_path / "r" / "settings.json").unlink()
    lora = load_file(str(tmp_path / "r" / "pytorch_lora_weights.safetensors"))
    (tmp_path / "r" / "pytorch_lora_weights.safetensors").unlink()
    with pytest.raises(ModelError, match="holds this run at step 8; continue it with --resume"):
        train.main(train.parse_args([*spelled, "--steps", "8"]))  # not finished: its files are not all there
    train.main(train.parse_args([*spelled, "--steps", "8", "--resume"]))
    assert json.loads((tmp_path / "r" / "settings.json").read_text())["step"] == 8
    again = load_file(str(tmp_path / "r" / "pytorch_lora_weights.safetensors"))
    assert lora.keys() == again.keys() and all(torch.equal(lora[k], again[k]) for k in lora)
    other = tmp_path / "official"  # another program's run: its files are not replaced
    other.mkdir()
    shutil.copy(tmp_path / "r" / "pytorch_lora_weights.safetensors", other)
    with pytest.raises(ModelError, match="holds pytorch_lora_weights.safetensors but no settings.json"):
        train.main(train.parse_args([*spelled[:-1], str(other), "--steps", "1"]))
    assert os.listdir(other) == ["pytorch_lora_weights.safetensors"]
    os.remove(other / "pytorch_lora_weights.safetensors")
    save_file({"w": torch.zeros(1)}, str(other / "checkpoint.safetensors"))  # another program's checkpoint
    with pytest.raises(ModelError, match="holds checkpoint.safetensors but no settings.json"):
        train.main(train.parse_args([*spelled[:-1], str(other), "--steps", "1"]))
    (other / "settings.json").write_text('{"theme": "dark"}')  # another program's settings
    with pytest.raises(ModelError, match="settings.json: not the settings of a run of train.py"):
        train.main(train.parse_args([*spelled[:-1], str(other), "--steps", "1"]))


def test_ctrl_c_saves_a_checkpoint(tiny_sdxl, trained, tmp_path):
    data, out = os.path.join(os.path.dirname(trained), "data"), tmp_path / "c"
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), "--model", tiny_sdxl[0], "--data", data,
                          "--out", str(out), "--steps", "100000", *map(str, TRAIN_ARGS)],
                         stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not os.path.isdir(out) and time.time() < deadline:  # OUT appears when the loop is about to start
        time.sleep(0.2)
    time.sleep(2)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "continue with --resume" in err
    with safe_open(str(out / "checkpoint.safetensors"), "pt") as f:
        saved = int(f.metadata()["step"])
    assert saved > 0 and saved == len((out / "log.jsonl").read_text().splitlines())  # the step it was in is done
    # Once the run is saved, Ctrl-C stops the final sample at once (here: one of 1000 steps, half a minute).
    out = tmp_path / "s"
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), "--model", tiny_sdxl[0], "--data", data,
                          "--out", str(out), "--steps", "1", *map(str, TRAIN_ARGS), "--save-every", "1",
                          "--sample-steps", "1000"], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not os.path.isfile(out / "settings.json") and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)  # (a loaded machine is slow to stop, and slower to sample)
    assert p.returncode == 130 and err.strip().endswith("interrupted"), err[-2000:]
    assert json.loads((out / "settings.json").read_text())["step"] == 1 and not (out / "samples").exists()


def expect_error(args, needle, out, cli=False):
    """train.py refuses args with a ModelError naming needle (as the CLI, a one-line error), writing nothing."""
    if cli:
        r = run_script("train.py", *args, "--out", out, check=False)
        last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert last.startswith("error:") and needle in last, last
    else:  # in process: the CLI prints exactly this error, as the case above shows
        with pytest.raises(ModelError, match=re.escape(needle)):
            train.main(train.parse_args([str(a) for a in (*args, "--out", out)]))
    assert not os.path.exists(out)  # nothing half-written


def test_bad_data_is_refused_in_one_line(tiny_sdxl, tmp_path):
    folder = tiny_sdxl[0]
    common = ("--model", folder, "--resolution", 32, "--steps", 1)
    data = write_images(str(tmp_path / "d"), ["a photo of a <dog>"] * 2)
    out = str(tmp_path / "out")
    expect_error(("--data", data, "--token", "<cat>", "--init-token", "cat", *common), "00.png", out, cli=True)
    expect_error(("--data", data, "--token", "<dog>", "--init-token", "big dog", *common),
                 "must be one token of the model's vocabulary; it is 4 tokens", out)
    for typo in ("dog", "<do"):  # inside <dog>: it would train there, and the base captions would read <dog>
        expect_error(("--data", data, "--token", typo, "--init-token", "dog", *common), "inside the word '<dog>'", out)
    bang = write_images(str(tmp_path / "bang"), ["a photo of a <dog!>"])  # "!" pads the second tokenizer
    expect_error(("--data", bang, "--token", "<dog!>", "--init-token", "dog", *common), "holds '!', a special token",
                 out)
    long = write_images(str(tmp_path / "long"), [" ".join(["word"] * 80) + " a <dog>"])  # CLIP reads 77 tokens
    expect_error(("--data", long, "--token", "<dog>", "--init-token", "dog", *common), "first 77 tokens", out)
    open(os.path.join(long, "00.txt"), "w").close()
    expect_error(("--data", long, *common), "00.txt is missing or empty", out)
    empty = tmp_path / "empty"
    empty.mkdir()
    expect_error(("--data", empty, *common), "no images", out)
    with open(os.path.join(data, "01.png"), "r+b") as f:  # truncate an image
        f.truncate(60)
    expect_error(("--data", data, *common), "01.png", out)
    os.remove(os.path.join(data, "01.png"))
    with open(os.path.join(data, "02.jpg"), "w") as f:
        f.write("not an image")
    shutil.copy(os.path.join(data, "00.txt"), os.path.join(data, "02.txt"))
    expect_error(("--data", data, *common), "02.jpg", out)
    os.remove(os.path.join(data, "02.jpg"))
    expect_error(("--data", data, *common, "--device", "cpu", "--cuda-graph"), "--cuda-graph needs a CUDA GPU", out)
    with open(os.path.join(data, "00.txt"), "wb") as f:
        f.write("a photo of a <dog> in Köln".encode("latin-1"))
    expect_error(("--data", data, *common), "00.txt: not UTF-8 text", out)
    with open(os.path.join(data, "metadata.jsonl"), "w") as f:
        f.write("\n\n" + json.dumps({"file_name": "00.png", "text": "a dog"}) + "\n" + json.dumps(["00.png", "a dog"]))
    expect_error(("--data", data, *common), "metadata.jsonl: line 4 needs file_name and text", out)  # blank lines count
    with open(os.path.join(data, "metadata.jsonl"), "w") as f:
        f.write(json.dumps({"file_name": 0, "text": "a dog"}) + "\n")
    expect_error(("--data", data, *common), "metadata.jsonl: line 1 needs file_name and text", out)
    with open(os.path.join(data, "metadata.jsonl"), "w") as f:  # which caption was meant is not ours to guess
        f.write("".join(json.dumps({"file_name": name, "text": "a <dog>"}) + "\n" for name in ("00.png", "./00.png")))
    expect_error(("--data", data, *common), "metadata.jsonl: line 2 names './00.png' a second time", out)
    write_images(str(empty / "photos"), ["a photo"])  # a folder of subfolders
    expect_error(("--data", empty, *common), "); images in subfolders (photos/00.png, ...) are read where "
                 "metadata.jsonl names them", out)


def test_image_sizes_are_checked_from_the_configs_before_the_weights_load(tiny_sdxl, tmp_path):
    import sample
    configs = tmp_path / "configs"  # the tiny model's VAE halves the sides once, its UNet twice: multiples of 8
    shutil.copytree(tiny_sdxl[0], configs, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(ModelError, match="^--width 60 must be a multiple of 8 for this model"):  # the side at fault
        sample.main(sample.parse_args(["--model", str(configs), "--prompt", "p", "--width", "60", "--height", "64"]))
    with pytest.raises(ModelError, match="^--width 60 and --height 4 must be multiples of 8 for this model"):
        sample.main(sample.parse_args(["--model", str(configs), "--prompt", "p", "--width", "60", "--height", "4"]))
    data = write_images(str(tmp_path / "d"), ["a photo"])
    expect_error(("--model", configs, "--data", data, "--resolution", 36), "--resolution 36 must be a multiple of 8",
                 str(tmp_path / "out"))


def test_a_scheduler_asking_for_other_sampling_settings_is_warned_about(tiny_sdxl, tmp_path):
    """train.py draws its sample and class images with sample.py's Euler, whatever the model's scheduler asks."""
    configs = tmp_path / "configs"
    shutil.copytree(tiny_sdxl[0], configs, ignore=shutil.ignore_patterns("*.safetensors"))
    sched = configs / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps({**json.loads(sched.read_text()), "use_karras_sigmas": True}))
    data = write_images(str(tmp_path / "d"), ["a photo"])
    args = train.parse_args([str(a) for a in ("--model", configs, "--data", data, "--out", tmp_path / "o",
                                              *TRAIN_ARGS)])
    with pytest.warns(UserWarning, match="asks for {'use_karras_sigmas': True}; this sampler is SDXL base's"), \
            pytest.raises(ModelError, match="unet"):  # warned before the weights (absent here) are read
        train.main(args)


def test_an_official_data_config_trains_as_the_same_folder(tiny_sdxl, tmp_path, monkeypatch):
    prompts = ["a photo of a <dog> in the snow", "a red <dog> on the beach"]
    write_images(str(tmp_path / "dataset" / "dog"), prompts)
    images = [f"dataset/dog/{i:02d}.png" for i in range(2)]  # relative to where the official code is run
    full = {"images": images, "prompts": prompts, "base_prompts": [p.replace("<dog>", "dog") for p in prompts],
            "inserting_tokens": ["<dog>"], "initializer_tokens": ["dog"]}
    configs = {"dreambooth": {"images": images, "prompts": ["a photo of sks dog"] * 2}, "full_ti": full,
               "two": {**full, "inserting_tokens": ["<dog>", "<cat>"], "initializer_tokens": ["dog", "cat"]},
               "base": {**full, "base_prompts": prompts}, "missing": {**full, "images": ["x/05.png", images[1]]},
               "derived": {k: v for k, v in full.items() if k != "base_prompts"}}  # base prompts made by train.py
    config = tmp_path / "dataset" / "dog" / "config.json"
    config.write_text(json.dumps(configs))
    monkeypatch.chdir(tmp_path)
    assert read_config("dataset/dog/config.json:full_ti") == (list(zip(images, prompts)), "<dog>", "dog")
    assert read_config("dataset/dog/config.json:derived") == read_config("dataset/dog/config.json:full_ti")
    # --init-token replaces the config's word, which its base_prompts (the frozen model's captions) must then use
    assert read_config("dataset/dog/config.json:derived", "cat") == (list(zip(images, prompts)), "<dog>", "cat")
    with pytest.raises(ModelError, match=re.escape("replaced by cat (--init-token)")):
        read_config("dataset/dog/config.json:full_ti", "cat")
    (tmp_path / "dataset" / "rel.json").write_text(json.dumps({"x": {"images": ["dog/00.png"], "prompts": ["a"]}}))
    assert read_config("dataset/rel.json")[0] == [("dataset/dog/00.png", "a")]  # or from the config's folder
    os.makedirs(tmp_path / "dog")  # where both hold the path, the current directory's image, as officially
    shutil.copy(tmp_path / "dataset" / "dog" / "01.png", tmp_path / "dog" / "00.png")
    assert read_config("dataset/rel.json")[0] == [("dog/00.png", "a")]
    monkeypatch.chdir(config.parent)  # elsewhere, the images are found next to the config
    assert read_config("config.json:dreambooth")[0] == [(f"{i:02d}.png", "a photo of sks dog") for i in range(2)]
    (tmp_path / "list.json").write_text(json.dumps([full]))
    with pytest.raises(ModelError, match="not a data config"):
        read_config(str(tmp_path / "list.json"))
    (tmp_path / "types.json").write_text(json.dumps({"a": {**full, "images": [0, 1]},
                                                     "b": {**full, "prompts": [None] * 2},
                                                     "c": {**full, "inserting_tokens": [5]}}))
    for name, key in (("a", "images"), ("b", "prompts"), ("c", "inserting_tokens")):
        with pytest.raises(ModelError, match=f"{key} must be a list of strings"):
            read_config(f"{tmp_path / 'types.json'}:{name}")
    config.write_text(json.dumps({**configs, "empty_word": {**full, "initializer_tokens": [""]}}))
    for name, needle in [("", "NAME one of: dreambooth, full_ti"), (":two", "learns one token"),
                         (":empty_word", "learns one token from an initializer word"),  # a random start, officially
                         (":base", "base_prompts must be the prompts with <dog> replaced by dog"),
                         (":missing", "image x/05.png not found")]:
        with pytest.raises(ModelError, match=re.escape(needle)):
            read_config("config.json" + name)

    def run(data, *token):
        out = str(tmp_path / f"out{len(token)}")
        train.main(train.parse_args([str(a) for a in ("--model", tiny_sdxl[0], "--data", data, *token, "--steps", 2,
                                                      *TRAIN_ARGS, "--out", out)]))
        return {**load_file(os.path.join(out, "pytorch_lora_weights.safetensors")),
                **load_file(os.path.join(out, "learned_embeds.safetensors"))}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        from_config, from_folder = run("config.json:full_ti"), run(".", "--token", "<dog>", "--init-token", "dog")
    assert not [w for w in seen if "not a learned token" in str(w.message)]  # its own token is not warned about
    assert from_config.keys() == from_folder.keys() and "clip_l" in from_config
    assert all(torch.equal(from_config[k], from_folder[k]) for k in from_config)
    one = run("config.json:full_ti", "--init-token", "dog")  # the config names the token
    assert one.keys() == from_config.keys() and all(torch.equal(one[k], from_config[k]) for k in one)
    with pytest.raises(ModelError, match="names no learned token: --token and --init-token go together"):
        run("config.json:dreambooth", "--init-token", "dog")
    with pytest.raises(ModelError, match="does not contain the token '<cat>'"):  # the user's token, not the config's
        run("config.json:derived", "--token", "<cat>", "--init-token", "cat")
    before = read_config("config.json:full_ti")
    config.write_text(json.dumps(configs), encoding="utf-8-sig")  # a byte-order mark, as Windows editors write
    assert read_config("config.json:full_ti") == before
    with pytest.warns(UserWarning, match="the captions hold <dog>, which is not a learned token here"):
        train.main(train.parse_args([str(a) for a in ("--model", tiny_sdxl[0], "--data", ".", "--steps", 1,
                                                      *TRAIN_ARGS, "--out", tmp_path / "plain")]))


def test_each_step_compares_the_lora_with_the_frozen_model_on_one_draw(tiny_sdxl, tmp_path, monkeypatch):
    """train.py's loop, watched from inside: each step runs the frozen model (LoRA scale 0, no graph) and then the
    LoRA model; c_base is the caption with the token replaced by its initializer word;
    at step 0 (LoRA zero, token row = the word's) both errors are equal, min-SNR weights included; from
    step 1 on the LoRA has moved and they differ; x0 is a posterior sample, not its mean; the token row keeps the
    initializer's norm."""
    import dco
    data = write_images(str(tmp_path / "d"), ["a photo of a <dog>"] * 2)
    encoded, losses, x0s, latents = [], [], [], []
    encode = TextEncoders.encode
    monkeypatch.setattr(TextEncoders, "encode", lambda self, prompts, **kw: encoded.append(list(prompts)) or
                        encode(self, prompts, **kw))
    monkeypatch.setattr(train, "diffusion_loss", lambda a, b, beta: losses.append((a.detach().clone(), b.clone(), beta))
                        or dco.diffusion_loss(a, b, beta))
    monkeypatch.setattr(train, "min_snr_weight", lambda t, gamma, a_bar: torch.full(t.shape, 0.5))
    errors, targets = [], []  # the unweighted errors and their targets, frozen model then LoRA model at each step
    monkeypatch.setattr(train, "eps_mse", lambda pred, eps: targets.append(eps) or (
        lambda e: errors.append(e.detach()) or e)(dco.eps_mse(pred, eps)))
    monkeypatch.setattr(train, "q_sample", lambda x0, t, noise, a_bar: x0s.append((x0, t, noise)) or
                        q_sample(x0, t, noise, a_bar))
    monkeypatch.setattr(train, "encode_images", lambda *a: latents.append(encode_images(*a)) or latents[-1])
    calls, forward = [], UNet.forward  # (grad enabled, the LoRA scales, context, time ids) of every UNet call
    monkeypatch.setattr(UNet, "forward", lambda self, *a: calls.append(
        (torch.is_grad_enabled(), {m.scale for m in lora_lib.lora_modules(self).values()}, a[2], a[4]))
                        or forward(self, *a))
    clip, clipped = torch.nn.utils.clip_grad_norm_, []
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, *a, **kw: clipped.append(list(params)) or
                        clip(params, *a, **kw))
    out = str(tmp_path / "out")
    train.main(train.parse_args([str(a) for a in ("--model", tiny_sdxl[0], "--data", data, "--token", "<dog>",
                                                  "--init-token", "dog", "--steps", 3, "--snr-gamma", 5, *TRAIN_ARGS,
                                                  "--out", out)]))
    assert ["a photo of a dog"] * 2 in encoded
    # per step: the frozen model first, then the LoRA model
    assert [call[:2] for call in calls] == [(False, {0.0}), (True, {1.0})] * 3
    init = TextEncoders(tiny_sdxl[0])
    for frozen in calls[::2]:  # c_base at every step, never the learned token's moving row
        torch.testing.assert_close(frozen[2], init.encode(["a photo of a dog"])[0], rtol=1e-6, atol=1e-6)
    for call in calls:  # SDXL's size conditioning at --resolution 32: original (32, 32), no crop, target (32, 32)
        assert call[3].tolist() == [[32, 32, 0, 0, 32, 32]]
    words = init.word_vectors("dog")
    assert len(clipped) == 3 and all(  # the gradient clipped is the LoRA's and the token rows' together
        sorted(p.numel() for p in group if p.ndim == 1) == sorted(w.numel() for w in words) and
        any(p.ndim == 2 for p in group) for group in clipped)
    (theta0, phi0, _), *later = losses
    assert len(later) == 2 and len(errors) == 6 and {beta for *_, beta in losses} == {1000.0}  # --beta's default
    for (theta, phi, _), err_phi, err_theta in zip(losses, errors[::2], errors[1::2]):  # weighted by min-SNR's 0.5
        assert torch.equal(theta, 0.5 * err_theta) and torch.equal(phi, 0.5 * err_phi)
    torch.testing.assert_close(theta0, phi0, rtol=1e-5, atol=0)  # (the LoRA layer's matmul rounds differently)
    assert all(not torch.allclose(theta, phi, rtol=1e-3) for theta, phi, _ in later)
    # The logged loss is DCO's, -log sigmoid(-beta (err_theta - err_phi)) = softplus(beta margin), from those errors
    logged = [json.loads(line)["loss"] for line in open(os.path.join(out, "log.jsonl"))]
    assert logged == pytest.approx([torch.nn.functional.softplus(1000 * (theta - phi)).mean().item()
                                    for theta, phi, _ in losses], rel=1e-5)
    mean, std = latents[0]
    with torch.no_grad():  # the latent posterior as diffusers' VAE gives it, in the UNet's scale
        dist = tiny_sdxl[1].vae.encode(torch.stack([prepare_image(p, 32) for p, _ in read_captions(data, None)]))
    factor = tiny_sdxl[1].vae.config.scaling_factor
    torch.testing.assert_close(mean, dist.latent_dist.mean * factor, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(std, dist.latent_dist.std * factor, rtol=1e-4, atol=1e-5)
    # Each step's draws from the run's generator (--seed 0), in the loop's order: an image, a posterior sample z of its
    # latent, the noise, a timestep. x0 = mean + std z; both models are scored against that same noise.
    rng = torch.Generator().manual_seed(0)
    assert len(x0s) == 3 and std.min() > 0
    for (x0, t, noise), eps_phi, eps_theta in zip(x0s, targets[::2], targets[1::2]):
        i = torch.randint(0, len(mean), (1,), generator=rng)
        z = torch.randn((1, *mean.shape[1:]), generator=rng)
        assert torch.equal(noise, torch.randn(z.shape, generator=rng))  # offset noise 0: plain N(0, I)
        assert torch.equal(t, torch.randint(0, 1000, (1,), generator=rng))
        torch.testing.assert_close(x0, mean[i] + std[i] * z, rtol=0, atol=1e-6)
        assert torch.equal(eps_phi, noise) and torch.equal(eps_theta, noise)
    learned = load_file(os.path.join(out, "learned_embeds.safetensors"))
    for key, row in zip(("clip_l", "clip_g"), words):
        assert not torch.allclose(learned[key][0], row)  # it trained ...
        assert learned[key][0].norm().item() == pytest.approx(row.norm().item(), rel=1e-5)  # ... on the sphere


def test_the_token_trains_at_its_own_learning_rate(tiny_sdxl, tmp_path):
    """--ti-lr, not --lr, moves the token rows: at --ti-lr 0 they stay the initializer's while the LoRA trains."""
    data, out = write_images(str(tmp_path / "d"), ["a photo of a <dog>"]), str(tmp_path / "out")
    train.main(train.parse_args([str(a) for a in ("--model", tiny_sdxl[0], "--data", data, "--token", "<dog>",
                                                  "--init-token", "dog", "--steps", 2, *TRAIN_ARGS, "--ti-lr", 0,
                                                  "--out", out)]))
    learned = load_file(os.path.join(out, "learned_embeds.safetensors"))
    for key, row in zip(("clip_l", "clip_g"), TextEncoders(tiny_sdxl[0]).word_vectors("dog")):
        torch.testing.assert_close(learned[key][0], row, rtol=1e-6, atol=0)
    ups = [v for k, v in load_file(os.path.join(out, lora_lib.DIFFUSERS_FILE)).items() if ".up." in k]
    assert ups and any(v.abs().max() > 0 for v in ups)  # B starts at zero: the LoRA moved at --lr


class UnrecordableOps(TorchDispatchMode):
    """Collects the ops a CUDA graph cannot record: reading a tensor's value on the CPU (.item(), bool(t): the GPU
    would have to finish first), ops whose output size depends on the values, and a tensor made from Python data
    (torch.tensor: its copy to the GPU would be replayed as it was recorded). AdamW's are left out: on the CPU it
    reads its step count, while train.py's AdamW on a GPU is fused and capturable and keeps it on the device."""
    FORBIDDEN = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive",
                 "equal", "repeat_interleave", "lift_fresh"}

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.FORBIDDEN and not any("torch/optim/" in f.filename for f in traceback.extract_stack()):
            self.found.append(name)
        return func(*args, **(kwargs or {}))


def test_the_cuda_graph_path_trains_and_samples_as_the_eager_one(tiny_sdxl, tmp_path, monkeypatch):
    """--cuda-graph's wiring, on the CPU: with the recording replaced by plain calls (after the same warm-up calls
    and their undo), a run with a learned token, prior preservation and a resume equals the eager run, tensor for
    tensor and logged step for logged step; sampling too. The call that would be recorded has nothing a graph cannot
    record. The recording itself needs a GPU: tests/gpu_check.py."""
    import cli
    import sample
    import sampler
    recorded = []  # per call a graph would replay: the ops found in it that a graph cannot record
    scales, forward = [], lora_lib.LoRALinear.forward  # the scale each LoRA layer runs at, call by call
    monkeypatch.setattr(lora_lib.LoRALinear, "forward", lambda self, x: scales.append(
        self.scale.tolist() if torch.is_tensor(self.scale) else self.scale) or forward(self, x))

    def no_recording(fn, *inputs, warmup=2, after_warmup=None):
        for _ in range(warmup):
            scales.clear()
            fn(*inputs)
        if after_warmup is not None:
            after_warmup()
        captured = list(scales)  # a graph replays its recording's LoRA scales, whatever they are at replay time

        def run(*args):  # a graph replays on its recorded input buffers: each call's inputs must fit them
            assert [(a.shape, a.dtype, a.device) for a in args] == [(i.shape, i.dtype, i.device) for i in inputs]
            watch = UnrecordableOps()
            scales.clear()
            with watch:
                out = fn(*args)
            recorded.append(watch.found)
            assert scales == captured
            return out
        return run
    data = write_images(str(tmp_path / "d"), ["a photo of a <dog>", "a <dog> in the snow"])
    common = ["--model", tiny_sdxl[0], "--data", data, "--token", "<dog>", "--init-token", "dog", "--snr-gamma", 5,
              "--prior-dir", tmp_path / "prior", "--prior-prompt", "a photo of a dog", "--num-prior", 2,
              "--sample-steps", 2, *TRAIN_ARGS]

    def run(out, *extra):
        train.main(train.parse_args([str(a) for a in (*common, *extra, "--out", tmp_path / out)]))
        with open(tmp_path / out / "log.jsonl") as f:
            log = f.read()
        return log, {k: v for name in ("pytorch_lora_weights", "learned_embeds")
                     for k, v in load_file(str(tmp_path / out / f"{name}.safetensors")).items()}

    def draw(out, *extra):
        sample.main(sample.parse_args([str(a) for a in (
            "--model", tiny_sdxl[0], "--lora", tmp_path / "eager", "--prompt", "a <dog> in the snow", "--w-con", 2,
            "--steps", 3, "--width", 32, "--height", 32, "--quiet", *extra, "--out", tmp_path / out)]))
        return np.asarray(Image.open(tmp_path / out))
    (log, eager), image = run("eager", "--steps", 4), draw("eager.png")
    monkeypatch.setattr(cli, "supported", lambda device: True)
    monkeypatch.setattr(train, "cuda_graph", no_recording)
    monkeypatch.setattr(sampler, "cuda_graph", no_recording)
    run("graph", "--steps", 2, "--cuda-graph")
    log_graph, graphed = run("graph", "--steps", 4, "--cuda-graph", "--resume")
    assert log_graph == log and len(log.splitlines()) == 4
    assert eager.keys() == graphed.keys() and all(torch.equal(eager[k], graphed[k]) for k in eager)
    assert np.array_equal(draw("graph.png", "--cuda-graph"), image)
    assert len(recorded) == 4 + 3 and not any(recorded), recorded  # 4 train steps, then the 3 sampler steps


def test_seed_sample_prompt_and_grids(tiny_sdxl, tmp_path):
    """--seed sets both the LoRA's initial A and the loop's draws (with --lr 0, A stays as drawn and B at zero, so the
    logged errors are the draws' alone); the grids along the way show the first caption."""
    data = write_images(str(tmp_path / "d"), ["a photo of a dog", "a dog in the snow"])

    def run(out, seed, *extra):
        train.main(train.parse_args([str(a) for a in (
            "--model", tiny_sdxl[0], "--data", data, *TRAIN_ARGS, "--steps", 2, "--lr", 0, *extra, "--seed", seed,
            "--out", tmp_path / out)]))
        return (load_file(str(tmp_path / out / "pytorch_lora_weights.safetensors")),
                (tmp_path / out / "log.jsonl").read_text())
    (a0, log0), (a1, log1) = run("s0", 0, "--save-every", 1, "--sample-steps", 1), run("s1", 1)
    downs = [k for k in a0 if "lora_A" in k or "lora.down" in k]
    assert downs and not any(torch.equal(a0[k], a1[k]) for k in downs) and log0 != log1
    assert sorted(os.listdir(tmp_path / "s0" / "samples")) == ["step-000001.png", "step-000002.png"]
    for f in ("step-000001.png", "step-000002.png"):
        meta = json.loads(Image.open(tmp_path / "s0" / "samples" / f).text["parameters"])
        assert meta["prompt"] == "a photo of a dog", f


def test_a_checkpoint_of_other_shapes_is_refused(tmp_path):
    from checkpoint import save_training_state

    def state(shapes):
        params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
        optimizer = torch.optim.AdamW(params)
        return params, optimizer
    params, optimizer = state([(2, 3), (3, 2)])
    save_training_state(str(tmp_path / "c.safetensors"), {f"param.{i}": p for i, p in enumerate(params)}, optimizer,
                        torch.Generator(), {"step": "1"})
    params, optimizer = state([(3, 2), (2, 3)])  # as many tensors, other shapes: another rank or targets
    with pytest.raises(ModelError, match="made by a run with other settings"):
        train.load_checkpoint(str(tmp_path / "c.safetensors"), params, optimizer, torch.Generator())


def test_impossible_settings_are_refused(tmp_path, capsys):
    data = write_images(str(tmp_path / "d"), ["a photo"])
    common = ["--model", "m", "--data", data]
    (tmp_path / "file").write_text("")
    for bad, needle in [(["--rank", "0"], "expected a positive whole number"),
                        (["--batch-size", "-1"], "expected a positive whole number"),
                        (["--sample-steps", "1001"], "--sample-steps can be at most 1000"),
                        (["--lr", "nan"], "argument --lr: expected a number, got 'nan'"),
                        (["--beta", "-1"], "expected a number >= 0, got '-1'"),
                        (["--alpha", "0"], "expected a number > 0, got '0'"),  # would silently mean alpha = rank
                        (["--max-grad-norm", "0"], "expected a number > 0"),  # would zero every gradient
                        (["--seed", "-1"], "expected a whole number from 0 to 2^64 - 1"),
                        (["--prior-dir", data + "/", "--prior-prompt", "a dog"], "--prior-dir is the --data folder"),
                        (["--out", str(tmp_path / "file")], "is a file; training writes a folder"),
                        (["--prior-dir", str(tmp_path / "file"), "--prior-prompt", "a dog"], "is a file; class images"),
                        (["--dtype", "float16"], "invalid choice: 'float16'"),
                        (["--token", "<my dog>", "--init-token", "dog"], "one word, without spaces"),
                        (["--data", "config.json:full_ti", "--caption", "a dog"], "--caption is for a folder"),
                        (["--caption", "  "], "--caption is blank"),  # it trained every image on no text
                        (["--caption", ""], "--caption is blank"),  # the .txt files were read instead
                        (["--token", "", "--init-token", "dog"], "--token is blank"),
                        (["--sample-prompt", ""], "--sample-prompt is blank")]:
        with pytest.raises(SystemExit):
            train.parse_args(common + bad)
        assert needle in capsys.readouterr().err


def test_help_names_each_default(capsys):
    import sample
    for script, wanted in [(train, ["--lr LR AdamW learning rate of the LoRA (default: 5e-05)",
                                    "--steps STEPS training steps (default: 2000, 1000 with --preset style)",
                                    "(default: subject)"]),
                           (sample, ["--steps STEPS Euler steps (default: 50)"])]:
        with pytest.raises(SystemExit):
            script.parse_args(["--help"])
        text = " ".join(capsys.readouterr().out.split())
        for line in wanted:
            assert line in text
        assert "(default: None)" not in text and "(default: False)" not in text and "(default: )" not in text


def test_the_scripts_start_without_importing_transformers():
    """transformers takes seconds to import: --help and argument errors should not wait for it."""
    code = "import sys, train, sample, merge, toy, evaluate; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_sdxl, trained, tmp_path):
    data, out = os.path.join(os.path.dirname(trained), "data"), str(tmp_path / "nan")
    r = run_script("train.py", "--model", tiny_sdxl[0], "--data", data, "--out", out, "--resolution", 32,
                   "--steps", 5, "--save-every", 1, "--sample-steps", 1, "--rank", 2, "--lr", 1e30, "--beta", 0,
                   check=False)
    assert r.returncode != 0 and "keeping the last good checkpoint" in r.stderr.strip().splitlines()[-1]
    tensors = load_file(os.path.join(out, "checkpoint.safetensors"))
    assert all(torch.isfinite(v.float()).all() for v in tensors.values())


def test_an_infinite_gradient_under_a_finite_loss_is_never_saved(tiny_sdxl, trained, tmp_path, monkeypatch):
    """Clipping an infinite gradient makes NaN weights (inf * 0); a save right after must not write them."""
    data, out = os.path.join(os.path.dirname(trained), "data"), tmp_path / "inf"
    clip, calls = torch.nn.utils.clip_grad_norm_, []

    def overflow_at_step_1(params, *a, **kw):
        calls.append(1)
        if len(calls) == 2:
            params[0].grad[0, 0] = float("inf")
        return clip(params, *a, **kw)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", overflow_at_step_1)
    ctrl_c = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit, match="gradient norm inf at step 1; stopped, keeping the last good checkpoint"):
        train.main(train.parse_args(["--model", tiny_sdxl[0], "--data", data, "--out", str(out), "--resolution", "32",
                                     "--steps", "4", "--save-every", "1", "--sample-steps", "1", "--rank", "2"]))
    assert signal.getsignal(signal.SIGINT) is ctrl_c  # training's own Ctrl-C handling ends with it
    assert json.load(open(out / "settings.json"))["step"] == 1
    assert all(torch.isfinite(v.float()).all() for v in load_file(str(out / "checkpoint.safetensors")).values())


def test_an_infinite_loss_under_a_finite_gradient_stops_before_any_save(tiny_sdxl, trained, tmp_path, monkeypatch):
    import dco
    data, out = os.path.join(os.path.dirname(trained), "data"), tmp_path / "inf"
    monkeypatch.setattr(train, "diffusion_loss", lambda *a: dco.diffusion_loss(*a) + float("inf"))  # no gradient
    with pytest.raises(SystemExit, match="the loss is inf and the gradient norm .* at step 0; stopped, no checkpoint"):
        train.main(train.parse_args([str(a) for a in ("--model", tiny_sdxl[0], "--data", data, "--out", out,
                                                      "--steps", 2, *TRAIN_ARGS)]))
    assert not (out / "checkpoint.safetensors").exists()


def test_a_token_stands_as_a_word_of_each_caption():
    for caption in ("a <dog>'s toy", "(<dog>) in the snow", "\"<dog>\", at noon", "a <DOG>"):  # any case, as CLIP reads
        train.check_token("00.txt", caption, "<dog>")
    with pytest.raises(ModelError, match="inside the word 'a<DOG>'"):
        train.check_token("00.txt", "a<DOG> in the snow", "<dog>")
    # <word>s warned about as plain text: any but the token, in any case
    assert train.plain_tags([("00.png", "a <DOG> and a <cat>"), ("01.png", "a <dog>")], "<dog>") == ["<cat>"]
    assert train.plain_tags([("00.png", "a <dog>")], None) == ["<dog>"]
    with pytest.raises(ModelError, match="00.txt: caption 'a photo of a dog' does not contain the token '<dog>'"):
        train.check_token("00.txt", "a photo of a dog", "<dog>")


def test_prior_preservation_generates_class_images(tiny_sdxl, trained, tmp_path, monkeypatch):
    data, prior = os.path.join(os.path.dirname(trained), "data"), tmp_path / "prior"
    run_script("train.py", "--model", tiny_sdxl[0], "--data", data, "--out", tmp_path / "p", "--resolution", 32,
               "--steps", 2, "--beta", 0, "--prior-dir", prior, "--prior-prompt", "a photo of a dog", "--num-prior",
               2, "--sample-steps", 2, "--rank", 2, "--sample-prompt", "a dog at night")
    assert sorted(os.listdir(prior)) == ["class-00000.png", "class-00001.png"]
    assert not np.array_equal(*[np.asarray(Image.open(prior / f)) for f in sorted(os.listdir(prior))])  # two seeds
    assert os.path.isfile(tmp_path / "p" / "pytorch_lora_weights.safetensors")
    assert os.listdir(tmp_path / "p" / "samples") == ["step-000002.png"]  # the last step's grid, of --sample-prompt
    assert json.loads(Image.open(tmp_path / "p" / "samples" / "step-000002.png").text["parameters"])["prompt"] == \
        "a dog at night"

    # In process, watched: with more class images than --num-prior, --num-prior of them are used and none is made;
    # the loss is the instance half's plus prior_weight times the class half's mean error.
    shutil.copy(prior / "class-00000.png", prior / "class-00007.png")
    encoded, errs, losses = [], [], []
    monkeypatch.setattr(train, "encode_images", lambda vae, items, *a: encoded.append(len(items)) or
                        encode_images(vae, items, *a))
    monkeypatch.setattr(train, "generate", lambda *a, **kw: pytest.fail("no class image should be generated"))
    monkeypatch.setattr(train, "eps_mse", lambda *a: errs.append(eps_mse(*a)) or errs[-1])
    backward = torch.Tensor.backward
    monkeypatch.setattr(torch.Tensor, "backward", lambda self, *a, **kw: losses.append(self.detach().clone()) or
                        backward(self, *a, **kw))
    contexts, forward = [], UNet.forward
    monkeypatch.setattr(UNet, "forward", lambda self, *a: contexts.append(a[2]) or forward(self, *a))
    train.main(train.parse_args([str(a) for a in (
        "--model", tiny_sdxl[0], "--data", data, "--steps", 2, "--beta", 0, "--prior-dir", prior, "--prior-prompt",
        "a photo of a dog", "--num-prior", 2, "--prior-weight", 0.3, *TRAIN_ARGS, "--out", tmp_path / "q")]))
    assert encoded == [3 + 2] and len(errs) == len(losses) == 2  # 3 instance images; DreamBooth: one UNet call
    class_prompt = TextEncoders(tiny_sdxl[0]).encode(["a photo of a dog"])[0][0]
    for context in contexts:  # an instance caption, then a class image's: the prior prompt
        assert not torch.allclose(context[0], class_prompt)
        torch.testing.assert_close(context[1], class_prompt, rtol=1e-6, atol=1e-6)
    for err, loss in zip(errs, losses):
        assert err.shape == (2,)  # batch 1 instance + 1 class image
        torch.testing.assert_close(loss, err[0] + 0.3 * err[1])


def test_captions_come_from_caption_then_metadata_then_txt(tmp_path):
    data = write_images(str(tmp_path / "d"), ["from txt", "from txt too"])
    # JSON written unescaped may hold U+2028 in a string: still one line of metadata.jsonl
    (tmp_path / "d" / "metadata.jsonl").write_text(
        json.dumps({"file_name": "00.png", "text": "from\u2028meta"}, ensure_ascii=False) + "\n\n", encoding="utf-8")
    assert [c for _, c in read_captions(data, None)] == ["from\u2028meta", "from txt too"]
    assert [c for _, c in read_captions(data, "for all")] == ["for all", "for all"]
    os.rename(tmp_path / "d" / "01.png", tmp_path / "d" / "01.PNG")  # a camera's upper-case names, both files
    os.rename(tmp_path / "d" / "01.txt", tmp_path / "d" / "01.TXT")
    assert [c for _, c in read_captions(data, None)] == ["from\u2028meta", "from txt too"]
    # A Mac's ._NAME files beside each photo are not images; a TIFF is; a caption without an image is said so
    (tmp_path / "d" / "._01.PNG").write_bytes(b"\x00\x05\x16\x07 Mac OS X")
    (tmp_path / "d" / "._01.TXT").write_bytes(b"\x00\x05\x16\x07 Mac OS X")
    load_rgb(os.path.join(data, "00.png")).save(tmp_path / "d" / "02.tif")
    (tmp_path / "d" / "02.txt").write_text("a tiff")
    (tmp_path / "d" / "03.txt").write_text("its image is a .heic")
    with pytest.warns(UserWarning, match="captions without an image of a type read here .*: 03.txt; they are not"):
        assert [c for _, c in read_captions(data, None)] == ["from\u2028meta", "from txt too", "a tiff"]
    os.remove(tmp_path / "d" / "03.txt")
    (tmp_path / "d" / "metadata.jsonl").write_text(  # with a byte-order mark, as Windows tools write it
        "\ufeff" + json.dumps({"file_name": "00.png", "text": "bom"}) + "\n", encoding="utf-8")
    assert [c for _, c in read_captions(data, None)][0] == "bom"
    (tmp_path / "d" / "metadata.jsonl").write_text(json.dumps({"file_name": "./00.png", "text": " dot \n"}) + "\n \t\n")
    assert [c for _, c in read_captions(data, None)] == ["dot", "from txt too", "a tiff"]  # 00.png once, stripped
    (tmp_path / "d" / "metadata.jsonl").write_text(json.dumps({"file_name": "00.png", "text": " "}) + "\n")
    os.remove(tmp_path / "d" / "00.txt")
    with pytest.raises(ModelError, match="00.png: no caption .its text in metadata.jsonl is blank"):
        read_captions(data, None)
    (tmp_path / "d" / "00.txt").write_text("from txt")
    (tmp_path / "d" / "01.TXT").write_text("  from txt, padded \n")  # a caption file's spaces and newline are not text
    assert [c for _, c in read_captions(data, None)][1] == "from txt, padded"
    (tmp_path / "d" / "01.TXT").write_text(" \n")
    with pytest.raises(ModelError, match="01.PNG: no caption .* missing or empty"):
        read_captions(data, None)
    (tmp_path / "d" / "01.TXT").write_text("from utf-16", encoding="utf-16")  # with its byte-order mark, as Windows
    assert [c for _, c in read_captions(data, None)][1] == "from utf-16"  # PowerShell 5 writes captions with `>`
    shutil.copy(tmp_path / "d" / "00.png", tmp_path / "d" / "04.jfif")  # a JPEG as Windows browsers name it
    (tmp_path / "d" / "04.txt").write_text("jfif")
    os.makedirs(tmp_path / "d" / "more")
    shutil.copy(tmp_path / "d" / "00.png", tmp_path / "d" / "more" / "05.png")
    with pytest.warns(UserWarning, match=re.escape(f"not read unless metadata.jsonl names them: "
                                                   f"{os.path.join('more', '05.png')}")):
        assert [c for _, c in read_captions(data, None)] == ["from txt", "from utf-16", "a tiff", "jfif"]
    imagefolder = tmp_path / "hf"  # Hugging Face's imagefolder layout: the images in a subfolder
    os.makedirs(imagefolder / "images")
    shutil.copy(tmp_path / "d" / "00.png", imagefolder / "images" / "00.png")
    rows = [{"file_name": "images/00.png", "text": "sub"}, {"file_name": "images/01.png", "text": "deleted"}]
    (imagefolder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.warns(UserWarning, match="captions without an image .*: images/01.png; they are not"):
        assert read_captions(str(imagefolder), None) == [(str(imagefolder / "images" / "00.png"), "sub")]


def test_every_image_mode_becomes_upright_rgb(tmp_path):
    base = np.zeros((40, 60, 3), np.uint8)
    base[:10, :10] = 255  # a white top-left corner shows orientation
    img = Image.fromarray(base)
    cases = {"rgba.png": img.convert("RGBA"), "p.png": img.convert("P"), "l.png": img.convert("L"),
             "cmyk.jpg": img.convert("CMYK"), "i16.png": Image.fromarray(base[..., 0].astype(np.uint16) * 257)}
    for name, im in cases.items():
        im.save(tmp_path / name)
        out = np.asarray(load_rgb(str(tmp_path / name)))
        assert out.shape == (40, 60, 3) and out[:10, :10].min() > 200 and out[20:, 20:].max() < 60, name
    # 16-bit and 32-bit grayscale keep their scale: 65535 is 255, so 32768 is 127 and 63000 is 245
    for mode, value, want in (("I;16", 32768, 127), ("I", 63000, 245)):
        Image.fromarray(np.full((4, 4), value, np.uint16 if mode == "I;16" else np.int32)).save(tmp_path / "g.tif")
        assert Image.open(tmp_path / "g.tif").mode == mode
        assert (np.asarray(load_rgb(str(tmp_path / "g.tif"))) == want).all(), mode
    keyed = np.zeros((4, 4, 3), np.uint8)  # an RGB PNG whose black is its transparent color
    keyed[2:, 2:] = (0, 0, 255)
    Image.fromarray(keyed).save(tmp_path / "keyed.png", transparency=(0, 0, 0))
    out = np.asarray(load_rgb(str(tmp_path / "keyed.png")))
    assert (out[:2, :2] == 255).all() and out[3, 3].tolist() == [0, 0, 255]
    keyed16 = np.full((4, 4), 32768, np.uint16)  # 16-bit gray whose 1000 is transparent (and 1100 rounds alike)
    keyed16[:2, :2], keyed16[3, 3] = 1000, 1100
    Image.fromarray(keyed16).save(tmp_path / "keyed16.png", transparency=1000)
    out = np.asarray(load_rgb(str(tmp_path / "keyed16.png")))
    assert (out[:2, :2] == 255).all() and out[3, 3].tolist() == [4] * 3 and out[2, 2].tolist() == [127] * 3
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "rot.jpg", exif=exif)
    out = np.asarray(load_rgb(str(tmp_path / "rot.jpg")))
    assert out.shape == (40, 60, 3) and out[:10, :10].min() > 200
    clear = np.zeros((40, 60, 4), np.uint8)
    clear[20:, 20:] = (0, 0, 255, 255)  # opaque blue on a transparent (black, alpha 0) ground
    Image.fromarray(clear).save(tmp_path / "clear.png")
    out = np.asarray(load_rgb(str(tmp_path / "clear.png")))
    assert (out[:10, :10] == 255).all() and out[30, 30].tolist() == [0, 0, 255]  # composited on white
    gray = np.zeros((8, 8, 2), np.uint8)
    gray[4:, 4:] = (100, 255)  # gray with alpha: opaque 100 on a transparent black ground
    Image.fromarray(gray, "LA").save(tmp_path / "la.png")
    out = np.asarray(load_rgb(str(tmp_path / "la.png")))
    assert out[0, 0].tolist() == [255, 255, 255] and out[6, 6].tolist() == [100, 100, 100]
    x = prepare_image(str(tmp_path / "rgba.png"), 32)
    assert x.shape == (3, 32, 32) and -1 <= x.min() and x.max() <= 1
    with pytest.warns(UserWarning, match="upscaling"):
        prepare_image(str(tmp_path / "rgba.png"), 64)
    Image.fromarray(base[..., 0].astype(np.float32) / 255, "F").save(tmp_path / "float.tiff")  # was read as black
    with pytest.raises(ModelError, match="float.tiff: a floating-point image"):
        load_rgb(str(tmp_path / "float.tiff"))


def test_resize_and_crop_round_as_torchvision(tmp_path):
    # The official code's transforms.Resize(16) then CenterCrop(16): the long side truncates (20x31 -> 16x24.8 -> 24),
    # the offset rounds half to even (27 - 16 = 11 -> 5.5 -> 6; 25 - 16 = 9 -> 4.5 -> 4), and the resampling is PIL's
    # bilinear.
    rng = np.random.default_rng(0)
    for (w, h), size, box in [((31, 20), (24, 16), (4, 0, 20, 16)), ((20, 31), (16, 24), (0, 4, 16, 20)),
                              ((16, 27), (16, 27), (0, 6, 16, 22)), ((16, 25), (16, 25), (0, 4, 16, 20))]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        img.save(tmp_path / "x.png")
        want = np.asarray(img.resize(size, Image.BILINEAR).crop(box), dtype=np.float32) / 127.5 - 1
        with warnings.catch_warnings():  # a short side of exactly the resolution is not upscaled
            warnings.simplefilter("error")
            got = prepare_image(str(tmp_path / "x.png"), 16)
        np.testing.assert_array_equal(got.permute(1, 2, 0).numpy(), want)


def test_textual_inversion_trains_only_the_new_rows(tiny_sdxl):
    text = TextEncoders(tiny_sdxl[0])
    before = [enc.get_input_embeddings().weight.detach().clone() for enc in text.encoders]
    ti = TokenEmbeddings(text, "<dog>", "dog")
    init = [r.detach().clone() for r in ti.rows]
    opt = torch.optim.AdamW(ti.rows, lr=1e-2)
    for _ in range(3):
        context, pooled = text.encode(["a photo of a <dog>"])
        (context.pow(2).mean() + pooled.pow(2).mean()).backward()
        opt.step()
        opt.zero_grad()
        ti.retract()
    for enc, old, row, start in zip(text.encoders, before, ti.rows, init):
        table = enc.get_input_embeddings().weight
        assert torch.equal(table[: old.shape[0]], old)  # every other row bit-identical
        assert not torch.allclose(row, start)  # the new row moved
        assert row.norm().item() == pytest.approx(start.norm().item(), rel=1e-5)  # and kept its norm
    # The encoders read the learned rows for the token and nothing else changed: they encode as fresh encoders that
    # were given the saved rows (through the table, as sample.py loads them).
    fresh = TextEncoders(tiny_sdxl[0])
    learned = ti.learned()
    fresh.add_token("<dog>", [learned["clip_l"][0], learned["clip_g"][0]])
    with torch.no_grad():
        for prompt in ("a photo of a <dog>", "a photo of a dog"):
            for ours, theirs in zip(text.encode([prompt]), fresh.encode([prompt])):
                torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_a_new_token_gets_its_row_at_each_tokenizers_own_id(tiny_sdxl):
    """The two tokenizers may number a new token differently (here the second already has one more added token):
    each encoder's vector lands at its own tokenizer's id. A <word> not loaded, whatever its characters, is named."""
    text = TextEncoders(tiny_sdxl[0])
    text.tokenizers[1].add_tokens(["<other>"])
    text.encoders[1].resize_token_embeddings(len(text.tokenizers[1]), mean_resizing=False)
    assert text.unknown_tokens("a <my-dog> and a <dog>.") == ["<my-dog>", "<dog>"]
    vectors = [torch.full_like(row, value) for row, value in zip(text.word_vectors("dog"), (0.25, 0.75))]
    text.add_token("<dog>", vectors)
    ids = [tokenizer.convert_tokens_to_ids("<dog>") for tokenizer in text.tokenizers]
    assert ids[0] != ids[1]
    for encoder, i, vec in zip(text.encoders, ids, vectors):
        assert torch.equal(encoder.get_input_embeddings().weight[i], vec)
    assert text.unknown_tokens("a <my-dog> and a <dog>.") == ["<my-dog>"]


def test_a_token_that_is_already_a_word_is_warned_about(tiny_sdxl):
    with pytest.warns(UserWarning, match="already a word of CLIP's vocabulary"):
        TokenEmbeddings(TextEncoders(tiny_sdxl[0]), "dog", "dog")


def test_training_state_round_trips_and_refuses_other_files(tmp_path):
    from checkpoint import load_training_state, save_training_state
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(2, 3)), torch.nn.Parameter(torch.randn(4))]
    opt = torch.optim.AdamW(params, lr=0.1)
    for _ in range(2):  # AdamW's moments and step count, made by two steps
        sum(p.pow(2).sum() for p in params).backward()
        opt.step()
        opt.zero_grad()
    rng = torch.Generator().manual_seed(7)
    torch.rand(3, generator=rng)
    path = str(tmp_path / "state.safetensors")
    save_training_state(path, {"param.0": params[0]}, opt, rng, {"step": "2"})
    fresh, rng2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2, 3)), torch.nn.Parameter(torch.zeros(4))]), \
        torch.Generator()
    tensors, meta = load_training_state(path, fresh, rng2)
    assert set(tensors) == {"param.0"} and torch.equal(tensors["param.0"], params[0].detach()) and meta["step"] == "2"
    want, got = opt.state_dict()["state"], fresh.state_dict()["state"]
    assert want.keys() == got.keys() and all(torch.equal(torch.as_tensor(want[i][k]), torch.as_tensor(got[i][k]))
                                             for i in want for k in want[i])
    assert torch.equal(torch.rand(5, generator=rng2), torch.rand(5, generator=rng))  # the draws go on as they would
    save_file({"param.0": torch.zeros(1)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(ModelError, match="not a training state"):
        load_training_state(str(tmp_path / "lora.safetensors"), fresh, torch.Generator())
