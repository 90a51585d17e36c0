"""The SDXL UNet, written out in plain PyTorch.

Module names follow Stability's official code and checkpoint (input_blocks.N.M, middle_block, output_blocks,
in_layers/emb_layers/out_layers, transformer_blocks.K.attn1.to_q, label_emb), so the single-file checkpoint
loads after stripping its "model.diffusion_model." prefix. checkpoint.py maps the diffusers folder layout
onto these names.

The model predicts the noise eps of a noised latent x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps (dco.q_sample),
conditioned on
  - the timestep t (sinusoidal embedding -> time_embed MLP),
  - the text context (77 x 2048, cross-attention),
  - the "added" vector y = [pooled text (1280), six time ids embedded sinusoidally (6 x 256)] -> label_emb MLP.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

TIME_IDS = 6  # original size (h, w), crop top-left (top, left), target size (h, w): text.time_ids


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple = (1, 2, 4)
    num_res_blocks: int = 2
    transformer_depth: tuple = (0, 2, 10)  # per level; the middle block uses the last level's depth
    head_dim: int = 64
    context_dim: int = 2048  # CLIP-L (768) + OpenCLIP bigG (1280) penultimate hidden states
    pooled_dim: int = 1280  # bigG's projected EOS embedding
    time_id_dim: int = 256  # each of the six SDXL time ids is embedded with this many sinusoidal features
    norm_groups: int = 32

    @property
    def adm_in_channels(self):
        return self.pooled_dim + TIME_IDS * self.time_id_dim  # 2816 for SDXL

    @property
    def time_embed_dim(self):
        return 4 * self.model_channels

    @property
    def downscale(self):
        """The factor by which the UNet shrinks the latent's sides (halving them once per level below the first):
        they must be multiples of it."""
        return 2 ** (len(self.channel_mult) - 1)

    @classmethod
    def tiny(cls):
        """An SDXL-shaped UNet small enough for CPU tests."""
        return cls(model_channels=32, channel_mult=(1, 2, 2), transformer_depth=(0, 1, 2), head_dim=8,
                   context_dim=32, pooled_dim=32, time_id_dim=8, norm_groups=8)


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal features [cos(t f_i), sin(t f_i)], f_i = max_period^(-i/half). t: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def call(layer, *args):
    """layer(*args); with the layer's `checkpointing` on, its activations are recomputed in the backward pass instead of
    stored, so that the backward pass holds one layer's activations at a time rather than the whole UNet's."""
    if layer.checkpointing and torch.is_grad_enabled():
        # No RNG state to keep: nothing in the UNet is random (and reading it is not allowed in a CUDA graph).
        return checkpoint(layer, *args, use_reentrant=False, preserve_rng_state=False)
    return layer(*args)


class ResBlock(nn.Module):
    checkpointing = False

    def __init__(self, cin, cout, emb_dim, groups):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, cout))
        # Dropout(0.0) does nothing; it keeps the conv at out_layers.3, the checkpoint's name for it.
        self.out_layers = nn.Sequential(nn.GroupNorm(groups, cout), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(cout, cout, 3, padding=1))
        self.skip_connection = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Attention(nn.Module):
    """Multi-head attention; self-attention when context is None. to_q/k/v/out.0 are the LoRA targets."""

    def __init__(self, dim, context_dim, head_dim):
        super().__init__()
        self.heads = dim // head_dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim))  # a Sequential for the checkpoint's name, to_out.0

    def forward(self, x, context=None):
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        # (B, L, heads * head_dim) -> (B, heads, L, head_dim)
        q, k, v = (z.unflatten(-1, (self.heads, -1)).transpose(1, 2) for z in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).flatten(2))


def geglu(projected):
    h, gate = projected.chunk(2, dim=-1)
    return h * F.gelu(gate)


class GEGLUFunction(torch.autograd.Function):
    """geglu that keeps only its input for the backward pass, which recomputes gelu(gate): autograd would also store
    gelu(gate), a (B, L, 4 * dim) tensor in every transformer block."""

    @staticmethod
    def forward(ctx, projected):
        ctx.save_for_backward(projected)
        return geglu(projected)

    @staticmethod
    def backward(ctx, grad):
        (projected,) = ctx.saved_tensors
        h, gate = projected.chunk(2, dim=-1)
        # d(h * gelu(gate)): grad * gelu(gate) for h; for gate, gelu'(gate) * grad * h (aten's fused gelu_backward)
        return torch.cat([grad * F.gelu(gate), torch.ops.aten.gelu_backward(grad * h, gate)], dim=-1)


class GEGLU(nn.Module):
    def __init__(self, dim, inner):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x):
        projected = self.proj(x)
        return GEGLUFunction.apply(projected) if torch.is_grad_enabled() else geglu(projected)


class TransformerBlock(nn.Module):
    checkpointing = False

    def __init__(self, dim, context_dim, head_dim):
        super().__init__()
        self.attn1 = Attention(dim, dim, head_dim)
        self.attn2 = Attention(dim, context_dim, head_dim)
        self.ff = nn.Module()  # empty, and the no-op Dropout: for the checkpoint's names ff.net.0 and ff.net.2
        self.ff.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim))
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff.net(self.norm3(x))


class SpatialTransformer(nn.Module):
    def __init__(self, ch, depth, cfg):
        super().__init__()
        self.norm = nn.GroupNorm(cfg.norm_groups, ch, eps=1e-6)
        self.proj_in = nn.Linear(ch, ch)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(ch, cfg.context_dim, cfg.head_dim) for _ in range(depth))
        self.proj_out = nn.Linear(ch, ch)

    def forward(self, x, context):
        B, C, H, W = x.shape
        h = self.norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, C, H, W) -> (B, HW, C)
        h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = call(block, h, context)
        h = self.proj_out(h)
        return x + h.reshape(B, H, W, C).permute(0, 3, 1, 2)


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Block(nn.ModuleList):
    """One numbered entry of input_blocks/output_blocks: layers that take what they need of (x, emb, context)."""

    def forward(self, x, emb, context):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = call(layer, x, emb)
            elif isinstance(layer, SpatialTransformer):  # checkpointed inside, a transformer block at a time
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig = UNetConfig()):
        super().__init__()
        self.cfg = cfg
        mc, E, G = cfg.model_channels, cfg.time_embed_dim, cfg.norm_groups
        if cfg.transformer_depth[-1] < 1:
            raise ValueError("the middle block needs a transformer (transformer_depth[-1] >= 1)")
        self.time_embed = nn.Sequential(nn.Linear(mc, E), nn.SiLU(), nn.Linear(E, E))
        # Nested for the checkpoint's names, label_emb.0.0 and label_emb.0.2.
        self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(cfg.adm_in_channels, E), nn.SiLU(), nn.Linear(E, E)))

        self.input_blocks = nn.ModuleList([Block([nn.Conv2d(cfg.in_channels, mc, 3, padding=1)])])
        skip_chs, ch = [mc], mc
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, mult * mc, E, G)]
                ch = mult * mc
                if cfg.transformer_depth[level]:
                    layers.append(SpatialTransformer(ch, cfg.transformer_depth[level], cfg))
                self.input_blocks.append(Block(layers))
                skip_chs.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(Block([Downsample(ch)]))
                skip_chs.append(ch)

        self.middle_block = Block([ResBlock(ch, ch, E, G), SpatialTransformer(ch, cfg.transformer_depth[-1], cfg),
                                   ResBlock(ch, ch, E, G)])

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_chs.pop(), mult * mc, E, G)]
                ch = mult * mc
                if cfg.transformer_depth[level]:
                    layers.append(SpatialTransformer(ch, cfg.transformer_depth[level], cfg))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(Block(layers))

        self.out = nn.Sequential(nn.GroupNorm(G, ch), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

    def embed(self, t, pooled, time_ids):
        """The vector every ResBlock receives: time embedding + label_emb([pooled, embedded time ids])."""
        B = pooled.shape[0]
        t = torch.as_tensor(t, device=pooled.device).expand(B)
        ids = timestep_embedding(time_ids.flatten(), self.cfg.time_id_dim).reshape(B, -1)  # (B*6, d) -> (B, 6d)
        y = torch.cat([pooled, ids.to(pooled.dtype)], dim=-1)
        t_emb = timestep_embedding(t, self.cfg.model_channels).to(pooled.dtype)
        return self.time_embed(t_emb) + self.label_emb(y)

    def compile_blocks(self, **options):
        """torch.compile (with options, e.g. backend= in the tests) the transformer blocks, where most of the FLOPs
        are, rather than the whole UNet: blocks of one shape share a compiled graph, so a DCO train step compiles 5
        graphs instead of 29 with the ResBlocks too (full SDXL at 128², 2-core CPU: a first call of 48 s instead of
        153 s)."""
        # One graph per (input shape, grad mode, LoRA scale kind): more than dynamo's default of 8 per code object.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        for m in self.modules():
            if isinstance(m, TransformerBlock):
                m.compile(**options)

    def set_grad_checkpointing(self, on=True):
        """Checkpoint every ResBlock and transformer block (see call): the forward pass runs twice when training."""
        for m in self.modules():
            if isinstance(m, (ResBlock, TransformerBlock)):
                m.checkpointing = on

    def forward(self, x, t, context, pooled, time_ids):
        """x: (B, 4, h, w) latents, t: timestep(s), context: (B, 77, 2048), pooled: (B, 1280), time_ids: (B, 6)."""
        if x.shape[-2] % self.cfg.downscale or x.shape[-1] % self.cfg.downscale:
            raise ValueError(f"latent size {tuple(x.shape[-2:])} must be a multiple of {self.cfg.downscale}")
        emb = self.embed(t, pooled, time_ids)
        skips = []
        for block in self.input_blocks:
            x = block(x, emb, context)
            skips.append(x)
        x = self.middle_block(x, emb, context)
        for block in self.output_blocks:
            x = block(torch.cat([x, skips.pop()], dim=1), emb, context)
        return self.out(x)
