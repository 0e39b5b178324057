"""The LDM UNet, split into an encoder (input and middle blocks) and a decoder (output blocks).

`encode` and `decode` let a sampler reuse encoder features across time-steps (FasterDiffusion);
`forward` is the two in a row and equals the upstream UNet. `forward_deep` and `forward_shallow` let it
reuse deep decoder features instead and rerun only the outermost blocks (DeepCache).
"""
import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules.util import Embedding, avg_pool_nd, conv_nd, normalization, timestep_embedding


def cat_shared(h, skip, n):
    """cat([h, skip]) along channels, where the n row blocks of h (n*M rows) share the M rows of skip."""
    return torch.cat([h.unflatten(0, (n, len(skip))), skip.expand(n, *skip.shape)], dim=2).flatten(0, 1)


class TimestepEmbedSequential(nn.Sequential):
    """Pass the time embedding to ResBlocks, the context to transformers, and x alone to the rest."""

    def forward(self, x, emb, context=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    def __init__(self, channels, use_conv, dims=2, out_channels=None, padding=1):
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = conv_nd(dims, channels, out_channels or channels, 3, padding=padding)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    def __init__(self, channels, use_conv, dims=2, out_channels=None, padding=1):
        super().__init__()
        if use_conv:
            self.op = conv_nd(dims, channels, out_channels or channels, 3, stride=2, padding=padding)
        else:
            self.op = avg_pool_nd(dims, kernel_size=2, stride=2)

    def forward(self, x):
        return self.op(x)


class ResBlock(nn.Module):
    """Two 3x3 convolutions with the time embedding added in between, plus a skip connection."""

    def __init__(self, channels, emb_channels, dropout, out_channels=None, use_conv=False,
                 use_scale_shift_norm=False, dims=2, use_checkpoint=False, up=False, down=False):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), conv_nd(dims, channels, out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False, dims), Upsample(channels, False, dims)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False, dims), Downsample(channels, False, dims)
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels))
        self.out_layers = nn.Sequential(
            normalization(out_channels), nn.SiLU(), nn.Dropout(p=dropout),
            conv_nd(dims, out_channels, out_channels, 3, padding=1))
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = conv_nd(dims, channels, out_channels, 3 if use_conv else 1,
                                           padding=1 if use_conv else 0)

    def forward(self, x, emb):
        if self.updown:
            h = self.h_upd(self.in_layers[:-1](x))
            x = self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        emb_out = emb_out.reshape(*emb_out.shape, *([1] * (h.dim() - 2)))
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h

    def forward_shared_skip(self, h, skip, emb, n):
        """forward(cat([h, skip])) where the n row blocks of h (n*M rows) share the M rows of skip.

        Convolution is linear in its input channels, so the part of each convolution that reads only the
        skip (in in_layers: whole GroupNorm groups of skip channels) is computed once for the M rows
        instead of n times; results equal forward() up to float rounding. h=None: the whole input is skip.
        """
        rows = skip.shape[0]
        norm, act, conv = self.in_layers
        if h is None:
            inner = conv(act(norm(skip))).unsqueeze(0)
            through = self.skip_connection(skip).unsqueeze(0)
        else:
            h_channels = h.shape[1]
            x = cat_shared(h, skip, n)
            a = act(norm(x))
            group = x.shape[1] // norm.num_groups
            split = -(-h_channels // group) * group  # first channel of the groups of skip channels only
            inner = conv._conv_forward(a[:, :split], conv.weight[:, :split], conv.bias).unflatten(0, (n, rows))
            inner = inner + conv._conv_forward(a[:rows, split:], conv.weight[:, split:], None)
            shortcut = self.skip_connection
            if isinstance(shortcut, nn.Identity):
                through = x.unflatten(0, (n, rows))
            else:
                through = shortcut._conv_forward(h, shortcut.weight[:, :h_channels], shortcut.bias).unflatten(0, (n, rows))
                through = through + shortcut._conv_forward(skip, shortcut.weight[:, h_channels:], None)
        emb_out = self.emb_layers(emb).type(inner.dtype)
        out = self.out_layers((inner + emb_out.reshape(n, rows, -1, 1, 1)).flatten(0, 1))
        return (through + out.unflatten(0, (n, rows))).flatten(0, 1)

    def supports_shared_skip(self):
        return not (self.updown or self.use_scale_shift_norm) and isinstance(self.in_layers[2], nn.Conv2d)


class UNetModel(nn.Module):
    """The LDM UNet (spatial-transformer variant), with upstream parameter names and state_dict keys."""

    def __init__(self, image_size, in_channels, model_channels, out_channels, num_res_blocks,
                 attention_resolutions, dropout=0, channel_mult=(1, 2, 4, 8), conv_resample=True, dims=2,
                 num_classes=None, use_checkpoint=False, use_fp16=False, num_heads=-1, num_head_channels=-1,
                 num_heads_upsample=-1, use_scale_shift_norm=False, resblock_updown=False,
                 use_new_attention_order=False, use_spatial_transformer=False, transformer_depth=1,
                 context_dim=None, n_embed=None, legacy=True):
        super().__init__()
        if not use_spatial_transformer:
            raise NotImplementedError("only the spatial-transformer UNet (use_spatial_transformer: true) is supported")
        if context_dim is None:
            raise ValueError("use_spatial_transformer needs context_dim")
        if dims != 2:
            raise NotImplementedError(f"only 2-D UNets (dims: 2) are supported, not dims: {dims}")
        if n_embed is not None:
            raise NotImplementedError("codebook-id prediction (n_embed) is not supported")
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("set num_heads or num_head_channels")
        self.model_channels = model_channels
        self.num_classes = num_classes
        self.dtype = torch.float32  # of the weights; use_fp16 is accepted, ldm.util.store_weights stores half weights
        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim))
        if num_classes is not None:
            self.label_emb = Embedding(num_classes, time_embed_dim)

        def transformer(ch):
            # Upstream's head rule; with legacy=True a spatial transformer always uses d_head = ch // heads.
            heads = num_heads if num_head_channels == -1 else ch // num_head_channels
            d_head = ch // heads if (legacy or num_head_channels == -1) else num_head_channels
            return SpatialTransformer(ch, heads, d_head, depth=transformer_depth, context_dim=context_dim)

        def resblock(ch, out, **kwargs):
            return ResBlock(ch, time_embed_dim, dropout, out_channels=out, dims=dims,
                            use_scale_shift_norm=use_scale_shift_norm, **kwargs)

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(conv_nd(dims, in_channels, model_channels, 3, padding=1))])
        skip_channels = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [resblock(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(transformer(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                down = resblock(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample, dims, ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(resblock(ch, ch), transformer(ch), resblock(ch, ch))

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [resblock(ch + skip_channels.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(transformer(ch))
                if level and i == num_res_blocks:
                    layers.append(resblock(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample, dims, ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(normalization(ch), nn.SiLU(), conv_nd(dims, model_channels, out_channels, 3, padding=1))

    def embed_time(self, timesteps, y=None):
        """Time embedding (plus class embedding for class-conditional UNets)."""
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).type(self.dtype))
        if self.num_classes is not None:
            if y is None:
                raise ValueError("this UNet is class-conditional: pass y")
            emb = emb + self.label_emb(y)
        return emb

    def _context(self, context):
        """The cross-attention context in the dtype of the weights."""
        return None if context is None else context.type(self.dtype)

    def encode(self, x, timesteps, context=None, y=None, first=None):
        """Run the input blocks and the middle block: returns (the 12 skip features, the middle feature). first: the
        output of input block 0 on x where the caller has it (first_block), else computed here."""
        emb = self.embed_time(timesteps, y)
        context = self._context(context)
        h = x.type(self.dtype)
        skips = []
        for k, module in enumerate(self.input_blocks):
            h = first if k == 0 and first is not None else module(h, emb, context)
            skips.append(h)
        return skips, self.middle_block(h, emb, context)

    def decode(self, skips, mid, timesteps, context=None, y=None, out_dtype=None):
        """Run the output blocks on cached encoder features; returns the predicted noise.

        `timesteps` (and `context`) may hold n times as many rows as the features: row j*M + k then
        decodes feature row k at timesteps[j*M + k], where M = len(mid). The features are read as
        broadcast views, never copied n times, and the convolutions over them run once, not n times.
        """
        rows = mid.shape[0]
        if timesteps.shape[0] % rows:
            raise ValueError(f"{timesteps.shape[0]} timesteps cannot share {rows} feature rows")
        n = timesteps.shape[0] // rows
        emb = self.embed_time(timesteps, y)
        context = self._context(context)
        if n == 1:
            h = self._output_blocks(mid, skips, emb, context, 0, len(self.output_blocks))
        else:
            h = self._decode_shared(skips, mid, emb, context, n)
        return self._head(h, out_dtype)

    def _head(self, h, out_dtype=None):
        """The final normalization and activation in float32 (as under autocast), the last convolution in the dtype
        of the weights; the result in out_dtype."""
        h = self.out[:-1](h.float())
        return self.out[-1](h.type(self.dtype)).type(out_dtype or self.dtype)

    def _output_blocks(self, h, skips, emb, context, start, stop):
        """Output blocks start..stop-1 on h; block k concatenates the skip of input block N-1-k (N blocks)."""
        last = len(self.output_blocks) - 1
        for k in range(start, stop):
            h = self.output_blocks[k](torch.cat([h, skips[last - k]], dim=1), emb, context)
        return h

    def _decode_shared(self, skips, mid, emb, context, n):
        """The output blocks for n row blocks of timesteps that share the same encoder features."""
        h = None  # None: every row block still has the input of the first block, [mid, skip]
        for module, skip in zip(self.output_blocks, reversed(skips)):
            if h is None:
                skip = torch.cat([mid, skip], dim=1)
            res = module[0]
            if isinstance(res, ResBlock) and res.supports_shared_skip():
                h = res.forward_shared_skip(h, skip, emb, n)
            else:
                x = skip.repeat(n, 1, 1, 1) if h is None else cat_shared(h, skip, n)
                h = module[0:1](x, emb, context)
            h = module[1:](h, emb, context)
        return h

    def forward(self, x, timesteps, context=None, y=None):
        skips, mid = self.encode(x, timesteps, context, y)
        return self.decode(skips, mid, timesteps, context, y, out_dtype=x.dtype)

    def first_block(self, x, timesteps, context=None, y=None):
        """The output of input block 0 on x, with which every pass, the shallow branch's included, begins."""
        return self.input_blocks[0](x.type(self.dtype), self.embed_time(timesteps, y), self._context(context))

    def check_branch(self, branch):
        """DeepCache's shallow branch reruns input blocks 0..branch and the last branch+1 output blocks."""
        last = len(self.output_blocks) - 1
        if not 0 <= branch <= last:
            raise ValueError(f"DeepCache branch must be in 0..{last} for this UNet, not {branch}")

    def forward_deep(self, x, timesteps, context=None, y=None, branch=0, first=None):
        """forward(), also returning the deep features that forward_shallow reuses.

        They are the input of output block N-1-branch from the decoder side (the output of block
        N-2-branch; the middle block's output when branch = N-1), for N output blocks. first: as for encode.
        """
        self.check_branch(branch)
        skips, mid = self.encode(x, timesteps, context, y, first)
        return self.decode_deep(skips, mid, timesteps, context, y, branch, out_dtype=x.dtype)

    def decode_deep(self, skips, mid, timesteps, context=None, y=None, branch=0, out_dtype=None):
        """The decoder half of forward_deep: (predicted noise, deep features)."""
        emb = self.embed_time(timesteps, y)
        context = self._context(context)
        first_shallow = len(self.output_blocks) - 1 - branch
        deep = self._output_blocks(mid, skips, emb, context, 0, first_shallow)
        h = self._output_blocks(deep, skips, emb, context, first_shallow, len(self.output_blocks))
        return self._head(h, out_dtype), deep

    def forward_shallow(self, x, deep, timesteps, context=None, y=None, branch=0, first=None):
        """DeepCache's shallow branch: input blocks 0..branch on x, then the last branch+1 output blocks on
        the cached deep features and those fresh skips. branch=0 is DeepCache's LDM setting (the first
        convolution, the last output block and the head). first: as for encode."""
        self.check_branch(branch)
        emb = self.embed_time(timesteps, y)
        context = self._context(context)
        h = x.type(self.dtype)
        skips = []
        for k, module in enumerate(self.input_blocks[:branch + 1]):
            h = first if k == 0 and first is not None else module(h, emb, context)
            skips.append(h)
        n = len(self.output_blocks)
        return self._head(self._output_blocks(deep, skips, emb, context, n - 1 - branch, n), x.dtype)
