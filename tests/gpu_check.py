"""Full-size parity with diffusers, for a GPU machine (CI runs it with --tiny on the CPU so it cannot rot).

    python tests/gpu_check.py            # full SDXL UNet and VAE, random weights, 1024x1024
    python tests/gpu_check.py --tiny     # the same checks on the tiny configs (CPU)

Both stacks get the same random weights. Compared: the UNet's output, its input gradient (the training pass, ours
with gradient checkpointing), the UNet's output with the same random rank-32 LoRA (ours; peft's on diffusers) and
the VAE decoder's output. Passes when our fp32 output is within 1e-4 (relative to the output's
largest value) of diffusers' fp32 output, and our bf16 error against fp32 is no more than 1.5x diffusers' own.
"""
import argparse
import os
import sys

import torch

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


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--size", type=int)
    args = p.parse_args()
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
    del unet, ref_unet

    with torch.device(device):
        vae = random_weights(AutoencoderKL(vcfg), 2)
        ref_vae = reference(RefVAE, vcfg, vae_config_to_diffusers, vae, vae_key_map)
    z = torch.randn(1, 4, h, h, generator=g)
    ok &= compare("VAE decode", vae, ref_vae, lambda d: vae.decode(z.to(device, d)),
                  lambda d: ref_vae.decode(z.to(device, d)).sample, device)
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
