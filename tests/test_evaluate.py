"""evaluate.py on tiny random DINOv2 / SigLIP / CLIP checkpoints saved as local folders, with a fake image generator
(deterministic random images) in place of SDXL."""
import csv
import inspect
import json
import os
import warnings
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import sample
from checkpoint import ModelError
from data import IMAGE_SUFFIXES
from conftest import run_script, write_tokenizer
from evaluate import Embedder

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)


@pytest.fixture(scope="module")
def metric_models(tmp_path_factory):
    """{kind: folder} of tiny random checkpoints, with preprocessor configs shaped like the official ones."""
    from transformers import CLIPConfig, CLIPModel, Dinov2Config, Dinov2Model, SiglipConfig, SiglipModel
    root = tmp_path_factory.mktemp("metrics")
    folders = {k: str(root / k) for k in ("dino", "siglip", "clip")}
    torch.manual_seed(0)
    vision = dict(TINY, image_size=28, patch_size=14)
    Dinov2Model(Dinov2Config(**vision)).save_pretrained(folders["dino"])
    write_json(os.path.join(folders["dino"], "preprocessor_config.json"), dict(
        image_processor_type="BitImageProcessor", do_resize=True, size={"shortest_edge": 32}, resample=3,
        do_center_crop=True, crop_size={"height": 28, "width": 28}, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225], do_convert_rgb=True))
    for kind, length in (("siglip", 64), ("clip", 77)):
        tok = write_tokenizer(folders[kind], "<|endoftext|>")
        text = dict(TINY, vocab_size=len(tok), max_position_embeddings=length, bos_token_id=tok.bos_token_id,
                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        if kind == "siglip":
            SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).save_pretrained(folders[kind])
            processor = dict(image_processor_type="SiglipImageProcessor", size={"height": 28, "width": 28},
                             image_mean=[0.5] * 3, image_std=[0.5] * 3)
        else:
            model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
            model.save_pretrained(folders[kind])
            processor = dict(image_processor_type="CLIPImageProcessor", size={"shortest_edge": 28},
                             do_center_crop=True, crop_size={"height": 28, "width": 28},
                             image_mean=[0.4815, 0.4578, 0.4082], image_std=[0.2686, 0.2613, 0.2758])
        write_json(os.path.join(folders[kind], "preprocessor_config.json"), dict(
            processor, do_resize=True, resample=3, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
            do_convert_rgb=True))
    return folders


def random_image(key, size=(48, 64)):
    rng = np.random.default_rng(zlib.crc32(json.dumps(key).encode()))
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


class FakeGenerator:
    """Stands in for make_generator: records pipeline loads and draws; optionally interrupts at the n-th draw."""

    def __init__(self, interrupt_at=None, image=None):
        self.loads, self.drawn, self.interrupt_at, self.image = [], [], interrupt_at, image

    def __call__(self, args, loras):
        self.loads.append(list(loras))

        def draw(prompt, seed, w_con):
            if len(self.drawn) == self.interrupt_at:
                raise KeyboardInterrupt
            self.drawn.append((tuple(loras), prompt, seed, w_con))
            return Image.open(self.image).copy() if self.image else random_image([loras, prompt, seed, w_con])

        return draw, lambda prompt: prompt.replace("<dog>", "dog")


@pytest.fixture
def setup(tmp_path, metric_models):
    """A prompts file, reference images, two LoRA files and an argv builder."""
    (tmp_path / "refs").mkdir()
    (tmp_path / "style").mkdir()
    for i in range(3):
        random_image(["ref", i], (40 + 8 * i, 56)).save(tmp_path / "refs" / f"{i}.jpg", quality=95)
        random_image(["style", i]).save(tmp_path / "style" / f"{i}.png")
    (tmp_path / "prompts.txt").write_text("# comment\na {} in the snow\n\na {} on the beach, at noon\na red {}\n")
    for name in ("dco", "db", "sty"):
        (tmp_path / f"{name}.safetensors").write_bytes(name.encode() * 10)

    def argv(*extra, loras=("dco", "db"), metrics=("dino", "siglip", "clip")):
        out = ["--model", str(tmp_path / "sdxl"), "--ref-images", str(tmp_path / "refs"), "--prompts",
               str(tmp_path / "prompts.txt"), "--subject", "<dog>", "--seeds", "2", "--w-con", "cfg,0,2",
               "--out", str(tmp_path / "out"), "--device", "cpu"]
        out += [a for name in loras for a in ("--lora", str(tmp_path / f"{name}.safetensors"))]
        out += [a for kind in metrics for a in (f"--{kind}", metric_models[kind])]
        return evaluate.parse_args(out + list(extra))

    return tmp_path, argv


def test_similarity_of_an_image_with_itself_is_one(setup, metric_models):
    tmp, _ = setup
    a, b = str(tmp / "refs" / "0.jpg"), str(tmp / "refs" / "1.jpg")
    for kind, folder in metric_models.items():
        emb = Embedder(kind, folder).images([a, a, b])
        cos = emb @ emb.T
        assert abs(cos[0, 1].item() - 1) < 1e-5 and abs(cos[0, 0].item() - 1) < 1e-5, kind
        assert cos[0, 2].item() < 0.9999, f"{kind}: different images should not score 1"
    # A reference image is read as train.py reads it: a 16-bit grayscale PNG scores as its 8-bit copy.
    gray = np.random.default_rng(0).integers(0, 256, (40, 56)).astype(np.uint16)
    Image.fromarray(gray * 257).save(tmp / "g16.png")
    Image.fromarray(gray.astype(np.uint8)).convert("RGB").save(tmp / "g8.png")
    emb = Embedder("dino", metric_models["dino"]).images([str(tmp / "g16.png"), str(tmp / "g8.png")])
    assert (emb[0] @ emb[1]).item() > 1 - 1e-5


def test_images_go_through_the_pil_backend_whatever_else_is_installed(metric_models, monkeypatch):
    # transformers 5 picks torchvision's backend where torchvision is installed, and it resizes slightly differently
    import transformers
    asked = []
    load = transformers.AutoImageProcessor.from_pretrained

    def spy(*args, **kwargs):
        asked.append(kwargs)
        return load(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoImageProcessor, "from_pretrained", spy)
    for kind in ("dino", "siglip", "clip"):
        emb = Embedder(kind, metric_models[kind])
        assert "Fast" not in type(emb.processor).__name__
    assert len(asked) == 3 and all(a.get("backend") == "pil" or a.get("use_fast") is False for a in asked)


def test_generated_copy_of_the_reference_scores_one(setup):
    tmp, argv = setup
    rows = evaluate.main(argv(), make_generator=FakeGenerator(image=tmp / "refs" / "0.jpg"))
    # mean over the 3 references: 1 for the reference itself plus its similarity to the two others
    emb = Embedder("dino", argv().dino).images([str(tmp / "refs" / f"{i}.jpg") for i in range(3)])
    expected = (emb[0] @ emb.T).mean().item()
    for r in rows:
        assert abs(r["image_dino_mean"] - expected) < 1e-5 and r["image_dino_se"] < 1e-6


def direct_scores(images, base_prompts, refs, folders):
    """Per-image scores computed straight from the transformers models' forward passes."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel, Dinov2Model, SiglipModel
    out = {}
    with torch.no_grad():
        proc = AutoImageProcessor.from_pretrained(folders["dino"])
        dino = Dinov2Model.from_pretrained(folders["dino"])
        g = dino(pixel_values=proc(images=images, return_tensors="pt").pixel_values).pooler_output
        r = dino(pixel_values=proc(images=refs, return_tensors="pt").pixel_values).pooler_output
        out["image_dino"] = torch.nn.functional.cosine_similarity(g[:, None], r[None], dim=-1).mean(1)
        for kind, cls, length in (("siglip", SiglipModel, 64), ("clip", CLIPModel, 77)):
            proc, tok = AutoImageProcessor.from_pretrained(folders[kind]), AutoTokenizer.from_pretrained(folders[kind])
            model = cls.from_pretrained(folders[kind])
            t = tok(base_prompts, padding="max_length", max_length=length, return_tensors="pt")
            # SigLIP's processor gives no attention mask; CLIP's does, and it must not matter (causal, EOS-pooled)
            mask = t.attention_mask if kind == "clip" else None
            o = model(input_ids=t.input_ids, attention_mask=mask,
                      pixel_values=proc(images=images, return_tensors="pt").pixel_values)
            out[f"text_{kind}"] = (o.image_embeds * o.text_embeds).sum(-1)
    return {k: v.numpy().astype(np.float64) for k, v in out.items()}


def test_numbers_equal_a_direct_computation(setup, metric_models):
    tmp, argv = setup
    rows = evaluate.main(argv(), make_generator=FakeGenerator())
    prompts = ["a <dog> in the snow", "a <dog> on the beach, at noon", "a red <dog>"]
    refs = [Image.open(tmp / "refs" / f"{i}.jpg").convert("RGB") for i in range(3)]
    assert len(rows) == 2 * 3
    keys = [([r["method"]], p, s, None if r["w_con"] == "cfg" else float(r["w_con"]))
            for r in rows for p in prompts for s in (0, 1)]
    expected = direct_scores([random_image(list(k)) for k in keys], [k[1].replace("<dog>", "dog") for k in keys],
                             refs, metric_models)
    for i, r in enumerate(rows):
        assert r["n"] == 6
        for name, v in expected.items():
            v = v[6 * i:6 * (i + 1)]
            assert abs(r[f"{name}_mean"] - v.mean()) < 1e-5, name
            assert abs(r[f"{name}_se"] - v.std(ddof=1) / np.sqrt(len(v))) < 1e-5, name


def test_class_subject_scores_every_method_against_one_text(setup):
    tmp, argv = setup

    class NoToken(FakeGenerator):  # "db" learned no token: its base prompt keeps <dog>, as a rare identifier
        def __call__(self, args, loras):
            draw, base = super().__call__(args, loras)
            return draw, (lambda prompt: prompt) if "db" in loras[0] else base
    want = evaluate.main(argv("--out", str(tmp / "a")), make_generator=FakeGenerator())  # both: "a dog in the snow"
    with pytest.warns(UserWarning, match="scored against different texts .'a <dog> in the snow', 'a dog in the snow'"):
        mixed = evaluate.main(argv("--out", str(tmp / "b")), make_generator=NoToken())
    assert mixed[:3] == want[:3]  # DCO's rows; DreamBooth's text scores are of other texts
    assert all(a["text_clip_mean"] != b["text_clip_mean"] for a, b in zip(mixed[3:], want[3:]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert evaluate.main(argv("--out", str(tmp / "c"), "--class-subject", "dog"), make_generator=NoToken()) == want
    with open(tmp / "c" / "scores.csv") as f:
        assert {row["scored_text"] for row in csv.DictReader(f)} == {"a dog in the snow", "a dog on the beach, at noon",
                                                                     "a red dog"}


def test_csv_table_and_plot_are_written(setup, monkeypatch):
    tmp, argv = setup
    axes, plot_pareto = [], evaluate.plot_pareto
    monkeypatch.setattr(evaluate, "plot_pareto", lambda rows, x, y, path, **kw: axes.append((x, y)) or
                        plot_pareto(rows, x, y, path, **kw))
    rows = evaluate.main(argv(metrics=("dino", "siglip")), make_generator=FakeGenerator())
    assert axes == [("text_siglip", "image_dino")]  # the paper's figure: text similarity on x, image on y
    out = tmp / "out"
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [(t["method"], t["w_con"]) for t in table] == [(m, w) for m in (str(tmp / "dco.safetensors"),
                                                                           str(tmp / "db.safetensors"))
                                                          for w in ("cfg", "0", "2")]
    assert set(table[0]) == {"method", "w_con", "n", "image_dino_mean", "image_dino_se", "text_siglip_mean",
                             "text_siglip_se"}
    assert float(table[3]["text_siglip_mean"]) == pytest.approx(rows[3]["text_siglip_mean"])
    with open(out / "scores.csv") as f:
        scores = list(csv.DictReader(f))
    assert len(scores) == 2 * 3 * 3 * 2 and scores[1]["prompt"] == "a <dog> in the snow" and scores[1]["seed"] == "1"
    md = (out / "results.md").read_text().splitlines()
    assert md[0].startswith("| method | w_con | n | image_dino | text_siglip |") and len(md) == 2 + 6
    assert "±" in md[2]
    plot = np.asarray(Image.open(out / "pareto.png").convert("RGB"))
    assert plot.shape == (650, 900, 3)
    for color in evaluate.COLORS[:2]:  # one curve per LoRA
        assert (plot == color).all(-1).sum() > 50
    assert not (plot == evaluate.COLORS[2]).all(-1).any()


def test_prompts_w_con_and_the_table_cells(tmp_path):
    (tmp_path / "p.txt").write_text("a {} in the snow\n# a comment\n{} on a table\n")
    assert evaluate.read_prompts(str(tmp_path / "p.txt"), "<dog>", ", in watercolor") == [
        "a <dog> in the snow, in watercolor", "<dog> on a table, in watercolor"]
    assert evaluate.parse_w_con("0, cfg ,2.5") == [0.0, None, 2.5]
    entries = [dict(method="m", w_con=w) for w in (None, 1.0, 1.0, 1.0)]
    scores = {"s": np.array([0.9, 0.1, 0.2, 0.6])}
    one, three = evaluate.summarize(entries, scores)
    assert (one["n"], one["s_mean"], np.isnan(one["s_se"])) == (1, 0.9, True)  # one image: no standard error
    se = np.std([0.1, 0.2, 0.6], ddof=1) / np.sqrt(3)
    assert (three["w_con"], three["n"]) == ("1", 3) and three["s_se"] == pytest.approx(se)
    assert evaluate.to_markdown([three], ["s"]).splitlines()[2] == f"| m | 1 | 3 | 0.3000 ± {se:.4f} |"
    assert evaluate.to_markdown([one], ["s"]).splitlines()[2] == "| m | cfg | 1 | 0.9000 |"  # not ± nan


def test_a_text_metric_reads_a_long_prompt_as_its_first_tokens(metric_models):
    clip = Embedder("clip", metric_models["clip"])
    long = "a " * 100  # past CLIP's 77 positions: the tail is cut, as SDXL's text encoders cut it
    a, b = clip.texts([long + "dog", long + "cat"])
    assert torch.equal(a, b)


def test_clip_alone_scores_and_plots_the_text(setup):
    tmp, argv = setup
    rows = evaluate.main(argv(metrics=("dino", "clip")), make_generator=FakeGenerator())
    assert "text_clip_mean" in rows[0] and "text_siglip_mean" not in rows[0]
    assert (tmp / "out" / "pareto.png").exists()


def test_the_image_cache_keys_on_the_device(setup, monkeypatch):
    _, argv = setup
    args = argv()
    on_cpu = evaluate.base_model_id(args)
    monkeypatch.setattr(evaluate.cli, "resolve_device", lambda device, dtype: (torch.device("cuda"), torch.float32))
    assert evaluate.base_model_id(args) != on_cpu  # kernels differ: a GPU's images are not the CPU's


def test_plot_puts_each_point_at_its_values(tmp_path):
    """Method A has the lower text and higher image similarity: its marker must be top-left, B's bottom-right."""
    rows = [dict(method=m, w_con="cfg", n=4, t_mean=x, t_se=0.01, i_mean=y, i_se=0.01)
            for m, x, y in (("A", 0.2, 0.8), ("B", 0.3, 0.5))]
    evaluate.plot_pareto(rows, "t", "i", str(tmp_path / "p.png"))
    plot = np.asarray(Image.open(tmp_path / "p.png").convert("RGB"))
    h, w = plot.shape[0] // 2, plot.shape[1] // 2
    a, b = [(plot == color).all(-1) for color in evaluate.COLORS[:2]]
    assert a[:h, :w].sum() > 30 and not a[h:, w:].any()  # the legend is top-right, outside both quadrants
    assert b[h:, w:].sum() > 30 and not b[:h, :w].any()
    # One method's curve through its numeric w_con, not through its cfg point (bottom-right); more methods than colors
    rows = [dict(method="A", w_con=w, n=4, t_mean=x, t_se=0.0, i_mean=y, i_se=0.0)
            for w, x, y in (("0", 0.1, 0.9), ("1", 0.15, 0.85), ("cfg", 0.9, 0.1))]
    rows += [dict(method=f"M{k}", w_con="cfg", n=4, t_mean=0.5, t_se=0.0, i_mean=0.5, i_se=0.0) for k in range(7)]
    evaluate.plot_pareto(rows, "t", "i", str(tmp_path / "q.png"))
    a = (np.asarray(Image.open(tmp_path / "q.png").convert("RGB")) == evaluate.COLORS[0]).all(-1)
    assert a[h - 100:h + 100, w - 100:w + 100].sum() < 10  # no line across the middle to the cfg point


def test_interrupted_run_resumes_without_recomputing(setup):
    tmp, argv = setup
    first = FakeGenerator(interrupt_at=5)
    with pytest.raises(KeyboardInterrupt):
        evaluate.main(argv(), make_generator=first)
    images = tmp / "out" / "images"
    assert sorted(os.listdir(images)) == sorted([f"{k}.png" for k in json.loads((images / "index.json").read_text())]
                                                + ["index.json"])
    assert len(os.listdir(images)) == 5 + 1  # five finished images and the index, nothing half-written

    second = FakeGenerator()
    evaluate.main(argv(), make_generator=second)
    total = 2 * 3 * 3 * 2
    assert len(second.drawn) == total - 5 and not set(first.drawn) & set(second.drawn)

    third = FakeGenerator()
    evaluate.main(argv(), make_generator=third)
    assert third.loads == [] and third.drawn == []  # everything cached: SDXL is not even loaded
    index = json.loads((images / "index.json").read_text())
    gone = next(iter(index))
    os.remove(images / index[gone]["file"])
    again = FakeGenerator()
    evaluate.main(argv(), make_generator=again)
    assert len(again.drawn) == 1 and (images / index[gone]["file"]).exists()  # a deleted image is made again
    steps = FakeGenerator()
    evaluate.main(argv("--steps", "20"), make_generator=steps)
    assert len(steps.drawn) == total  # other sampling steps: nothing reused

    (tmp / "db.safetensors").write_bytes(b"retrained")
    fourth = FakeGenerator()
    evaluate.main(argv("--cfg", "7.5", loras=("dco",)), make_generator=fourth)
    assert len(fourth.drawn) == total // 2  # new sampling settings: nothing reused
    fifth = FakeGenerator()
    evaluate.main(argv(), make_generator=fifth)
    assert {d[0] for d in fifth.drawn} == {(str(tmp / "db.safetensors"),)}  # only the changed LoRA
    assert len(fifth.drawn) == total // 2
    sixth = FakeGenerator()
    evaluate.main(argv("--dtype", "bfloat16"), make_generator=sixth)
    assert len(sixth.drawn) == total  # another precision: nothing reused
    seventh = FakeGenerator()
    evaluate.main(argv("--negative-prompt", "blurry"), make_generator=seventh)
    assert len(seventh.drawn) == total  # another negative prompt: nothing reused
    (tmp / "sdxl" / "unet").mkdir(parents=True)
    (tmp / "sdxl" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"new base weights")
    seventh = FakeGenerator()
    evaluate.main(argv(), make_generator=seventh)
    assert len(seventh.drawn) == total  # another base model at the same path: nothing reused
    weights = tmp / "sdxl" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"new base retrain")  # the same size, as retrained safetensors are
    os.utime(weights, (1e9, 1e9))
    eighth = FakeGenerator()
    evaluate.main(argv(), make_generator=eighth)
    assert len(eighth.drawn) == total  # its weights rewritten: nothing reused
    (tmp / "sdxl" / "vae").mkdir()
    (tmp / "sdxl" / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"another VAE")
    vae = FakeGenerator()
    evaluate.main(argv(), make_generator=vae)
    assert len(vae.drawn) == total  # another VAE decodes other images
    ninth, tenth = FakeGenerator(), FakeGenerator()
    evaluate.main(argv("--compile"), make_generator=ninth)
    evaluate.main(argv(), make_generator=tenth)
    assert len(ninth.drawn) == total and tenth.drawn == []  # compiled images apart from the eager ones, both kept
    (tmp / "e.safetensors").write_bytes(b"token")
    runs = [FakeGenerator() for _ in range(3)]
    evaluate.main(argv("--embeds", str(tmp / "e.safetensors") + ":<dog>:dog"), make_generator=runs[0])
    (tmp / "e.safetensors").write_bytes(b"token, retrained")
    evaluate.main(argv("--embeds", str(tmp / "e.safetensors") + ":<dog>:dog"), make_generator=runs[1])
    evaluate.main(argv("--embeds", str(tmp / "e.safetensors") + ":<cat>:cat"), make_generator=runs[2])
    assert [len(r.drawn) for r in runs] == [total] * 3  # learned tokens given, then retrained, then named otherwise


def test_a_lora_digest_covers_its_learned_tokens_and_peft_config(tmp_path):
    folder = tmp_path / "dog"
    folder.mkdir()
    (folder / "pytorch_lora_weights.safetensors").write_bytes(b"lora")
    (folder / "learned_embeds.safetensors").write_bytes(b"token")
    first = evaluate.weights_digest(str(folder))
    (folder / "learned_embeds.safetensors").write_bytes(b"token, retrained")
    second = evaluate.weights_digest(str(folder) + ":0.8")
    (folder / "pytorch_lora_weights.safetensors").write_bytes(b"lora, retrained")
    assert len({first, second, evaluate.weights_digest(str(folder))}) == 3
    peft = tmp_path / "peft"  # peft's folder: the lora_alpha in adapter_config.json sets the LoRA's strength
    peft.mkdir()
    (peft / "adapter_model.safetensors").write_bytes(b"lora")
    (peft / "adapter_config.json").write_text('{"lora_alpha": 4}')
    digests = [evaluate.weights_digest(str(peft)), evaluate.weights_digest(str(peft / "adapter_model.safetensors"))]
    (peft / "adapter_config.json").write_text('{"lora_alpha": 16}')
    assert digests[0] == digests[1] != evaluate.weights_digest(str(peft))


def test_merge_mode_scores_subject_and_style(setup):
    tmp, argv = setup
    fake = FakeGenerator(image=tmp / "style" / "0.png")
    subject, style = str(tmp / "dco.safetensors"), str(tmp / "sty.safetensors")
    rows = evaluate.main(argv("--subject-lora", subject, "--style-lora", style + ":0.8", "--style-images",
                              str(tmp / "style"), loras=()), make_generator=fake)
    assert fake.loads == [[subject, style + ":0.8"]]  # both LoRAs applied at once
    dino = Embedder("dino", argv().dino)
    emb = dino.images([str(tmp / "style" / f"{i}.png") for i in range(3)])
    refs = dino.images([str(tmp / "refs" / f"{i}.jpg") for i in range(3)])
    for r in rows:  # every image is the first style image: scored against the style images, then the subject's
        assert r["method"] == f"{subject} + {style}:0.8"
        assert abs(r["style_dino_mean"] - (emb[0] @ emb.T).mean().item()) < 1e-5
        assert abs(r["subject_dino_mean"] - (emb[0] @ refs.T).mean().item()) < 1e-5
        assert {"text_siglip_mean", "text_clip_mean"} <= set(r)
    assert (tmp / "out" / "pareto.png").exists()


@pytest.mark.parametrize("change,message", [
    (lambda t, a: setattr(a, "dino", str(t / "nowhere")), "--dino .*nowhere: no model.safetensors"),
    (lambda t, a: setattr(a, "siglip", str(t / "refs")), "--siglip .*refs: no model.safetensors"),
    (lambda t, a: (t / "prompts.txt").write_text("# only a comment\n\n"), "prompts.txt: no prompts"),
    (lambda t, a: setattr(a, "subject", None), "give the subject phrase with --subject"),
    (lambda t, a: setattr(a, "ref_images", str(t / "style" / "none")), "--ref-images .*none: no such folder"),
    (lambda t, a: setattr(a, "lora", [str(t / "missing.safetensors")]), "missing.safetensors: not found"),
    (lambda t, a: setattr(a, "w_con", "1,x"), "--w-con '1,x': expected numbers or 'cfg'"),
    (lambda t, a: setattr(a, "style_lora", ["x"]), "merge mode needs"),
    (lambda t, a: a.__dict__.update(subject_lora=[str(t / "dco.safetensors")], style_images=str(t / "style"), lora=[],
                                    style_lora=[str(t / "sty.safetensors"), str(t / "db.safetensors")]),
     "merge mode needs as many"),
    (lambda t, a: a.__dict__.update(subject_lora=[str(t / "dco.safetensors")], style_images=str(t / "style"),
                                    style_lora=[str(t / "sty.safetensors")]), "and no --lora"),
    (lambda t, a: setattr(a, "w_con", "cfg,1,cfg"), "repeated"),
    (lambda t, a: setattr(a, "w_con", "1,inf"), "finite"),
    (lambda t, a: setattr(a, "dino", a.siglip), "a siglip checkpoint, not dinov2"),
    (lambda t, a: setattr(a, "seeds", 0), "--seeds 0"),
    (lambda t, a: setattr(a, "w_con", "cfg,1,1"), "repeated"),
    (lambda t, a: setattr(a, "w_con", "1,nan"), "finite"),
    (lambda t, a: setattr(a, "lora", a.lora[:1] * 2), "given twice"),
    (lambda t, a: (t / "prompts.txt").write_bytes("a {} in the café".encode("latin-1")), "prompts.txt: not UTF-8"),
    (lambda t, a: (t / "prompts.txt").write_text("a {} in the snow\na {} on a beach\na {} in the snow \n"),
     "prompts.txt: the prompt 'a {} in the snow' is repeated"),  # its images would count twice
    (lambda t, a: (os.makedirs(t / "out" / "images"), (t / "out" / "images" / "index.json").write_text('{"a": ')),
     "index.json: not a readable image index"),
    (lambda t, a: setattr(a, "siglip", a.dino), "a dinov2 checkpoint, not siglip"),  # before its tokenizer fails
    (lambda t, a: (t / "prompts.txt").write_text("a <dog> in the snow\n"),
     "no prompt has a {} placeholder for the subject phrase"),  # --subject would be dropped unsaid
    (lambda t, a: (t / "refs" / "1.jpg").write_bytes((t / "refs" / "1.jpg").read_bytes()[:200]),
     "1.jpg: not a readable image"),
])
def test_bad_input_is_one_clear_error(setup, change, message):
    """Refused before any image is generated: on SDXL a sweep takes hours."""
    tmp, argv = setup
    args = argv()
    change(tmp, args)
    with pytest.raises(ModelError, match=message):
        evaluate.main(args, make_generator=lambda *a: pytest.fail("an image was generated before the error"))


def test_a_partial_or_damaged_metric_checkpoint_is_refused(metric_models, tmp_path):
    """transformers would fill a missing weight with a random one, and the metric would be noise."""
    import shutil
    from safetensors.torch import load_file, save_file
    folder = tmp_path / "dino"
    shutil.copytree(metric_models["dino"], folder)
    weights = folder / "model.safetensors"
    whole = weights.read_bytes()
    tensors = load_file(weights)
    save_file({k: v for k, v in tensors.items() if not k.endswith("layernorm.weight")}, weights, {"format": "pt"})
    with pytest.raises(ModelError, match="lacks the weight .*layernorm.weight"):
        Embedder("dino", str(folder))
    name = next(k for k in tensors if k.endswith("layernorm.weight"))
    save_file({**tensors, name: tensors[name][:16]}, weights, {"format": "pt"})  # mis-shaped: random if loaded
    # transformers 5.24 refuses it itself; versions that report it as a mismatched key are refused by evaluate.py
    with pytest.raises(ModelError, match=f"--dino .*(lacks the weight '{name}' \\(or it is mis-shaped\\)|cannot load)"):
        Embedder("dino", str(folder))
    weights.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ModelError, match="--dino .*: cannot load"):
        Embedder("dino", str(folder))


def test_a_load_error_is_named_by_its_first_words(metric_models, monkeypatch):
    """transformers' message for a missing SentencePiece starts with a blank line: that line alone said nothing."""
    import transformers

    def fail(*args, **kwargs):
        raise ImportError("\n requires the SentencePiece library but it was not found in your environment.\n...")
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fail)
    with pytest.raises(ModelError, match="cannot load: requires the SentencePiece library but it was not found"):
        Embedder("siglip", metric_models["siglip"])


def test_cli_reports_bad_input_in_one_line(setup, metric_models):
    tmp, _ = setup
    (tmp / "empty").mkdir()
    (tmp / "empty" / "notes.txt").write_text("not an image")
    r = run_script("evaluate.py", "--model", tmp, "--lora", tmp / "dco.safetensors", "--ref-images", tmp / "empty",
                   "--prompts", tmp / "prompts.txt", "--subject", "dog", "--dino", metric_models["dino"],
                   "--siglip", metric_models["siglip"], check=False)
    assert r.returncode != 0
    message = f"error: --ref-images {tmp / 'empty'}: no images ({', '.join(IMAGE_SUFFIXES)})"
    assert r.stderr.strip().splitlines() == [message]


def test_make_generator_calls_the_sampling_api(monkeypatch):
    """make_generator's calls to sample.py, recorded, and bound to the real functions' signatures."""
    calls = {}

    def record(name, result):
        signature = inspect.signature(getattr(sample, name))

        def fake(*a, **kw):
            signature.bind(*a, **kw)
            calls[name] = (a, kw)
            return result
        monkeypatch.setattr(sample, name, fake)

    compiled = []
    pipe = SimpleNamespace(unet=SimpleNamespace(compile_blocks=lambda: compiled.append(True)), tokens={"<dog>": "dog"})
    record("load_pipeline", pipe)
    record("generate", torch.full((1, 3, 8, 8), 0.5))
    record("base_prompt", "a dog")
    record("warn_unloaded_tokens", None)
    record("check_sides", None)
    argv = ["--model", "sdxl", "--lora", "x", "--ref-images", "r", "--prompts", "p", "--dino", "d", "--cfg", "7",
            "--steps", "12", "--width", "768", "--height", "512", "--dtype", "float16", "--config", "cfg",
            "--cuda-graph"]
    draw, base = evaluate.make_generator(evaluate.parse_args(argv), ["subject/", "style.safetensors:0.5"])
    assert calls["load_pipeline"] == (("sdxl",), dict(loras=["subject/", "style.safetensors:0.5"], embeds=[],
                                                      device="auto", dtype="float16", config="cfg"))
    assert calls["check_sides"] == (("sdxl", "cfg"), dict(width=768, height=512))
    image = draw("a <dog>", 3, 2.0)
    assert calls["generate"] == ((pipe, "a <dog>", 3), dict(w_con=2.0, cfg=7.0, steps=12, width=768, height=512,
                                                            negative_prompt="", graph=True))
    assert image.size == (8, 8) and image.getpixel((0, 0)) == (128, 128, 128)
    assert calls["warn_unloaded_tokens"] == ((pipe, "a <dog>"), {})
    assert base("a <dog>") == "a dog" and calls["base_prompt"] == ((pipe.tokens, "a <dog>"), {})
    assert not compiled
    # --compile: the UNet's transformer blocks, once for each pipeline loaded
    evaluate.make_generator(evaluate.parse_args([*argv, "--compile"]), ["subject/"])
    assert compiled == [True]
    # --embeds: learned tokens for every LoRA, as sample.py loads them (the official code's files name none)
    evaluate.make_generator(evaluate.parse_args([*argv, "--embeds", "e.safetensors:<dog>:dog"]), ["subject/"])
    assert calls["load_pipeline"][1]["embeds"] == ["e.safetensors:<dog>:dog"]


def test_cli_end_to_end_with_the_tiny_sdxl(tiny_sdxl, trained, metric_models, tmp_path):
    """The real generator: a train.py output folder (LoRA + learned <dog> token) on the tiny SDXL, through the CLI."""
    (tmp_path / "refs").mkdir()
    random_image(["ref"]).save(tmp_path / "refs" / "0.png")
    (tmp_path / "prompts.txt").write_text("a red {}\n")
    out = tmp_path / "out"
    run_script("evaluate.py", "--model", tiny_sdxl[0], "--lora", trained, "--ref-images", tmp_path / "refs",
               "--prompts", tmp_path / "prompts.txt", "--subject", "<dog>", "--seeds", 1, "--w-con", "cfg,0",
               "--steps", 2, "--width", 32, "--height", 32, "--dino", metric_models["dino"],
               "--siglip", metric_models["siglip"], "--out", out, "--device", "cpu")
    with open(out / "results.csv") as f:
        assert [(t["w_con"], t["n"]) for t in csv.DictReader(f)] == [("cfg", "1"), ("0", "1")]
    index = {e["w_con"]: e for e in json.loads((out / "images" / "index.json").read_text()).values()}
    assert index[None]["base_prompt"] == "a red dog"  # the learned token came with the output folder
    pixels = {w: np.asarray(Image.open(out / "images" / index[w]["file"])).astype(int) for w in (None, 0.0)}
    assert pixels[None].shape == (32, 32, 3)
    assert np.abs(pixels[None] - pixels[0.0]).max() > 0  # fine-tuned CFG differs from the base model's
    # Sides the model cannot take are refused from its configs, before it loads (the tiny model's multiple is 8)
    args = evaluate.parse_args(["--model", tiny_sdxl[0], "--lora", trained, "--ref-images", "r", "--prompts", "p",
                                "--dino", "d", "--width", "60", "--height", "32"])
    with pytest.raises(ModelError, match="^--width 60 must be a multiple of 8 for this model$"):
        evaluate.make_generator(args, [trained])


def test_impossible_sampling_settings_are_refused_before_anything_loads(capsys):
    required = ["--model", "m", "--lora", "x", "--ref-images", "r", "--prompts", "p", "--dino", "d"]
    for bad, needle in [(["--cfg", "nan"], "expected a number"), (["--steps", "0"], "positive whole number"),
                        (["--steps", "1001"], "--steps can be at most 1000"), (["--width", "-64"], "positive whole"),
                        (["--seeds", "0"], "positive whole number"),
                        (["--lora", "out/y:x"], "expected PATH[:SCALE], the scale a number, got 'out/y:x'"),
                        (["--subject-lora", "out/s:inf"], "got 'out/s:inf'"),
                        (["--style-lora", "out/s:1,5"], "got 'out/s:1,5'")]:
        with pytest.raises(SystemExit):
            evaluate.parse_args(required + bad)
        assert needle in capsys.readouterr().err
