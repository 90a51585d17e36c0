"""Merge LoRAs by plain addition (the paper's subject + style merge), or bake them into a whole SDXL checkpoint.

    python merge.py out/dog out/style --out merged/                 # exact: delta = sum_i w_i B_i A_i
    python merge.py a.safetensors b.safetensors --weights 1 0.8 --rank 64 --out m.safetensors   # SVD to rank 64
    python merge.py out/dog --fuse --model DIR --out sdxl_dog.safetensors     # one file: SDXL with the LoRA baked in

Inputs are LoRA files (diffusers, official DCO, peft or kohya format) or train.py output folders. The merged LoRA
is written in the diffusers format (--kohya: kohya format). With a folder as --out, learned tokens of the inputs are
carried along as learned_embeds*.safetensors, so `sample.py --lora merged/` finds them. --fuse writes the base
model with the LoRA added to the UNet's weights as one file in the layout of sd_xl_base_1.0.safetensors (float16 by
default, as that file), the layout AUTOMATIC1111 and ComfyUI read; here, `--model FILE --config DIR` reads it.
"""
import argparse
import json
import os
import warnings

import torch
from safetensors.torch import save

import lora as lora_lib
from checkpoint import (ModelError, atomic, check_file, component_config, model_folder, read_metadata, read_safetensors,
                        save_safetensors, save_single_file)
from cli import Help, embeds_spec, number, positive_int, run, split_spec
from sample import load_sdxl, with_folder_embeds
from unet_sdxl import UNetConfig


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=Help)
    p.add_argument("loras", nargs="+", help="LoRA files or train.py output folders")
    p.add_argument("--weights", type=number, nargs="+", help="one per LoRA (default 1 each)")
    p.add_argument("--out", required=True, help="a .safetensors file, or a folder")
    p.add_argument("--rank", type=positive_int,
                   help="compress the sum to this rank by SVD (prints the error it introduces)")
    p.add_argument("--kohya", action="store_true", help="write the kohya format (ComfyUI, AUTOMATIC1111)")
    p.add_argument("--embeds", type=embeds_spec, action="append", default=[],
                   metavar="FILE[:TOKEN[:INITWORD]]",
                   help="learned_embeds files to carry along; TOKEN/INITWORD name them where the file does not")
    p.add_argument("--model", help="the SDXL folder or single file (needed for --fuse; else only its UNet config "
                                   "is read)")
    p.add_argument("--config", help="with a single-file --model: a folder with the SDXL configs and tokenizers")
    p.add_argument("--fuse", action="store_true", help="write the whole model, the LoRA added to the UNet's weights")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"], help="of --fuse's file")
    args = p.parse_args(argv)
    if args.weights and len(args.weights) != len(args.loras):
        p.error(f"--weights needs one number per LoRA ({len(args.loras)})")
    if args.fuse and not args.model:
        p.error("--fuse needs --model")
    args.to_file = args.out.lower().endswith(".safetensors")
    if not args.to_file and os.path.isfile(args.out):
        p.error(f"--out {args.out} is a file; a merge is written to a folder, or to a .safetensors file")
    if args.embeds and args.to_file and not args.fuse:
        p.error("--embeds needs a folder as --out, to put them beside the LoRA")
    if args.fuse and not args.to_file:
        p.error("--fuse writes one file: give --out NAME.safetensors")
    if args.fuse and args.kohya:
        p.error("--kohya is a LoRA file's format; --fuse writes a whole model")
    return args


def check_replaceable(folder):
    """A merge into a folder replaces its LoRA and token files (and removes those it does not write again): only
    if they are an earlier merge's, as its LoRA file's metadata says. Nor does it go beside a peft adapter, which
    `--lora folder` would then no longer read."""
    lora_files = [f for f in (lora_lib.DIFFUSERS_FILE, lora_lib.KOHYA_FILE) if os.path.isfile(os.path.join(folder, f))]
    others = [f for f in lora_files if "dco.merged_from" not in read_metadata(os.path.join(folder, f))]
    others += [f for f in (lora_lib.PEFT_FILE,) if os.path.isfile(os.path.join(folder, f))]
    tokens = [f for f in os.listdir(folder) if f.startswith("learned_embeds")]
    if others or (tokens and not lora_files):
        raise ModelError(f"--out {folder}: it holds {(others + tokens)[0]}, which no merge wrote; merge into another "
                         "folder")


def carried_tokens(embeds):
    """{token: (file, its bytes)} of the learned-token specs (FILE[:TOKEN[:INITWORD]]) a merged folder carries, each
    token once; read now, as they may be files of an earlier merge in --out."""
    tokens = {}
    for spec in embeds:
        e, named, init = split_spec(spec, 3)
        check_file(e)
        with open(e, "rb") as f:
            data = f.read()
        header = read_metadata(e)
        if named:  # FILE:TOKEN[:INITWORD], as sample.py takes it: the copy names its token, so sample.py finds it
            header = {**header, "token": named, **({"init_token": init} if init else {})}
            data = save(read_safetensors(e), header)
        token = header.get("token")
        if not token:  # the official code's files name none, and sample.py would refuse the folder
            raise ModelError(f"{e}: the file does not name its token; give it as --embeds {e}:TOKEN:INITWORD")
        if token in tokens and tokens[token][1] != data:  # the same bytes (a run given twice) are carried once
            raise ModelError(f"{tokens[token][0]} and {e} both learned {token!r}, as other vectors, and a folder "
                             "carries one: leave one out of --embeds, or give one run's LoRA file "
                             "(DIR/pytorch_lora_weights.safetensors) rather than its folder, so that its tokens "
                             "stay behind")
        tokens.setdefault(token, (e, data))
    return tokens


def main(args):
    cfg = component_config(model_folder(args.model, args.config)[0], "unet") if args.model else UNetConfig()
    for path in args.loras:
        if not os.path.exists(path):
            raise ModelError(f"{path}: no such LoRA file or folder")
    if os.path.isdir(args.out) and any(os.path.isdir(p) and os.path.samefile(p, args.out) for p in args.loras):
        raise ModelError(f"--out {args.out} is one of the inputs; merge into another folder")
    # An input file replaced by the merge is gone, and the same command run again would add the LoRA twice.
    inputs = [lora_lib.lora_path(p) for p in args.loras] + ([args.model] if args.fuse else [])
    if os.path.isfile(args.out) and any(os.path.isfile(p) and os.path.samefile(p, args.out) for p in inputs):
        raise ModelError(f"--out {args.out} is one of the inputs; write the merge to another file")
    out_dir = (os.path.dirname(args.out) or ".") if args.to_file else args.out
    if os.path.isfile(os.path.join(out_dir, "settings.json")):  # train.py's: its files must stay the run's
        raise ModelError(f"--out {args.out}: {out_dir} holds a training run; merge into another folder")
    if not args.to_file and os.path.isdir(args.out):
        check_replaceable(args.out)
    try:
        loras = [lora_lib.read_lora(p, cfg) for p in args.loras]
    except ModelError as e:
        hint = "" if args.model else " (read as a LoRA of SDXL base; --model names another model)"
        raise ModelError(f"{e}{hint}") from None
    weights = args.weights or [1.0] * len(loras)
    merged = lora_lib.merge(loras, weights)
    if args.rank:
        merged, err = lora_lib.compress(merged, args.rank)
        print(f"rank {args.rank}: relative error of the summed delta {err:.3e} (Frobenius, over all layers)")

    if args.fuse:
        dtype = getattr(torch, args.dtype)
        unet, vae, text = load_sdxl(args.model, torch.device("cpu"), dtype, args.config)
        lora_lib.apply_lora(unet, merged, fold=True)  # W + up @ down, summed in float32
        save_single_file(args.out, unet, vae, text, dtype, {"dco.merged_from": json.dumps(args.loras)})
        print(f"wrote {args.out} (SDXL with the LoRA fused in, single-file layout, {args.dtype})")
        if with_folder_embeds(args.embeds, args.loras):
            print("the learned tokens are not in it: give them to sample.py with --embeds FILE")
        return

    tensors = lora_lib.to_kohya(merged) if args.kohya else lora_lib.to_diffusers(merged, cfg)
    meta = {"dco.merged_from": json.dumps(args.loras), "dco.weights": json.dumps(weights)}
    path = args.out
    if args.to_file:
        save_safetensors(tensors, path, meta)
        if with_folder_embeds([], args.loras):
            warnings.warn("the inputs' learned tokens are not in the file: merge into a folder to carry them along, or "
                          "give them to sample.py with --embeds FILE")
    else:
        tokens = carried_tokens(with_folder_embeds(args.embeds, args.loras))
        # The LoRA first: until it is written, an earlier merge in --out stays whole.
        name, other = ((lora_lib.KOHYA_FILE, lora_lib.DIFFUSERS_FILE) if args.kohya
                       else (lora_lib.DIFFUSERS_FILE, lora_lib.KOHYA_FILE))
        save_safetensors(tensors, os.path.join(path, name), meta)
        names = [f"learned_embeds{f'_{i}' if i else ''}.safetensors" for i in range(len(tokens))]
        for token_file, (_, data) in zip(names, tokens.values()):
            with atomic(os.path.join(path, token_file)) as tmp, open(tmp, "wb") as f:
                f.write(data)
        for stale in os.listdir(path):  # what an earlier merge left: more tokens, its LoRA in the other format
            if stale == other or (stale.startswith("learned_embeds") and stale not in names):
                os.remove(os.path.join(path, stale))
        path = os.path.join(path, name)
    rank = max(down.shape[0] for down, _ in merged.values())  # every module is written at it (lora.at_one_rank)
    print(f"wrote {path}: {len(merged)} layers, rank {rank}")


if __name__ == "__main__":
    run(main, parse_args)
