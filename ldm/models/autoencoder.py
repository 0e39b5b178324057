"""VQ first-stage autoencoder (inference only): encoder, vector quantizer, decoder."""
import torch
from einops import rearrange
from torch import nn

from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.diffusionmodules.util import Embedding


class VectorQuantizer2(nn.Module):
    """Snap each latent vector to its nearest codebook entry (squared Euclidean distance)."""

    def __init__(self, n_e, e_dim, beta=0.25, remap=None, unknown_index="random", sane_index_shape=False, legacy=True):
        super().__init__()
        if remap is not None:
            raise NotImplementedError("codebook index remapping (remap) is not supported")
        self.e_dim = e_dim
        self.embedding = Embedding(n_e, e_dim)

    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def forward(self, z):
        """Returns the quantized latent (straight-through form, as upstream) and the code indices."""
        z = rearrange(z.float(), "b c h w -> b h w c").contiguous()
        flat = z.view(-1, self.e_dim)
        codes = self.embedding.weight.float()
        distances = (flat.pow(2).sum(dim=1, keepdim=True) + codes.pow(2).sum(dim=1)
                     - 2 * torch.einsum("bd,dn->bn", flat, codes.t()))
        indices = distances.argmin(dim=1)
        z_q = self.embedding(indices).view(z.shape).float()
        z_q = z + (z_q - z)
        return rearrange(z_q, "b h w c -> b c h w").contiguous(), indices


class VQModel(nn.Module):
    def __init__(self, ddconfig, lossconfig, n_embed, embed_dim, ckpt_path=None, ignore_keys=(), image_key="image",
                 colorize_nlabels=None, monitor=None, batch_resize_range=None, scheduler_config=None,
                 lr_g_factor=1.0, remap=None, sane_index_shape=False, use_ema=False):
        super().__init__()
        # lossconfig, ckpt_path and the optimisation settings only matter for training: the weights
        # come from the full LDM checkpoint.
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.quantize = VectorQuantizer2(n_embed, embed_dim, beta=0.25, remap=remap, sane_index_shape=sane_index_shape)
        self.quant_conv = nn.Conv2d(ddconfig["z_channels"], embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        if colorize_nlabels is not None:
            self.register_buffer("colorize", torch.randn(3, colorize_nlabels, 1, 1))

    def decode(self, quant):
        return self.decoder(self.post_quant_conv(quant))


class VQModelInterface(VQModel):
    """The VQ model as LDM uses it: encode without quantizing, quantize when decoding."""

    def __init__(self, embed_dim, *args, **kwargs):
        super().__init__(*args, embed_dim=embed_dim, **kwargs)

    def encode(self, x):
        return self.quant_conv(self.encoder(x))

    def decode(self, h, force_not_quantize=False):
        quant = h if force_not_quantize else self.quantize(h)[0]
        return super().decode(quant)
