"""The SDXL autoencoder (AutoencoderKL): images in [-1, 1] <-> 4-channel latents, 8x smaller per side.

Module names follow the official checkpoint (encoder.down.N.block.M, mid.attn_1, decoder.up.N.upsample), so the
single file loads after stripping "first_stage_model." (and flattening its attention's 1x1 convolutions into the
linear layers they are, as diffusers has them); checkpoint.py maps the diffusers layout onto them.
Latents the UNet sees are the encoder's mean (or a sample) times scaling_factor (0.13025 for SDXL).
The SDXL VAE overflows in fp16, so the scripts keep it in fp32 whatever their --dtype.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_groups: int = 32
    scaling_factor: float = 0.13025

    @property
    def downscale(self):
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def tiny(cls):
        return cls(block_out_channels=(16, 32), layers_per_block=1, norm_groups=8)


def norm(cfg, ch):
    return nn.GroupNorm(cfg.norm_groups, ch, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, cfg, cin, cout):
        super().__init__()
        self.norm1, self.conv1 = norm(cfg, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = norm(cfg, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels."""

    def __init__(self, cfg, ch):
        super().__init__()
        self.norm = norm(cfg, ch)
        self.q, self.k, self.v, self.proj_out = (nn.Linear(ch, ch) for _ in range(4))

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, HW, C)
        out = F.scaled_dot_product_attention(self.q(h)[:, None], self.k(h)[:, None], self.v(h)[:, None])[:, 0]
        return x + self.proj_out(out).transpose(1, 2).reshape(B, C, H, W)


class Mid(nn.Module):
    def __init__(self, cfg, ch):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = ResnetBlock(cfg, ch, ch), AttnBlock(cfg, ch), ResnetBlock(cfg, ch, ch)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding, as the original autoencoder was trained


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """The ResnetBlocks of one resolution, then a halving (encoder) or a doubling (decoder) where there is one."""

    def __init__(self, cfg, cin, cout, n_blocks, downsample=False, upsample=False):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(cfg, cin if i == 0 else cout, cout) for i in range(n_blocks))
        self.downsample = Downsample(cout) if downsample else None  # None: no module, and no key in the checkpoint
        self.upsample = Upsample(cout) if upsample else None

    def forward(self, x):
        for block in self.block:
            x = block(x)
        for resample in (self.downsample, self.upsample):
            if resample is not None:
                x = resample(x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        chs, last = cfg.block_out_channels, len(cfg.block_out_channels) - 1
        self.conv_in = nn.Conv2d(cfg.in_channels, chs[0], 3, padding=1)
        self.down = nn.ModuleList(Level(cfg, chs[max(i - 1, 0)], chs[i], cfg.layers_per_block, downsample=i < last)
                                  for i in range(len(chs)))
        self.mid = Mid(cfg, chs[-1])
        self.norm_out = norm(cfg, chs[-1])
        self.conv_out = nn.Conv2d(chs[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(self.mid(x))))


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        chs = cfg.block_out_channels
        self.conv_in = nn.Conv2d(cfg.latent_channels, chs[-1], 3, padding=1)
        self.mid = Mid(cfg, chs[-1])
        # up[i] works at the resolution of down[i]; it runs deepest first, and up[0] has no upsample.
        self.up = nn.ModuleList(Level(cfg, chs[min(i + 1, len(chs) - 1)], chs[i], cfg.layers_per_block + 1,
                                      upsample=i > 0) for i in range(len(chs)))
        self.norm_out = norm(cfg, chs[0])
        self.conv_out = nn.Conv2d(chs[0], cfg.in_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig = VAEConfig()):
        super().__init__()
        self.cfg = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    def encode(self, images):
        """images (B, 3, H, W) in [-1, 1] -> mean, std of the latent Gaussian, each (B, 4, H/8, W/8), unscaled."""
        mean, logvar = self.quant_conv(self.encoder(images)).chunk(2, dim=1)
        return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))

    def decode(self, z):
        """Unscaled latents -> images in about [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))


def decode_latents(vae, latents):
    """Scaled latents -> images in [0, 1]."""
    images = vae.decode((latents / vae.cfg.scaling_factor).to(next(vae.parameters()).dtype))
    return (images.float() / 2 + 0.5).clamp(0, 1)
