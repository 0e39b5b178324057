"""Small building blocks shared by the UNet and the diffusion schedule."""
import math

import torch
from torch import nn


def make_beta_schedule(schedule, n_timestep, linear_start=1e-4, linear_end=2e-2, cosine_s=8e-3):
    """Betas of the upstream LDM schedules, computed in float64, as a numpy array."""
    if schedule == "linear":
        betas = torch.linspace(linear_start**0.5, linear_end**0.5, n_timestep, dtype=torch.float64, device="cpu") ** 2
    elif schedule == "cosine":
        steps = torch.arange(n_timestep + 1, dtype=torch.float64, device="cpu") / n_timestep + cosine_s
        alphas = torch.cos(steps / (1 + cosine_s) * math.pi / 2).pow(2)
        alphas = alphas / alphas[0]
        betas = (1 - alphas[1:] / alphas[:-1]).clamp(0, 0.999)
    elif schedule == "sqrt_linear":
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64, device="cpu")
    elif schedule == "sqrt":
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64, device="cpu") ** 0.5
    else:
        raise ValueError(f"unknown beta schedule {schedule!r}")
    return betas.numpy()


def timestep_embedding(timesteps, dim, max_period=10000):
    """Sinusoidal embedding of integer or float timesteps, cosine half first: [N] -> [N, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = timesteps[:, None].float() * freqs.to(timesteps.device)[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype; the result in the input's dtype."""

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype; the result in the input's dtype."""

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


class Embedding(nn.Embedding):
    """nn.Embedding that draws no weights on the meta device (ldm.util.build_model, which loads them after): torch's
    meta normal_ imports torch._dynamo, 1.4 s at every start of a script. Elsewhere it initialises as nn.Embedding."""

    def reset_parameters(self):
        if not self.weight.is_meta:
            super().reset_parameters()


def normalization(channels):
    return GroupNorm32(32, channels)


def conv_nd(dims, *args, **kwargs):
    if dims == 1:
        return nn.Conv1d(*args, **kwargs)
    if dims == 2:
        return nn.Conv2d(*args, **kwargs)
    if dims == 3:
        return nn.Conv3d(*args, **kwargs)
    raise ValueError(f"unsupported dimensions: {dims}")


def avg_pool_nd(dims, *args, **kwargs):
    return (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)[dims - 1](*args, **kwargs)

