"""Spatial transformer of the LDM UNet, with attention through PyTorch SDPA or plain matmuls."""
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ldm.modules.diffusionmodules.util import GroupNorm32, LayerNorm32


ATTENTION_BACKENDS = ("auto", "sdpa", "matmul")
FLASH_MAX_HEAD = 256  # the widest head (channels) that flash attention takes


def resolve_backend(backend, q):
    """"auto" is "matmul" on CUDA for heads wider than flash attention takes (compiled on an H100, cin256-v2's
    forward took 200 ms against 216 with SDPA's fallback kernel), else "sdpa"; other backends are themselves."""
    if backend != "auto":
        return backend
    return "matmul" if q.is_cuda and q.shape[-1] > FLASH_MAX_HEAD else "sdpa"


def attention(q, k, v, backend="auto"):
    """softmax(q k^T / sqrt(d)) v over [..., tokens, d]. "sdpa" is PyTorch's fused kernel; "matmul" writes out the
    scores and runs two batched matmuls and a softmax, which cuBLAS runs at any head size (flash attention takes
    heads of at most 256 channels; cin256-v2 has one head of 384-960); "auto" chooses (resolve_backend)."""
    if resolve_backend(backend, q) == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    shape = q.shape[:-1] + v.shape[-1:]
    q, k, v = (t.flatten(0, -3) for t in (q, k, v))
    scores = torch.baddbmm(q.new_empty(q.shape[0], q.shape[1], k.shape[1]), q, k.transpose(1, 2),
                           beta=0, alpha=q.shape[-1] ** -0.5)
    return torch.bmm(scores.softmax(dim=-1), v).view(shape)


def set_attention(model, backend):
    """Run every attention layer of the model with a backend of ATTENTION_BACKENDS; returns the model."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {', '.join(ATTENTION_BACKENDS)}, not {backend!r}")
    for module in model.modules():
        if isinstance(module, CrossAttention):
            module.backend = backend
    return model


class GEGLU(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim, dim_out=None, mult=4, glu=False, dropout=0.0):
        super().__init__()
        inner_dim = int(dim * mult)
        project_in = GEGLU(dim, inner_dim) if glu else nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU())
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), nn.Linear(inner_dim, dim_out or dim))

    def forward(self, x):
        return self.net(x)


class CrossAttention(nn.Module):
    """Multi-head attention of x over a context (x itself when no context is given)."""

    def __init__(self, query_dim, context_dim=None, heads=8, dim_head=64, dropout=0.0):
        super().__init__()
        inner_dim = dim_head * heads
        context_dim = context_dim or query_dim
        self.heads = heads
        self.backend = "auto"
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x, context=None):
        context = x if context is None else context
        if context.shape[1] == 1:
            # Softmax over a single key is exactly 1: every query receives that key's value.
            return self.to_out(self.to_v(context)).expand(-1, x.shape[1], -1)
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads)
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        out = attention(q, k, v, self.backend)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim, n_heads, d_head, dropout=0.0, context_dim=None, gated_ff=True, checkpoint=True):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = CrossAttention(dim, context_dim=context_dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.norm1 = LayerNorm32(dim)
        self.norm2 = LayerNorm32(dim)
        self.norm3 = LayerNorm32(dim)

    def forward(self, x, context=None):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Project an image to tokens, run transformer blocks on them, project back and add the input."""

    def __init__(self, in_channels, n_heads, d_head, depth=1, dropout=0.0, context_dim=None):
        super().__init__()
        inner_dim = n_heads * d_head
        self.norm = GroupNorm32(32, in_channels, eps=1e-6)
        self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, n_heads, d_head, dropout=dropout, context_dim=context_dim)
            for _ in range(depth))
        self.proj_out = nn.Conv2d(inner_dim, in_channels, kernel_size=1)

    def forward(self, x, context=None):
        height, width = x.shape[-2:]
        h = self.proj_in(self.norm(x))
        h = rearrange(h, "b c h w -> b (h w) c")
        for block in self.transformer_blocks:
            h = block(h, context=context)
        h = rearrange(h, "b (h w) c -> b c h w", h=height, w=width)
        return self.proj_out(h) + x
