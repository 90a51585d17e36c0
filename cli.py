"""What the scripts share on their command lines: argument types that refuse bad values in one line, the device,
and the entry point that reports errors in one line.

argparse turns an ArgumentTypeError into "script.py: error: argument --flag: <message>" and exit status 2.
"""
import argparse
import os
import sys
import warnings

import numpy as np
import torch

from checkpoint import ModelError
from dco import NUM_TRAIN_TIMESTEPS
from graph import supported


def finite(s):
    """float(s) if s is a finite number, else None."""
    try:
        value = float(s)
    except ValueError:
        return None
    return value if np.isfinite(value) else None


def float_list(s):
    values = [finite(v) for v in s.split(",")]
    if None in values:
        raise argparse.ArgumentTypeError(f"expected a number or a comma list of numbers, got {s!r}")
    return values


def number(s):
    value = finite(s)
    if value is None:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}")
    return value


def non_negative(s):
    value = number(s)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {s!r}")
    return value


def positive(s):
    value = number(s)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {s!r}")
    return value


def positive_int(s):
    if not s.isdigit() or int(s) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {s!r}")
    return int(s)


def seed_int(s):
    """A generator seed: a whole number that fits torch's 64 bits."""
    if not s.isdigit() or int(s) >= 2 ** 64:
        raise argparse.ArgumentTypeError(f"expected a whole number from 0 to 2^64 - 1, got {s!r}")
    return int(s)


def split_spec(spec, n):
    """'path:a:b' -> [path, a, b] padded with None (the parts past n left out); the colon of a Windows drive (C:\\ or
    C:/) stays in the path."""
    drive = len(spec) > 2 and spec[0].isalpha() and spec[1] == ":" and spec[2] in "/\\"
    head, sep, tail = spec.partition(":") if drive else ("", "", spec)
    parts = tail.split(":")
    parts[0] = head + sep + parts[0]
    return (parts + [None] * n)[:n]


def lora_spec(s):
    """'PATH[:SCALE]' as given, its scale (if any) a finite number: a typo is refused before a model loads."""
    _, scale, more = split_spec(s, 3)
    if more is not None or scale == "" or (scale and finite(scale) is None):
        raise argparse.ArgumentTypeError(f"expected PATH[:SCALE], the scale a number, got {s!r}")
    return s


def embeds_spec(s):
    """'FILE[:TOKEN[:INITWORD]]' as given, with no part empty and none more."""
    _, token, word, more = split_spec(s, 4)
    if more is not None or "" in (token, word):
        raise argparse.ArgumentTypeError(f"expected FILE[:TOKEN[:INITWORD]], got {s!r}")
    return s


def check_steps(p, flag, steps):
    """Sampling steps are a subset of the training timesteps, so there can be no more of them."""
    if steps > NUM_TRAIN_TIMESTEPS:
        p.error(f"{flag} can be at most {NUM_TRAIN_TIMESTEPS}, the number of training timesteps")


def resolve_device(device, dtype):
    """(torch.device, torch dtype) for --device and --dtype; auto: the GPU if there is one, bfloat16 on it."""
    name = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ModelError(f"--device {name}: not a device name (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type not in ("cpu", "cuda"):  # mps, xpu, ...: untested here, and fused AdamW or graphs may lack them
        raise ModelError(f"--device {name}: only cpu and cuda devices are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"--device {name}: this machine (or this build of torch) has no CUDA GPU")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ModelError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), numbered from 0")
    if device.type == "cuda":
        # Read when CUDA allocates its first tensor. Memory mapped in pages rather than fixed blocks: the small tensors
        # that live through training (the LoRA, AdamW's moments) then pin no freed activation blocks. A CUDA graph's
        # activations live in a pool of their own, so without this, what they pin is lost. On full SDXL at 1024², a
        # train step replayed from a graph held 11.40 GiB with fixed blocks and 10.36 with pages; eagerly, 10.39 and
        # 10.04 GiB.
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    return device, getattr(torch, dtype)


class Help(argparse.RawDescriptionHelpFormatter):
    """--help with the script's docstring as written, and each option's default after its help, where it has one."""

    def _get_help_string(self, action):
        default = action.default
        unset = default is None or default is False or default is argparse.SUPPRESS or default in ("", [])
        return action.help if unset or "default" in action.help else action.help + " (default: %(default)s)"


def add_cuda_graph(p, what):
    """--cuda-graph / --no-cuda-graph; unset, it is on with a CUDA GPU (see cuda_graph_on)."""
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction,
                   help=f"replay {what} from a CUDA graph (default: on with a CUDA GPU): much faster where launching "
                        "kernels is the limit; the step's working memory is then held for the whole run")


def add_compile(p):
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet's transformer blocks (GPU): the first step compiles them (seconds to a "
                        "minute); the steps after are faster together with CUDA graphs (see README, Speed)")


def cuda_graph_on(flag, device):
    """--cuda-graph resolved: unset, on where CUDA graphs are supported; asked for where they are not, an error."""
    if flag is None:
        return supported(device)
    if flag and not supported(device):
        raise ModelError(f"--cuda-graph needs a CUDA GPU; the device is {device}")
    return flag


def run(main, parse_args):
    """A script's entry: main(parse_args()), its expected errors as one line (OSError: a file that cannot be read or
    written, a full disk), and Ctrl-C where the script does not handle it itself as one word, exit status 130.
    Warnings print as one line too, without the source line that raised them."""
    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"
    try:
        main(parse_args())
    except (ModelError, OSError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
