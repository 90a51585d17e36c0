"""LoRA math, file formats, and interchange with diffusers/peft."""

import copy
import json
import re

import pytest
import torch
from safetensors.torch import save_file

import lora as lora_lib
from checkpoint import ModelError, load_unet, save_safetensors
from unet_sdxl import UNet, UNetConfig

from conftest import ROOT  # noqa: F401  (conftest puts the project on sys.path)


def inputs(B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 4, 8, 8, generator=g), torch.tensor([900.0, 500.0, 20.0][:B]),
            torch.randn(B, 77, 32, generator=g), torch.randn(B, 32, generator=g),
            torch.tensor([[64.0, 64, 0, 0, 64, 64]] * B))


def randomize(unet, seed=1, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_lib.lora_modules(unet).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * std)


@torch.no_grad()
def test_zero_lora_and_scale_zero_are_the_base_model():
    torch.manual_seed(0)
    unet = UNet(UNetConfig.tiny())
    x = inputs()
    base = unet(*x)
    lora_lib.inject(unet, rank=4)
    assert torch.equal(unet(*x), base)  # B = 0 at init
    randomize(unet)
    assert not torch.allclose(unet(*x), base)
    with lora_lib.lora_scale(unet, 0.0):
        assert torch.equal(unet(*x), base)
    with lora_lib.lora_scale(unet, torch.zeros(3)):
        assert torch.allclose(unet(*x), base, atol=1e-6)
    with pytest.raises(KeyboardInterrupt), lora_lib.lora_scale(unet, 0.0):
        raise KeyboardInterrupt
    assert {m.scale for m in lora_lib.lora_modules(unet).values()} == {1.0}  # restored, even after an exception
    assert not torch.allclose(unet(*x), base)


@torch.no_grad()
def test_per_sample_scales_equal_separate_calls():
    torch.manual_seed(0)
    unet = UNet(UNetConfig.tiny())
    lora_lib.inject(unet, rank=4, alpha=8.0)  # alpha != rank: the factor alpha / rank applies on both paths
    randomize(unet)
    x = inputs()
    scales = torch.tensor([0.0, 1.0, 0.5])
    with lora_lib.lora_scale(unet, scales):
        batched = unet(*x)
    for i, s in enumerate(scales.tolist()):
        with lora_lib.lora_scale(unet, s):
            single = unet(*(v[i:i + 1] for v in x))
        torch.testing.assert_close(batched[i:i + 1], single, rtol=1e-5, atol=1e-5)
    for wrong in (torch.tensor([1.0]), torch.tensor(1.0), torch.ones(3, 1)):  # would broadcast over the batch of 3
        with lora_lib.lora_scale(unet, wrong), pytest.raises(ValueError, match="per-sample LoRA scales of shape"):
            unet(*x)


@torch.no_grad()
def test_a_frozen_lora_in_the_activations_dtype_gives_the_same_output():
    """sample.py stores a frozen LoRA in bf16 rather than casting the fp32 one on every call: the same numbers."""
    torch.manual_seed(0)
    unet = UNet(UNetConfig.tiny()).to(torch.bfloat16)
    lora_lib.inject(unet, rank=4)
    randomize(unet)
    trained = lora_lib.get_lora(unet)
    x = [v.to(torch.bfloat16) for v in inputs()]
    want = unet(*x)
    lora_lib.remove(unet)
    lora_lib.apply_lora(unet, trained, torch.bfloat16)
    assert {p.dtype for p in unet.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for m in lora_lib.lora_modules(unet).values() for p in (m.lora_A, m.lora_B))
    assert torch.equal(unet(*x), want)
    with lora_lib.lora_scale(unet, torch.tensor([0.0, 1.0, 0.5], dtype=torch.bfloat16)):
        mixed = unet(*x)
    torch.testing.assert_close(mixed[1], want[1], rtol=0, atol=0)


def test_default_targets_are_the_attention_projections():
    unet = UNet(UNetConfig.tiny())
    lora_lib.inject(unet, rank=2)
    names = list(lora_lib.lora_modules(unet))
    blocks = sum(len(st.transformer_blocks) for st in unet.modules() if hasattr(st, "transformer_blocks"))
    assert len(names) == blocks * 2 * 4  # attn1 and attn2, each q, k, v, out
    assert all(n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") or n.endswith("to_out.0") for n in names)


def test_kohya_keys_use_official_module_names():
    unet = UNet(UNetConfig.tiny())
    lora_lib.inject(unet, rank=2)
    keys = lora_lib.to_kohya(lora_lib.get_lora(unet))
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_middle_block_1_transformer_blocks_1_attn2_to_out_0.lora_up.weight" in keys
    assert "lora_unet_output_blocks_2_1_transformer_blocks_0_attn2_to_k.alpha" in keys
    assert len(keys) == 3 * len(lora_lib.lora_modules(unet))


def test_alpha_is_folded_exactly_into_every_format(tiny_sdxl):
    unet = load_unet(tiny_sdxl[0])
    lora_lib.inject(unet, rank=4, alpha=2.0)
    randomize(unet)
    x = inputs()
    with torch.no_grad():
        want = unet(*x)
    lora = lora_lib.get_lora(unet)
    # kohya trainers write up unscaled, with alpha beside it: here up = B and alpha = 2 for rank 4
    trainer_kohya = {k: v / 0.5 if k.endswith(".lora_up.weight") else torch.tensor(2.0) if k.endswith(".alpha") else v
                     for k, v in lora_lib.to_kohya(lora).items()}
    from diffusers.utils import convert_state_dict_to_kohya  # kohya keys from diffusers' module names
    peft_keys = {k.replace(".lora.down.", ".lora_A.").replace(".lora.up.", ".lora_B."): v
                 for k, v in lora_lib.to_diffusers(lora, unet.cfg).items()}
    diffusers_kohya = convert_state_dict_to_kohya(peft_keys)
    assert any(k.startswith("lora_unet_down_blocks_") for k in diffusers_kohya)
    for tensors in (lora_lib.to_diffusers(lora, unet.cfg), lora_lib.to_kohya(lora), trainer_kohya, diffusers_kohya):
        fresh = load_unet(tiny_sdxl[0])
        lora_lib.apply_lora(fresh, lora_lib.parse_lora(tensors, fresh.cfg, "test"))
        with torch.no_grad():
            torch.testing.assert_close(fresh(*x), want, rtol=1e-5, atol=1e-5)


def diffusers_pipe(folder):
    from diffusers import StableDiffusionXLPipeline
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ref_unet_out(pipe, x, scale=1.0):
    xs, t, ctx, pooled, ids = x
    with torch.no_grad():
        return pipe.unet(xs, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids},
                         cross_attention_kwargs={"scale": scale}).sample


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_our_files_load_in_diffusers(tiny_sdxl, tmp_path, fmt):
    folder = tiny_sdxl[0]
    unet = load_unet(folder)
    lora_lib.inject(unet, rank=4, alpha=8.0)
    randomize(unet)
    lora = lora_lib.get_lora(unet)
    # as merge.py writes a merge of LoRAs with other ranks and layers: rank 4 + 2 on to_q and to_v, 4 elsewhere
    g = torch.Generator().manual_seed(1)
    other = {name: (torch.randn(2, down.shape[1], generator=g) * 0.3, torch.randn(up.shape[0], 2, generator=g) * 0.3)
             for name, (down, up) in lora.items() if name.endswith(("to_q", "to_v"))}
    lora = lora_lib.merge([lora, other], [1.0, 0.5])
    lora_lib.remove(unet)
    lora_lib.apply_lora(unet, lora)
    tensors = lora_lib.to_diffusers(lora, unet.cfg) if fmt == "diffusers" else lora_lib.to_kohya(lora)
    save_file(tensors, str(tmp_path / "pytorch_lora_weights.safetensors"))
    pipe = diffusers_pipe(folder)
    pipe.load_lora_weights(str(tmp_path))
    x = inputs()
    with torch.no_grad():
        ours = unet(*x)
    base = ref_unet_out(pipe, x, scale=0.0)
    assert (ours - base).abs().max() > 1e-2  # the LoRA does something, so agreement below means something
    torch.testing.assert_close(ref_unet_out(pipe, x), ours, rtol=1e-4, atol=1e-4)


def peft_lora(folder, **config):
    """A random peft LoRA on diffusers' UNet, as the official code trains one -> (pipe, its LoraConfig, UNet output)."""
    from peft import LoraConfig
    pipe = diffusers_pipe(folder)
    config = LoraConfig(init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"], **config)
    pipe.unet.add_adapter(config)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return pipe, config, ref_unet_out(pipe, inputs())


def test_we_read_peft_and_official_dco_files(tiny_sdxl):
    """A LoRA trained the official way (peft on the diffusers UNet) reads into our UNet with equal outputs."""
    from peft import get_peft_model_state_dict
    from diffusers.utils import convert_state_dict_to_diffusers
    folder = tiny_sdxl[0]
    pipe, _, want = peft_lora(folder, r=4, lora_alpha=4)
    peft_sd = get_peft_model_state_dict(pipe.unet)
    official = {f"unet.{k}": v for k, v in convert_state_dict_to_diffusers(peft_sd).items()}  # as customize.py saves
    assert any(k.endswith(".lora.down.weight") for k in official)
    # diffusers 0.19-0.20's names, after attention processors: attn1.processor.to_out_lora.down.weight
    old = r"\.(to_[qkv]|to_out)(\.0)?\.lora\."
    processors = {re.sub(old, r".processor.\1_lora.", k): v for k, v in official.items()}
    assert any(".processor.to_out_lora." in k for k in processors)
    for tensors in (peft_sd, official, processors):
        unet = load_unet(folder)
        lora_lib.apply_lora(unet, lora_lib.parse_lora(tensors, unet.cfg, "test"))
        with torch.no_grad():
            torch.testing.assert_close(unet(*inputs()), want, rtol=1e-4, atol=1e-4)


def test_alpha_in_a_diffusers_file_header_or_a_peft_config_is_applied(tiny_sdxl, tmp_path):
    """Newer diffusers files carry peft's LoraConfig (lora_alpha, alpha_pattern) in the safetensors header; peft's
    save_pretrained writes it beside the weights."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import get_peft_model_state_dict
    folder = tiny_sdxl[0]
    # diffusers' names; "attn1" ends no adapted module's name, so peft leaves lora_alpha there; attn2's to_k at rank 2
    pipe, config, want = peft_lora(folder, r=4, lora_alpha=8, alpha_pattern={
        "attn2.to_v": 2, "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": 16, "attn1": 32},
        rank_pattern={"attn2.to_k": 2})
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    type(pipe).save_lora_weights(str(tmp_path), unet_lora_layers=layers, unet_lora_adapter_metadata=config.to_dict())
    # peft's own save_pretrained folder: the same LoraConfig, in adapter_config.json beside the weights
    peft = tmp_path / "peft"
    config.save_pretrained(str(peft))
    save_file({f"base_model.model.{k}": v for k, v in get_peft_model_state_dict(pipe.unet).items()},
              str(peft / "adapter_model.safetensors"))
    pipe.unet.save_lora_adapter(str(tmp_path / "adapter"))  # one model's file: keys and config without "unet."
    for path in (tmp_path / "pytorch_lora_weights.safetensors", peft, tmp_path / "adapter"):
        unet = load_unet(folder)
        lora_lib.apply_lora(unet, lora_lib.read_lora(str(path), unet.cfg))
        with torch.no_grad():
            torch.testing.assert_close(unet(*inputs()), want, rtol=1e-4, atol=1e-4)
    # A config that cannot be read, or whose alphas are not numbers, is an error that names the file
    for text, message in (("{bad", "adapter_config.json: not a JSON file"),
                          ("[1]", "adapter_config.json: not a JSON object"),
                          ('{"lora_alpha": null}', "adapter_config.json: its LoRA config has no numeric lora_alpha")):
        (peft / "adapter_config.json").write_text(text)
        with pytest.raises(ModelError, match=message):
            lora_lib.read_lora(str(peft), unet.cfg)


def test_merge_is_exact_and_compress_reports_its_error():
    torch.manual_seed(0)
    cfg = UNetConfig.tiny()
    a, b = UNet(cfg), UNet(cfg)
    lora_lib.inject(a, rank=4)
    lora_lib.inject(b, rank=2, targets=("to_q", "to_v"))  # different ranks and targets
    randomize(a, 1)
    randomize(b, 2)
    la, lb = lora_lib.get_lora(a), lora_lib.get_lora(b)
    merged = lora_lib.merge([la, lb], [1.0, -0.5])  # a negative weight subtracts
    for name, (down, up) in merged.items():
        want = la[name][1] @ la[name][0] - (0.5 * lb[name][1] @ lb[name][0] if name in lb else 0)
        torch.testing.assert_close(up @ down, want, rtol=1e-5, atol=1e-6)
    full, err = lora_lib.compress(merged, rank=6)
    assert err < 1e-5  # rank 4 + 2 is representable exactly
    assert all(down.shape[0] <= 6 for down, _ in lora_lib.compress(merged, rank=64)[0].values())  # no zero padding
    small, err = lora_lib.compress(merged, rank=1)
    deltas = [(u @ d, su @ sd) for (d, u), (sd, su) in zip(merged.values(), small.values())]
    manual = (sum((x - y).pow(2).sum() for x, y in deltas) / sum(x.pow(2).sum() for x, _ in deltas)).sqrt()
    assert 0.05 < err and abs(err - manual.item()) < 1e-4


def test_bad_loras_are_refused_with_the_key_named(tiny_sdxl):
    unet = load_unet(tiny_sdxl[0])
    name = "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    with pytest.raises(ModelError, match="to_q.*another model"):
        lora_lib.apply_lora(unet, {name: (torch.zeros(4, 999), torch.zeros(64, 4))})
    with pytest.raises(ModelError, match="to_q.*low-rank pair"):
        lora_lib.apply_lora(unet, {name: (torch.zeros(4, 64), torch.zeros(64, 8))})
    with pytest.raises(ModelError, match="^f.safetensors: holds no LoRA weights$"):
        lora_lib.parse_lora({}, unet.cfg, "f.safetensors")
    with pytest.raises(ModelError, match="not a LoRA key this reader knows .a DoRA magnitude"):
        lora_lib.parse_lora({"unet.x.to_q.lora_magnitude_vector": torch.zeros(64)}, unet.cfg, "x")
    with pytest.raises(ModelError, match="no_such_block"):
        lora_lib.parse_lora({"unet.no_such_block.to_q.lora.down.weight": torch.zeros(4, 64)}, unet.cfg, "x")
    te = {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 16)}  # sorts first
    with pytest.raises(ModelError, match="lora_unet_no_such_block.* matches no module"):  # another model's LoRA
        lora_lib.parse_lora({**te, "lora_unet_no_such_block.lora_down.weight": torch.zeros(4, 64)}, unet.cfg, "x")
    with pytest.raises(ModelError, match="lora_te1_.* is a text-encoder LoRA"):  # this model's, with text encoders
        lora_lib.parse_lora({**te, f"lora_unet_{name.replace('.', '_')}.lora_down.weight": torch.zeros(4, 64),
                             f"lora_unet_{name.replace('.', '_')}.lora_up.weight": torch.zeros(64, 4)}, unet.cfg, "x")
    # Reading a file checks each pair against the UNet's layer, as applying it does: merge.py applies nothing
    kohya = "lora_unet_" + name.replace(".", "_")
    for down, up, message in ((torch.zeros(4, 999), torch.zeros(64, 4), "another model"),
                              (torch.zeros(4, 64), torch.zeros(64, 8), "low-rank pair"),
                              (torch.zeros(4, 64), torch.full((64, 4), float("nan")), "NaN or infinite"),
                              (torch.full((4, 64), float("inf")), torch.zeros(64, 4), "NaN or infinite")):
        with pytest.raises(ModelError, match=f"^f.safetensors: LoRA module '{name}'.*{message}"):
            lora_lib.parse_lora({f"{kohya}.lora_down.weight": down, f"{kohya}.lora_up.weight": up}, unet.cfg,
                                "f.safetensors")
    with pytest.raises(ModelError, match="'input_blocks.1.0.in_layers.2' is not a linear layer"):
        lora_lib.parse_lora({"lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight": torch.zeros(4, 32, 3, 3),
                             "lora_unet_input_blocks_1_0_in_layers_2.lora_up.weight": torch.zeros(32, 4, 1, 1)},
                            unet.cfg, "f.safetensors")
    with pytest.warns(UserWarning, match=r"adapts 1 layers; \d+ attention projections"):
        lora_lib.apply_lora(unet, {name: (torch.zeros(4, 64), torch.zeros(64, 4))})


def test_fuse_equals_base_plus_lora():
    """At the LoRA's strength alpha / rank and its scale, both folded into the weight."""
    torch.manual_seed(0)
    unet = UNet(UNetConfig.tiny())
    lora_lib.inject(unet, rank=4, alpha=8)
    randomize(unet)
    for m in lora_lib.lora_modules(unet).values():
        m.scale = 0.3
    x = inputs()
    storage = {name: m.weight.data_ptr() for name, m in lora_lib.lora_modules(unet).items()}
    with torch.no_grad():
        want = unet(*x)
        lora_lib.remove(unet, fold=True)
        assert not lora_lib.lora_modules(unet)
        torch.testing.assert_close(unet(*x), want, rtol=1e-5, atol=1e-5)
    # in place, in the weights' own memory: new tensors would leave the old ones' as holes between the layers
    assert all(unet.get_submodule(name).weight.data_ptr() == ptr for name, ptr in storage.items())


@torch.no_grad()
def test_folding_into_bf16_weights_loses_no_more_than_the_lora_apart():
    """sample.py folds the LoRA for plain CFG, rounding W + up @ down (summed in fp32) to bf16 once. Against fp32,
    the folded bf16 UNet's output is as close as the bf16 UNet's with the LoRA apart, for a LoRA whose product is
    small, comparable or as large as the weights (the ratio of the two errors ranged over 0.91-1.09 across 8 random
    UNets)."""
    torch.manual_seed(0)
    base = UNet(UNetConfig.tiny()).requires_grad_(False).to(torch.bfloat16).float()  # weights bf16 holds exactly
    x, g = inputs(), torch.Generator().manual_seed(1)
    for strength in (0.01, 0.2, 1.0):
        lora = {}
        for name in lora_lib.targets_in(base):
            w = base.get_submodule(name).weight
            down, up = torch.randn(4, w.shape[1], generator=g), torch.randn(w.shape[0], 4, generator=g)
            lora[name] = (down, up * strength * w.std() / (up @ down).std())

        def run(dtype, fold):
            unet = copy.deepcopy(base).to(dtype)
            lora_lib.apply_lora(unet, lora, dtype, fold)
            return unet(*(v.to(dtype) for v in x)).float()
        want = run(torch.float32, fold=False)
        folded, apart = ((run(torch.bfloat16, fold) - want).norm() / want.norm() for fold in (True, False))
        assert folded <= 1.25 * apart, (strength, folded, apart)
    # How the fold rounds, exactly: W + up @ down summed in fp32, rounded once to bf16
    unet = copy.deepcopy(base).to(torch.bfloat16)
    lora_lib.apply_lora(unet, lora, torch.bfloat16, fold=True)
    for name, (down, up) in lora.items():
        want = (base.get_submodule(name).weight + up @ down).to(torch.bfloat16)
        assert torch.equal(unet.get_submodule(name).weight, want), name


def test_compiled_blocks_equal_eager():
    """The compiled UNet follows every LoRA scale (float, per-sample, changed between calls) and trains the same.
    aot_eager keeps the test fast on a CPU; it runs the same graph capture and autograd as the default backend."""
    torch.manual_seed(0)
    unet = UNet(UNetConfig.tiny()).requires_grad_(False)
    params = lora_lib.inject(unet, rank=4)
    randomize(unet)
    x, scales = inputs(), [1.0, 0.0, 0.5, torch.tensor([0.0, 1.0, 0.5])]

    def run():
        with torch.no_grad():
            outs = []
            for s in scales:
                with lora_lib.lora_scale(unet, s):
                    outs.append(unet(*x))
        unet(*x).square().mean().backward()
        grads = [p.grad for p in params]
        for p in params:
            p.grad = None
        return outs, grads

    eager_outs, eager_grads = run()
    unet.compile_blocks(backend="aot_eager")
    outs, grads = run()
    assert not torch.allclose(eager_outs[0], eager_outs[1])
    for a, b in zip(outs + grads, eager_outs + eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def header_lora(tmp_path, rank=4):
    """A random tiny-model LoRA, and a function that writes it as a diffusers file with a peft config in its header
    (as save_lora_weights does) and returns the path."""
    torch.manual_seed(1)
    cfg = UNetConfig.tiny()
    unet = UNet(cfg)
    lora_lib.inject(unet, rank)
    for m in lora_lib.lora_modules(unet).values():
        torch.nn.init.normal_(m.lora_B)
    lora = lora_lib.get_lora(unet)

    def write(config, name="h.safetensors"):
        path = str(tmp_path / name)
        save_safetensors(lora_lib.to_diffusers(lora, cfg), path,
                         {"lora_adapter_metadata": json.dumps({f"unet.{k}": v for k, v in config.items()})})
        return path
    return cfg, lora, write


def assert_same_lora(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_lora_configs_are_read_as_peft_reads_them(tmp_path):
    cfg, lora, write = header_lora(tmp_path)
    # a float alpha counts (alpha 2 at rank 4: half strength)
    assert_same_lora(lora_lib.read_lora(write({"r": 4, "lora_alpha": 2.0}), cfg),
                     {k: (d, u * 0.5) for k, (d, u) in lora.items()})
    # an alpha_pattern key matches whole name parts: "ks.0.attn1.to_q" is no module's ending
    assert_same_lora(lora_lib.read_lora(write({"r": 4, "lora_alpha": 4, "alpha_pattern": {"ks.0.attn1.to_q": 16}}),
                                        cfg), lora)
    with pytest.raises(ModelError, match="rank-stabilized"):  # alpha / sqrt(rank): another strength
        lora_lib.read_lora(write({"r": 4, "lora_alpha": 8, "use_rslora": True}), cfg)
    # a config without lora_alpha has peft's default, in its alpha_pattern's other modules too
    from peft import LoraConfig
    default = LoraConfig(r=4).lora_alpha / 4
    assert_same_lora(lora_lib.read_lora(write({"r": 4}), cfg), {k: (d, u * default) for k, (d, u) in lora.items()})
    assert_same_lora(lora_lib.read_lora(write({"r": 4, "alpha_pattern": {"to_q": 16}}), cfg),
                     {k: (d, u * (4 if k.endswith("to_q") else default)) for k, (d, u) in lora.items()})
    # a peft config beside a diffusers file is not that file's: its alpha is not applied
    plain = str(tmp_path / lora_lib.DIFFUSERS_FILE)
    save_safetensors(lora_lib.to_diffusers(lora, cfg), plain)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 32}))
    assert_same_lora(lora_lib.read_lora(plain, cfg), lora)
    name, (down, _) = next(iter(lora.items()))  # half a module is one clear error
    with pytest.raises(ModelError, match="lacks its up matrix"):
        lora_lib.parse_lora({f"unet.{lora_lib.module_names(cfg)[name]}.lora.down.weight": down}, cfg, "x")
    # so is a module under two names (a kohya file's official and diffusers-derived names): which would count?
    kohya = lora_lib.to_kohya(lora)
    twice = {k.replace("lora_unet_" + name.replace(".", "_"),
                       "lora_unet_" + lora_lib.module_names(cfg)[name].replace(".", "_")): v
             for k, v in kohya.items() if k.startswith("lora_unet_" + name.replace(".", "_") + ".")}
    assert twice.keys().isdisjoint(kohya)
    with pytest.raises(ModelError, match=f"module {re.escape(repr(name))} its (down|up|alpha) a second time"):
        lora_lib.parse_lora({**kohya, **twice}, cfg, "x")


def test_training_alpha_scales_the_lora():
    base = torch.nn.Linear(3, 5)
    m = lora_lib.LoRALinear(base, rank=4, alpha=2.0)
    torch.nn.init.normal_(m.lora_B)
    with torch.no_grad():
        torch.testing.assert_close(m.delta(), m.lora_B @ m.lora_A * 0.5)
        x = torch.randn(2, 3)
        torch.testing.assert_close(m(x), base(x) + x @ (m.lora_B @ m.lora_A * 0.5).T)
        assert lora_lib.LoRALinear(base, rank=4, alpha=0.0).alpha == 0.0  # alpha 0 is no LoRA, not alpha = rank
        with torch.autocast("cpu", dtype=torch.bfloat16):  # a training loop of one's own under autocast
            y = m(x)
        torch.testing.assert_close(y.float(), m(x), rtol=2e-2, atol=2e-2)


def test_lora_helpers_keep_their_state_apart():
    torch.manual_seed(0)
    unet = UNet(UNetConfig.tiny())
    first = lora_lib.inject(unet, rank=2, targets=("to_q",))
    second = lora_lib.inject(unet, rank=2, targets=("to_k",))  # only the new layers' parameters
    assert len(first) == len(second) and not {id(p) for p in first} & {id(p) for p in second}
    snapshot = lora_lib.get_lora(unet)
    with torch.no_grad():
        for p in first:
            p.add_(1.0)  # training goes on after a save
    name = next(n for n in snapshot if n.endswith("to_q"))
    assert not torch.equal(snapshot[name][0], lora_lib.get_lora(unet)[name][0])
    with pytest.raises(ValueError):  # one weight for two LoRAs: the second would be dropped
        lora_lib.merge([snapshot, snapshot], [1.0])
    plain = UNet(UNetConfig.tiny())
    good = {n: pair for n, pair in snapshot.items() if n.endswith("to_q")}
    bad = {**good, name.replace("to_q", "to_k"): (torch.zeros(0, 16), torch.zeros(16, 0))}  # rank 0
    with pytest.raises(ModelError, match="do not make a linear low-rank pair"):
        lora_lib.apply_lora(plain, bad)
    assert not lora_lib.lora_modules(plain)  # nothing applied: a good LoRA then applies
    lora_lib.apply_lora(plain, good)
    assert len(lora_lib.lora_modules(plain)) == len(good)
