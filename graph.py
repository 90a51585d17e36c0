"""A step replayed from a CUDA graph: its kernels are recorded once, then launched together.

One SDXL UNet call is thousands of small kernels, and with a LoRA on 560 projections even more. At the batch
sizes of DCO (1 to 3) the CPU that issues them, not the GPU, can set the pace: on one H200 machine, an eager CFG
step without a LoRA kept the GPU busy for 41 ms of its 75 ms. A CUDA graph replays all of a call's launches with one.

The price of a replay: it reads and writes the same memory every time. So the inputs are copied into fixed
buffers, the outputs are the same tensors every time (overwritten by the next replay), and nothing inside may
depend on a value read back by the CPU or on a new tensor made on the CPU.
"""
import torch


def supported(device):
    """CUDA graphs record the kernels of a CUDA device."""
    return device.type == "cuda"


def cuda_graph(fn, *inputs, warmup=2, after_warmup=None):
    """fn(*inputs) recorded as a CUDA graph; returns run(*inputs): copy the inputs into the recorded buffers, replay,
    return fn's outputs (use or copy them before the next call).

    fn first runs `warmup` times as usual, so that cuBLAS, cuDNN and lazily made state (an optimizer's moments) are
    set up outside the recording; after_warmup() then undoes what those calls changed, if it matters."""
    # Streams, the recording and the replays on the inputs' GPU: on another one (cuda:1 while cuda:0 is current),
    # the kernels would run eagerly on that GPU's own stream and the graph would record nothing.
    device = torch.cuda.device(inputs[0].device if inputs else None)
    static = [x.clone() for x in inputs]
    with device:
        side = torch.cuda.Stream()  # warm-up on a side stream, as torch.cuda.graph's documentation asks
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn(*static)
        torch.cuda.current_stream().wait_stream(side)
        if after_warmup is not None:
            after_warmup()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn(*static)

    def run(*args):
        for buffer, x in zip(static, args):
            if x.shape != buffer.shape:  # copy_ would broadcast it silently
                raise ValueError(f"this CUDA graph was recorded for shape {tuple(buffer.shape)}, not {tuple(x.shape)}")
            buffer.copy_(x)
        with device:
            graph.replay()
        return out
    return run
