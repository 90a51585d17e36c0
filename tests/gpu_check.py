"""Full-size parity with diffusers, for a GPU machine (CI runs it with --tiny on the CPU so it cannot rot).

    python tests/gpu_check.py                # CUDA graphs; then the full SDXL UNet and VAE, random weights, 1024x1024
    python tests/gpu_check.py --tiny         # the same checks on the tiny configs (CPU: the CUDA graphs are skipped)
    python tests/gpu_check.py --only graphs  # only train.py and sample.py with --cuda-graph against without

Both stacks get the same random weights. Compared: the UNet's output, its input gradient (the training pass, ours
with gradient checkpointing), the UNet's output with the same random rank-32 LoRA (ours; peft's on diffusers) and
the VAE decoder's output. Passes when our fp32 output is within 1e-4 (relative to the output's
largest value) of diffusers' fp32 output, and our bf16 error against fp32 is no more than 1.5x diffusers' own.

The CUDA graph check runs train.py and sample.py on a tiny random model (the tests' fixture) in fp32, with and
without --cuda-graph: the losses, the trained files and the images must agree (see check_graphs).
"""
import argparse
import os
import sys
import tempfile
import traceback

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS, read when CUDA starts

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lora as lora_lib  # noqa: E402
from checkpoint import (unet_config_to_diffusers, unet_key_map, vae_config_to_diffusers,  # noqa: E402
                        vae_key_map)
from unet_sdxl import UNet, UNetConfig  # noqa: E402
from vae import AutoencoderKL, VAEConfig  # noqa: E402


def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def random_weights(model, seed):
    """Random weights with a scale that keeps activations finite through the full-depth network."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            fan_in = p[0].numel() if p.ndim > 1 else 1
            offset = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(torch.randn(p.shape, generator=g, device="cpu") / fan_in ** 0.5 + offset)  # the same on any device
    return model


def reference(cls, cfg, to_diffusers, ours, key_map):
    config = {k: v for k, v in to_diffusers(cfg).items() if k != "_class_name"}
    ref = cls(**config)
    mapping = key_map(cfg)
    ref.load_state_dict({mapping[k]: v for k, v in ours.state_dict().items()}, strict=True)
    return ref


def add_same_lora(unet, ref_unet, cfg, rank, seed):
    """The same random LoRA on both UNets: ours (LoRALinear, in-place addmm) and peft's on diffusers' modules."""
    from peft import LoraConfig
    unet.float(), ref_unet.float()  # so that both get the same fp32 values (compare left them in bf16)
    lora_lib.inject(unet, rank)
    ref_unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(lora_lib.TARGETS)))
    g = torch.Generator().manual_seed(seed)
    names, ref_modules = lora_lib.module_names(cfg), dict(ref_unet.named_modules())
    with torch.no_grad():
        for name, m in lora_lib.lora_modules(unet).items():
            for p in (m.lora_A, m.lora_B):  # B nonzero too, or the LoRA would add nothing
                p.copy_(torch.randn(p.shape, generator=g, device="cpu") / p.shape[1] ** 0.5)
            ref = ref_modules[names[name]]
            ref.lora_A["default"].weight.copy_(m.lora_A)
            ref.lora_B["default"].weight.copy_(m.lora_B)


def compare(name, ours, ref, run_ours, run_ref, device, grad=False):
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        ours.to(device, dtype)
        ref.to(device, dtype)
        with torch.set_grad_enabled(grad):
            results[dtype] = run_ours(dtype), run_ref(dtype)
    (o32, r32), (o16, r16) = results[torch.float32], results[torch.bfloat16]
    fp32_err, ours_bf16, ref_bf16 = rel(o32, r32), rel(o16, r32), rel(r16, r32)
    print(f"{name}: fp32 relative error vs diffusers {fp32_err:.2e}; bf16 error vs fp32: ours {ours_bf16:.2e}, "
          f"diffusers {ref_bf16:.2e}")
    return fp32_err <= 1e-4 and ours_bf16 <= 1.5 * ref_bf16


def check_graphs(tmp):
    """train.py and sample.py replayed from CUDA graphs give what they give eagerly: LoRA only, in fp32 and bf16; a
    learned token with prior preservation and gradient checkpointing; compiled blocks; a resumed run; CFG and
    consistency guidance, each also with compiled blocks.
    Run in process and deterministically (see main), so that an eager run repeats itself (checked for both kinds of
    run) and a difference is the graph's. Compared: both denoising errors of the first step (forward passes before
    any update: to 1e-5), of every step (OUT/log.jsonl, to 1e-3), and the trained tensors (to 1e-2: Adam turns
    rounding differences into larger ones, but a step missed or taken twice moves them by a quarter of their size)."""
    import json
    from PIL import Image
    from safetensors.torch import load_file
    import sample
    import train
    from conftest import TRAIN_ARGS, reference_tiny_sdxl, write_images
    model, prior = os.path.join(tmp, "model"), os.path.join(tmp, "prior")
    reference_tiny_sdxl(model)
    data = write_images(os.path.join(tmp, "data"), ["a photo of a <dog>", "a <dog> in the snow"])
    common = ["--model", model, "--data", data, "--dtype", "float32", "--device", "cuda", "--snr-gamma", 5, *TRAIN_ARGS,
              "--lr", 1e-3, "--no-cuda-graph"]  # eager unless a run adds --cuda-graph (the later flag wins)
    lora_only = ["--steps", 4, "--caption", "a photo of a dog"]
    with_token = ["--steps", 4, "--token", "<dog>", "--init-token", "dog", "--grad-checkpointing", "--prior-dir", prior,
                  "--prior-prompt", "a photo of a dog", "--num-prior", 2, "--sample-steps", 4]

    def run(name, *extra):  # (trained tensors, [(err_theta, err_phi) per step])
        out = os.path.join(tmp, name)
        train.main(train.parse_args([str(a) for a in (*common, *extra, "--out", out)]))
        tensors = {k: v for f in ("pytorch_lora_weights.safetensors", "learned_embeds.safetensors")
                   if os.path.exists(os.path.join(out, f)) for k, v in load_file(os.path.join(out, f)).items()}
        with open(os.path.join(out, "log.jsonl")) as f:
            return tensors, [(r["err_theta"], r["err_phi"]) for r in map(json.loads, f)]

    def same(name, graphed, eager):
        try:
            (a, err_a), (b, err_b) = graphed(), eager()
        except (Exception, SystemExit):  # a failed run: its error, and the other cases still run
            # The whole chain: an error inside a capture surfaces as CUDA's "failed during capture", its cause before
            print(f"{name}: FAILED:\n{traceback.format_exc()[-4000:]}")
            return False
        first, errs = (max(abs(x - y) / y for p, q in zip(err_a[:n], err_b[:n]) for x, y in zip(p, q) if y)
                       for n in (1, None))
        weights = max(rel(a[k], b[k]) for k in a) if a.keys() == b.keys() else float("inf")
        ok = len(err_a) == len(err_b) and first <= 1e-5 and errs <= 1e-3 and weights <= 1e-2
        print(f"{name}: relative differences: first step's errors {first:.1e}, all errors {errs:.1e}, trained tensors "
              f"{weights:.1e}  {'ok' if ok else 'FAIL'}")
        return ok

    eager = run("eager", *lora_only)
    ok = same("train.py twice (determinism)", lambda: run("eager-again", *lora_only), lambda: eager)
    ok &= same("train.py --cuda-graph", lambda: run("graph", *lora_only, "--cuda-graph"), lambda: eager)
    eager_token = run("eager-token", *with_token)
    ok &= same("train.py twice with --token, prior preservation, --grad-checkpointing (determinism)",
               lambda: run("eager-token-again", *with_token), lambda: eager_token)
    ok &= same("train.py --cuda-graph with --token, prior preservation, --grad-checkpointing",
               lambda: run("graph-token", *with_token, "--cuda-graph"), lambda: eager_token)
    bf16 = [*lora_only, "--dtype", "bfloat16"]  # the GPU's default dtype (the later --dtype wins)
    eager_bf16 = run("eager-bf16", *bf16)
    ok &= same("train.py twice in bfloat16 (determinism)", lambda: run("eager-bf16-again", *bf16), lambda: eager_bf16)
    ok &= same("train.py --cuda-graph in bfloat16", lambda: run("graph-bf16", *bf16, "--cuda-graph"),
               lambda: eager_bf16)
    half = [a if a != 4 else 2 for a in lora_only]  # 2 steps, then resumed to 4

    def resumed():
        run("graph-resumed", *half, "--cuda-graph")
        return run("graph-resumed", *lora_only, "--cuda-graph", "--resume")
    ok &= same("train.py --cuda-graph, resumed", resumed, lambda: eager)
    ok &= same("train.py --cuda-graph --compile",  # against --compile alone: compiled kernels round otherwise
               lambda: run("graph-compiled", *lora_only, "--cuda-graph", "--compile"),
               lambda: run("compiled", *lora_only, "--compile"))
    for w in ([], ["--w-con", 2]):
        for compiled in ([], ["--compile"]):  # graphed against eager, both compiled or neither
            images = []
            for graph in (["--no-cuda-graph"], ["--cuda-graph"]):
                out = os.path.join(tmp, f"image{len(images)}.png")
                sample.main(sample.parse_args([str(a) for a in (
                    "--model", model, "--lora", os.path.join(tmp, "eager"), "--prompt", "a photo of a dog",
                    "--steps", 5, "--width", 64, "--height", 64, "--device", "cuda", "--dtype", "float32", "--quiet",
                    *w, *compiled, *graph, "--out", out)]))
                images.append(torch.tensor(np.asarray(Image.open(out)), dtype=torch.float32))
            err = (images[0] - images[1]).abs().max().item()
            what = " ".join(map(str, [*compiled, *(w or ["(CFG)"])]))
            print(f"sample.py --cuda-graph {what}: largest pixel difference {err:g} (at most 1)")
            ok &= err <= 1
    return ok


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--size", type=int)
    p.add_argument("--only", choices=["parity", "graphs"])
    args = p.parse_args()
    graphs_ok = True
    if args.only != "parity":
        if torch.cuda.is_available():
            # Deterministic algorithms, and the math attention backend: the others' backward passes add in a varying
            # order (and deterministic mode, warning only, leaves them so).
            torch.use_deterministic_algorithms(True, warn_only=True)
            with tempfile.TemporaryDirectory() as tmp, sdpa_kernel(SDPBackend.MATH):
                graphs_ok = check_graphs(tmp)
            torch.use_deterministic_algorithms(False)
        else:
            print("CUDA graphs: skipped, no CUDA GPU")
        if args.only == "graphs":
            print("PASS" if graphs_ok else "FAIL")
            sys.exit(0 if graphs_ok else 1)
    from diffusers import AutoencoderKL as RefVAE, UNet2DConditionModel
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32
    torch.backends.cudnn.allow_tf32 = False
    size = args.size or (64 if args.tiny else 1024)
    ucfg, vcfg = (UNetConfig.tiny(), VAEConfig.tiny()) if args.tiny else (UNetConfig(), VAEConfig())
    print(f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, {size}x{size}")

    with torch.device(device):  # built on the GPU: the random init of 2.6B parameters takes a minute on the CPU
        unet = random_weights(UNet(ucfg), 0)
        ref_unet = reference(UNet2DConditionModel, ucfg, unet_config_to_diffusers, unet, unet_key_map)
    g = torch.Generator().manual_seed(1)
    h = size // 8
    x, ctx = torch.randn(2, 4, h, h, generator=g), torch.randn(2, 77, ucfg.context_dim, generator=g)
    pooled, t = torch.randn(2, ucfg.pooled_dim, generator=g), torch.tensor([999.0, 20.0])
    ids = torch.tensor([[size, size, 0, 0, size, size]] * 2, dtype=torch.float32)

    def args_in(dtype):
        return [v.to(device, dtype) if v.is_floating_point() and v is not t else v.to(device)
                for v in (x, t, ctx, pooled, ids)]

    def run_unet(dtype):
        return unet(*args_in(dtype))

    def run_ref_unet(dtype):
        xs, ts, c, pl, i = args_in(dtype)
        return ref_unet(xs, ts, c, added_cond_kwargs={"text_embeds": pl, "time_ids": i}).sample

    def input_grad(run):  # d(sum of squared outputs)/dx for the first sample: the training pass, backward included
        def run_grad(dtype):
            inputs = [v[:1] for v in args_in(dtype)]
            inputs[0].requires_grad_(True)
            out = run(*inputs)
            return torch.autograd.grad(out.float().square().sum(), inputs[0])[0]
        return run_grad

    ok = compare("UNet", unet, ref_unet, run_unet, run_ref_unet, device)
    unet.requires_grad_(False).set_grad_checkpointing(True)
    ref_unet.requires_grad_(False)
    ok &= compare("UNet input gradient (ours with --grad-checkpointing)", unet, ref_unet, input_grad(unet),
                  input_grad(lambda xs, ts, c, pl, i: ref_unet(xs, ts, c, added_cond_kwargs={
                      "text_embeds": pl, "time_ids": i}).sample), device, grad=True)
    add_same_lora(unet, ref_unet, ucfg, rank=32, seed=3)
    ok &= compare("UNet with a LoRA", unet, ref_unet, run_unet, run_ref_unet, device)
    unet = ref_unet = None  # frees the GPU for the VAE

    with torch.device(device):
        vae = random_weights(AutoencoderKL(vcfg), 2)
        ref_vae = reference(RefVAE, vcfg, vae_config_to_diffusers, vae, vae_key_map)
    z = torch.randn(1, 4, h, h, generator=g)
    ok &= compare("VAE decode", vae, ref_vae, lambda d: vae.decode(z.to(device, d)),
                  lambda d: ref_vae.decode(z.to(device, d)).sample, device)
    ok &= graphs_ok
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
