"""Time the work DCO does on one GPU: a CFG sampling step, a consistency-guidance step, a DCO train step.

    python bench.py                        # full SDXL UNet, random weights, 1024x1024, bf16 (on a GPU)
    python bench.py --reference            # also diffusers + peft (the official stack), same weights, same run
    python bench.py --compile              # also the UNets (ours; the reference's with --reference) compiled by block
    python bench.py --cuda-graph           # also our steps replayed from CUDA graphs (and compiled, with --compile)
    python bench.py --profile              # also where each step's time goes: host, GPU, waits (torch.profiler)
    python bench.py --tiny                 # a CPU smoke test on the tiny config

Reports the median time per step, peak memory (reserved), for the CFG step the achieved TFLOP/s (forward FLOPs
counted by torch.utils.flop_counter) against a large matmul's in the same run, the compile time of each step (its
first call), with --reference the ratios to it, and a line per speed target (SPEED_TARGETS; n/a without what it
compares). Compare only numbers from one run on one machine.
"""
import argparse
import importlib
import math
import os
import statistics
import sys
import tempfile
import time

import torch
from torch._dynamo.utils import counters
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

import lora as lora_lib
from checkpoint import component_config, load_unet, unet_config_to_diffusers, unet_key_map
from cli import Help, positive_int, resolve_device, run
from dco import dco_loss, eps_mse
from graph import cuda_graph
from sample import check_sides
from unet_sdxl import UNet, UNetConfig


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=Help)
    p.add_argument("--model", help="an SDXL folder (default: random weights)")
    p.add_argument("--tiny", action="store_true", help="tiny config at 64x64 (CPU smoke test)")
    p.add_argument("--size", type=positive_int, help="image size, a multiple of 32 (default 1024, tiny 64)")
    p.add_argument("--rank", type=positive_int, default=32, help="of the LoRA")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--iters", type=positive_int, default=10, help="timed calls of each step (the median is printed)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls of each step first")
    p.add_argument("--reference", action="store_true", help="also time diffusers + peft")
    p.add_argument("--compile", action="store_true",
                   help="also time both UNets (the reference with --reference), their transformer blocks compiled")
    p.add_argument("--cuda-graph", action="store_true", help="also time our steps replayed from CUDA graphs (GPU)")
    p.add_argument("--profile", action="store_true", help="also profile one call of each step (see profile_call)")
    args = p.parse_args(argv)
    if args.size is not None and args.size % 32:  # the latents (size / 8) go through SDXL's two downsamplings
        p.error("--size must be a multiple of 32")
    if args.warmup < (1 if args.cuda_graph else 0):  # a graph is recorded at its step's first call, untimed
        p.error("--warmup must be 0 or more (1 or more with --cuda-graph)")
    return args


def timeit(fn, iters, warmup, device):
    """Median seconds per call and peak memory (GiB, CUDA only) after warm-up. The peak is the most memory held from
    the driver (reserved): a CUDA graph's replays allocate nothing, so allocated memory would miss its private pool."""
    for _ in range(warmup):
        fn()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # what earlier steps left cached is not this step's
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_reserved() / 2 ** 30 if cuda else float("nan")
    return statistics.median(times), peak


HOST_WAITS = ("cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize")


def profile_call(fn, device, top=5):
    """Where one call's time goes: the host's time to issue it (the profiler's overhead included) and, on a GPU, the
    GPU's busy time, its kernels and copies, and the host's waits for the GPU. A step whose GPU is busy for much less
    than the step's time is bound by the host (Python, launches, waits), not by the GPU's arithmetic. Then the `top`
    kernels (on the CPU: ops) by their total time."""
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
        t0 = time.perf_counter()
        fn()
        host = time.perf_counter() - t0
        if cuda:
            torch.cuda.synchronize()
    line = f"host {host * 1e3:.1f} ms"
    events = prof.key_averages()
    if cuda:
        # GPU work, less the GPU-side spans of annotated regions (Optimizer.step, compiled regions): their kernels
        # count on their own
        work = [(e, e.self_device_time_total) for e in events
                if e.device_type == DeviceType.CUDA and not e.is_user_annotation]
        busy = sum(us for _, us in work) / 1e3  # microseconds -> ms
        waits = max(0, sum(e.count for e in events if e.key in HOST_WAITS) - 1)  # less the synchronize above
        line += f", GPU busy {busy:.1f} ms in {sum(e.count for e, _ in work)} kernels and copies, host waits {waits}"
    else:  # the CPU computes: its ops are its kernels
        work = [(e, e.self_cpu_time_total) for e in events if e.device_type == DeviceType.CPU]
    # Where the busy time goes: the kernels (or ops) that took longest in all, their names cut to stay readable
    longest = sorted(work, key=lambda w: -w[1])[:top]
    return line + "; longest: " + ", ".join(f"{e.key.removeprefix('void ')[:48]} {us / 1e3:.1f} ms x{e.count}"
                                            for e, us in longest)


def matmul_tflops(device, dtype, n):
    """Achieved TFLOP/s of one n x n matmul: the practical ceiling the UNet's rate is compared with."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    sec, _ = timeit(lambda: a @ b, iters=50, warmup=20, device=device)  # long enough to reach full clocks
    return 2 * n ** 3 / sec / 1e12


def inputs(cfg, B, size, device, dtype):
    h = size // 8
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, 4, h, h, generator=g).to(device, dtype), torch.full((B,), 500.0, device=device),
            torch.randn(B, 77, cfg.context_dim, generator=g).to(device, dtype),
            torch.randn(B, cfg.pooled_dim, generator=g).to(device, dtype),
            torch.tensor([[size, size, 0, 0, size, size]] * B, dtype=dtype, device=device))


def set_lora(unet, rank, dtype=None, folded=False):
    """A fresh rank-r LoRA: trainable and fp32 as train.py has it, or with dtype frozen in it as sample.py has it for
    consistency guidance, or folded into the weights as sample.py runs plain CFG."""
    lora_lib.remove(unet)
    lora_lib.inject(unet, rank)
    if dtype is not None:
        lora = lora_lib.get_lora(unet)
        lora_lib.remove(unet)
        lora_lib.apply_lora(unet, lora, dtype, fold=folded)


def ours_train(unet, cfg, size, device, dtype, capturable=False):
    """The DCO train step as train.py runs it, on the UNet's trainable LoRA."""
    x1 = inputs(cfg, 1, size, device, dtype)
    opt = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-6, fused=device.type == "cuda",
                            capturable=capturable)
    noise = torch.randn_like(x1[0]).float()

    def train_step():  # the base model first, so that its pass does not add to the LoRA pass's stored activations
        with torch.no_grad(), lora_lib.lora_scale(unet, 0.0):
            err_phi = eps_mse(unet(*x1), noise)
        err_theta = eps_mse(unet(*x1), noise)
        dco_loss(err_theta, err_phi, 1000.0).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {"DCO train step": train_step}


def ours_sample(unet, cfg, size, device, dtype, folded):
    """sample.py's steps: with the LoRA folded into the weights, the CFG step; with the LoRA apart, the
    consistency-guidance step, one batched call at per-sample LoRA scales."""
    if folded:
        x2 = inputs(cfg, 2, size, device, dtype)
        return {"CFG step (batch 2)": torch.no_grad()(lambda: unet(*x2))}
    x3 = inputs(cfg, 3, size, device, dtype)
    scales = torch.tensor([0.0, 0.0, 1.0], device=device, dtype=dtype)  # as sampler.py makes them

    @torch.no_grad()
    def cg_step():
        with lora_lib.lora_scale(unet, scales):
            unet(*x3)
    return {"CG step": cg_step}


def reference(unet, cfg, size, device, dtype, rank):
    """The same steps on diffusers' UNet2DConditionModel + peft LoRA, as the official DCO code runs them."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    with torch.device(device):  # random init on the GPU: seconds, not a minute on the CPU
        ref = UNet2DConditionModel(**{k: v for k, v in unet_config_to_diffusers(cfg).items() if k != "_class_name"})
    mapping = unet_key_map(cfg)
    base = {k: v for k, v in unet.state_dict().items() if "lora_" not in k}
    ref.load_state_dict({mapping[k]: v for k, v in base.items()}, strict=True)
    ref = ref.to(device, dtype).requires_grad_(False)
    ref.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                               target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    x2, x1 = (inputs(cfg, b, size, device, dtype) for b in (2, 1))
    params = [p for p in ref.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6)
    noise = torch.randn_like(x1[0]).float()

    def call(x, **kw):
        return ref(x[0], x[1], x[2], added_cond_kwargs={"text_embeds": x[3], "time_ids": x[4]}, **kw).sample

    @torch.no_grad()
    def cfg_step():
        call(x2)

    @torch.no_grad()
    def cg_step():  # the official pipeline: a batch-2 base call at LoRA scale 0, then a batch-1 LoRA call
        call(x2, cross_attention_kwargs={"scale": 0.0})
        call(x1)

    def train_step():
        err_theta = eps_mse(call(x1), noise)
        with torch.no_grad():
            err_phi = eps_mse(call(x1, cross_attention_kwargs={"scale": 0.0}), noise)
        dco_loss(err_theta, err_phi, 1000.0).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return ref, {"DCO train step": train_step, "CFG step (batch 2)": cfg_step, "CG step": cg_step}


# FlopCounterMode has no formula for the in-place addmm_ with which a LoRA adds its up product (lora.py), nor for the
# CPU's attention kernel (the GPU's it counts): without these it would count them as nothing. Shapes: addmm_'s
# (self, a (N, r), b (r, out)); attention's (query, key, value), each (B, heads, tokens, head_dim).
UNCOUNTED = {torch.ops.aten.addmm_: lambda self, a, b, *args, **kwargs: 2 * a[0] * a[1] * b[1],
             torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
                 lambda q, k, v, *args, **kwargs: flop_counter.sdpa_flop_count(q, k, v)}


def forward_flops(unet, cfg, size, device, dtype):
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=UNCOUNTED) as counter:
        unet(*inputs(cfg, 1, size, device, dtype))
    return counter.get_total_flops()


# The speed targets, as ratios to the reference measured in the same run:
# (our stack, the reference's stack, step, max time ratio, max peak-memory ratio or None).
SPEED_TARGETS = [("ours", "reference", "DCO train step", 0.5, 1.0),
                 ("ours, checkpointing", "reference, checkpointing", "DCO train step", 0.6, 1.0),
                 ("ours", "reference", "CG step", 0.5, None),
                 ("ours", "reference", "CFG step (batch 2)", 1.0, None),
                 ("ours, compiled", "reference, compiled", "DCO train step", 0.5, None),
                 ("ours, CUDA graph", "reference", "DCO train step", 0.5, 1.0),
                 ("ours, checkpointing, CUDA graph", "reference, checkpointing", "DCO train step", 0.6, 1.0),
                 ("ours, CUDA graph", "reference", "CG step", 0.5, None),
                 ("ours, CUDA graph", "reference", "CFG step (batch 2)", 1.0, None),
                 ("ours, compiled, CUDA graph", "reference, compiled", "DCO train step", 0.5, None)]
MIN_ROOFLINE_SHARE = 0.55  # compiled CFG step, of the matmul rate
MAX_COMPILE_S = 60.0  # first compiled DCO train step


def check_targets(rows, compile_s, cfg_rate, roofline):
    """Print each speed target with its measured value: PASS or MISS."""
    nan = float("nan")
    checks = []  # (what, value or NaN if not measured, bound, value must be at most the bound)
    for mine, theirs, step, max_time, max_mem in SPEED_TARGETS:
        (t, m), (t_ref, m_ref) = rows.get((mine, step), (nan, nan)), rows.get((theirs, step), (nan, nan))
        checks.append((f"{mine} / {theirs}, {step}: time", t / t_ref, max_time, True))
        if max_mem is not None:
            checks.append((f"{mine} / {theirs}, {step}: peak memory", m / m_ref, max_mem, True))
    for stack in ("ours, compiled", "ours, compiled, CUDA graph"):
        checks.append((f"{stack}, CFG step: share of the matmul rate", cfg_rate.get(stack, nan) / roofline,
                       MIN_ROOFLINE_SHARE, False))
    checks.append(("ours, compiled, DCO train step: compile time (s)",
                   compile_s.get(("ours, compiled", "DCO train step"), nan), MAX_COMPILE_S, True))
    for what, value, bound, at_most in checks:
        verdict = "n/a" if math.isnan(value) else "PASS" if (value <= bound if at_most else value >= bound) else "MISS"
        print(f"target {what:92s} {value:8.2f}  ({'<=' if at_most else '>='} {bound})  {verdict}")


def recorded_on_first_call(fn):
    """fn replayed from a CUDA graph that is recorded at its first call, in timeit's warm-up: the graph's memory pool
    then counts in this step's peak, and not in the peak of a step timed while this one waits."""
    graph = None

    def run():
        nonlocal graph
        graph = graph or cuda_graph(fn)
        return graph()
    return run


def plan(args, unet, cfg, size, device, dtype):
    """What to measure, in order: yields (stack, make_steps, first_call), where make_steps() readies the model and
    returns the stack's {step: fn}. Eager first, both sides, so that a slow compile cannot cost the ratios; ours then
    compiles from a cold cache, the reference last."""
    def ours(train, graph=False, folded=False):
        def make_steps():
            set_lora(unet, args.rank, None if train else dtype, folded)  # as train.py or sample.py has it
            steps = (ours_train(unet, cfg, size, device, dtype, capturable=graph) if train
                     else ours_sample(unet, cfg, size, device, dtype, folded))
            return {what: recorded_on_first_call(fn) for what, fn in steps.items()} if graph else steps
        return make_steps

    def reference_alone(compiled):  # the reference on the GPU, ours on the CPU: each peak counts its own model only
        unet.cpu()
        torch.cuda.empty_cache()  # the reference starts on an empty GPU, as in a process of its own
        ref, steps = reference(unet, cfg, size, device, dtype, args.rank)
        if compiled:
            ref.compile_repeated_blocks()  # diffusers' own regional compile (its transformer blocks)
            yield "reference, compiled", lambda: steps, True
        else:
            yield "reference", lambda: steps, False
            ref.enable_gradient_checkpointing()
            yield "reference, checkpointing", lambda: {"DCO train step": steps["DCO train step"]}, False
        ref = steps = None  # measured: free the reference before ours returns to the GPU
        torch.cuda.empty_cache()
        unet.to(device)

    for graph in (False, True) if args.cuda_graph else (False,):
        tag = ", CUDA graph" if graph else ""
        yield "ours" + tag, ours(True, graph), False
        unet.set_grad_checkpointing(True)
        yield "ours, checkpointing" + tag, ours(True, graph), False
        unet.set_grad_checkpointing(False)
        yield "ours" + tag, ours(False, graph, folded=True), False
        yield "ours" + tag, ours(False, graph), False
        if args.reference and not graph:
            yield from reference_alone(compiled=False)
    if args.compile:
        unet.compile_blocks()
        yield "ours, compiled", ours(True), True
        yield "ours, compiled", ours(False, folded=True), True
        yield "ours, compiled", ours(False), True
        if args.cuda_graph:
            yield "ours, compiled, CUDA graph", ours(True, graph=True), False
            yield "ours, compiled, CUDA graph", ours(False, graph=True, folded=True), False
            yield "ours, compiled, CUDA graph", ours(False, graph=True), False
        if args.reference:
            yield from reference_alone(compiled=True)


def main(args):
    sys.stdout.reconfigure(line_buffering=True)  # each line as it is measured, even if the run is cut short
    if args.compile:  # compile times from a cold cache, as a user's first run has them
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="bench-inductor-"))
    device, dtype = resolve_device("auto", args.dtype)
    if args.cuda_graph and device.type != "cuda":
        sys.exit("error: --cuda-graph needs a CUDA GPU")
    if device.type == "cpu" and not args.tiny and args.size is None:
        sys.exit("error: there is no GPU, and the full SDXL UNet at 1024x1024 would take hours on the CPU; --tiny is "
                 "a smoke test (or give --size, e.g. 128)")
    for module in ("diffusers", "peft") if args.reference else ():  # a broken install fails now, not after our steps
        try:
            importlib.import_module(module)
        except ImportError as e:
            sys.exit(f"error: --reference needs diffusers and peft (pip install -r requirements-dev.txt): {e}")
    size = args.size or (64 if args.tiny else 1024)
    if args.model:  # its own configs say which sizes it takes; the latents are the image's sides / 8, as SDXL's
        check_sides(args.model, None, size=size)
        if component_config(args.model, "vae").downscale != 8:
            sys.exit(f"error: {args.model}: its VAE does not shrink images 8x, as SDXL's does, which bench.py assumes")
        unet = load_unet(args.model, dtype, device)
    else:
        torch.manual_seed(0)
        with torch.device(device):
            unet = UNet(UNetConfig.tiny() if args.tiny else UNetConfig()).to(dtype)
    cfg = unet.cfg
    unet.requires_grad_(False)
    folded_flops = forward_flops(unet, cfg, size, device, dtype)  # a LoRA folded into the weights adds none
    set_lora(unet, args.rank)
    flops = forward_flops(unet, cfg, size, device, dtype)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    roofline = matmul_tflops(device, dtype, 8192 if device.type == "cuda" else 1024)
    print(f"{name}, {size}x{size}, {dtype}, LoRA rank {args.rank}; UNet forward (batch 1): {folded_flops / 1e9:.2f} "
          f"GFLOP, {flops / 1e9:.2f} with the LoRA apart; {dtype} matmul: {roofline:.1f} TFLOP/s")
    n = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    # Each LoRA parameter trains with a gradient and two AdamW moments, all in the parameter's dtype.
    print(f"LoRA: {n / 1e6:.1f}M parameters; with their gradients and AdamW state {16 * n / 2 ** 30:.2f} GiB in "
          f"fp32 (ours), {4 * n * dtype.itemsize / 2 ** 30:.2f} GiB in {dtype} (peft's, as the base weights)")

    rows, compile_s, cfg_rate = {}, {}, {}  # (stack, step) -> (s, GiB); (stack, step) -> s; stack -> TFLOP/s
    failed = False
    try:
        for stack, make_steps, first_call in plan(args, unet, cfg, size, device, dtype):
            try:
                steps = dict(make_steps())  # a copy: the reference's stacks share one dict
                for what in list(steps):
                    fn = steps.pop(what)  # dropped once measured: a recorded graph frees its memory for the next
                    if first_call:  # the first call of a compiled step is its compile time
                        graphs = counters["stats"]["unique_graphs"]
                        compile_s[stack, what], _ = timeit(fn, iters=1, warmup=0, device=device)
                        graphs = counters["stats"]["unique_graphs"] - graphs
                        print(f"{stack:28s} {what:20s} first call {compile_s[stack, what]:.1f} s "
                              f"(graphs compiled: {graphs})")
                    sec, peak = rows[stack, what] = timeit(fn, args.iters, args.warmup, device)
                    rate = ""
                    if what.startswith("CFG"):
                        # ours runs CFG with the LoRA folded in, as sample.py does; the reference with it apart
                        cfg_rate[stack] = 2 * (folded_flops if stack.startswith("ours") else flops) / sec / 1e12
                        rate = f"{cfg_rate[stack]:7.1f} TFLOP/s ({cfg_rate[stack] / roofline:.0%} of matmul)"
                    print(f"{stack:28s} {what:20s} {sec * 1e3:9.2f} ms  peak {peak:6.2f} GiB  {rate}")
                    if args.profile:
                        try:
                            print(f"{stack:28s} {what:20s} profile: {profile_call(fn, device)}")
                        except Exception as e:  # a diagnosis, not a measurement: it must not cost the stack's others
                            print(f"{stack:28s} {what:20s} profile failed: {type(e).__name__}: {str(e)[:300]}")
            except Exception as e:  # a compile or capture failure is a result too, and must not lose the other numbers
                failed = True
                print(f"{stack:28s} failed: {type(e).__name__}: {str(e)[:500]}")
            # The last step too: its closure may hold the reference's model, which must be freed before ours returns
            # to the GPU, or ours lands between the reference's weights and the pages it frees cannot be given back
            steps = fn = None
    except KeyboardInterrupt:  # e.g. timeout -s INT: the targets below still count what was measured
        print("interrupted")
    except Exception as e:  # readying a stack (building the reference, compiling) failed: the stacks after it are lost
        failed = True
        print(f"failed: {type(e).__name__}: {str(e)[:500]}")
    for (stack, what), (sec, _) in rows.items():
        theirs = stack.replace("ours", "reference").replace(", CUDA graph", "")  # the reference as officially run
        if stack.startswith("ours") and (theirs, what) in rows:
            print(f"ratio {stack} / {theirs}, {what}: {sec / rows[theirs, what][0]:.2f}")
    check_targets(rows, compile_s, cfg_rate, roofline)
    if failed:
        sys.exit("error: a stack failed (above)")


if __name__ == "__main__":
    run(main, parse_args)
