"""Per-sample seeding and the label -> image pipeline shared by the scripts."""
import numpy as np
import torch
from torch import nn

from ldm.models.diffusion.modes import Mode
from ldm.util import autocast

# Images the VQ decoder decodes at once. Its activations at full resolution are what a batch's memory peaks on
# (about 0.4 GiB an image for cin256-v2's 256x256 in float32, against about 0.07 GiB for its guided UNet), so a batch
# is decoded in chunks of this many: the samples are the same, and the UNet alone bounds the batch size.
DECODE_BATCH = 16


def unconditional_class(model):
    """Label of the 'no class' embedding used for guidance: the class embedder's last index."""
    embedding = getattr(model.cond_stage_model, "embedding", None)
    if not isinstance(embedding, nn.Embedding):
        raise ValueError("the model is not class-conditional: its conditioning stage has no class embedding")
    if embedding.num_embeddings < 2:
        raise ValueError(f"the class embedding has {embedding.num_embeddings} entry: it needs the unconditional "
                         "class (the last) and at least one real class")
    if model.conditioning_key != "crossattn":
        raise ValueError(f"conditioning_key {model.conditioning_key!r} is not supported: the class embedding reaches "
                         "the UNet through cross-attention (crossattn)")
    key = getattr(model.cond_stage_model, "key", model.cond_stage_key)
    if key != model.cond_stage_key:
        raise ValueError(f"cond_stage_key {model.cond_stage_key!r} is not the key its class embedder reads, {key!r}")
    return embedding.num_embeddings - 1


def num_classes(model):
    """Number of real classes (labels 0..num_classes-1): every embedding but the unconditional one."""
    return unconditional_class(model)


def image_shape(model):
    """(height, width, channels) of the decoded images: the latent size times the first stage's upsampling."""
    decoder = model.first_stage_model.decoder
    factor = 2 ** sum(hasattr(level, "upsample") for level in decoder.up)
    return (model.image_size * factor, model.image_size * factor, decoder.conv_out.out_channels)


def sample_seed(seed, index, stream=0):
    """A 63-bit seed mixed from (seed, sample index, stream) so that samples never share noise."""
    return int(np.random.SeedSequence([seed, index, stream]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def sample_labels(seed, indices, classes):
    """Class label in 0..classes-1 of each sample index, a function of (seed, index) alone."""
    return torch.tensor([np.random.default_rng(sample_seed(seed, i, 0)).integers(classes) for i in indices],
                        dtype=torch.long)


def sample_generators(seed, indices):
    """One CPU generator per sample index; it draws that sample's x_T and then any DDIM eta noise."""
    return [torch.Generator().manual_seed(sample_seed(seed, i, 1)) for i in indices]


def to_uint8(images):
    """Images in [-1, 1] NCHW -> uint8 NHWC, truncating like the upstream script."""
    return ((images + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def from_uint8(images):
    """uint8 NHWC -> float32 NCHW in [-1, 1], as the first stage takes images."""
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1


@torch.inference_mode()
def sample_latents(model, labels, steps, scale, eta=0.0, faster_diffusion=None, x_T=None, generators=None,
                   precision="fp32", progress=False, mode=None, **sampler_kwargs):
    """Class labels -> (latents, intermediates). Guidance is off at scale 1.

    mode: a `ldm.models.diffusion.modes.Mode` (solver and cache); without one, DDIM with eta and faster_diffusion.
    """
    if mode is None:
        mode = Mode("ddim", faster_diffusion, eta)
    elif eta or faster_diffusion is not None:
        raise ValueError("with a mode, give eta and the cache in the mode")
    device = model.device
    labels = labels.to(device)
    cond = model.get_learned_conditioning({model.cond_stage_key: labels})
    uncond = model.get_learned_conditioning({model.cond_stage_key: torch.full_like(labels, unconditional_class(model))})
    shape = [model.channels, model.image_size, model.image_size]
    return mode.sample(
        model, steps, len(labels), shape, cond, x_T=x_T, unconditional_guidance_scale=scale,
        unconditional_conditioning=uncond if scale != 1.0 else None, generator=generators, precision=precision,
        progress=progress, **sampler_kwargs)


@torch.inference_mode()
def decode_latents(model, latents, precision="fp32", chunk=DECODE_BATCH):
    """Latents -> images in about [-1, 1], float32, decoded chunk images at a time."""
    with autocast(precision, model.device):
        return torch.cat([model.decode_first_stage(part).float() for part in latents.split(chunk)])


@torch.inference_mode()
def reconstruct(model, images, precision="fp32"):
    """uint8 NHWC images -> the same images through the first stage alone (encode, quantize, decode), uint8 NHWC."""
    latents = model.get_first_stage_encoding(model.encode_first_stage(from_uint8(images.to(model.device))))
    return to_uint8(decode_latents(model, latents, precision)).cpu()


def generate(model, labels, steps, scale, eta=0.0, faster_diffusion=None, x_T=None, generators=None,
             precision="fp32", progress=False, mode=None):
    """Class labels -> (decoded images in [-1, 1], sampler intermediates)."""
    latents, intermediates = sample_latents(model, labels, steps, scale, eta, faster_diffusion, x_T, generators,
                                            precision, progress, mode)
    return decode_latents(model, latents, precision), intermediates
