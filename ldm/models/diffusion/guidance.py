"""Classifier-free guidance as a wrapper around a network call."""
import torch


def unet_rows(batch_size, guided):
    """UNet rows of one sampling step of batch_size images: twice the images with guidance ([x; x])."""
    return batch_size * (2 if guided else 1)


def cat_cond(uncond, cond):
    """[uncond; cond] along the batch, for tensors or upstream's dicts of lists of tensors."""
    if isinstance(cond, dict):
        return {k: [torch.cat([u, c]) for u, c in zip(uncond[k], cond[k])] for k in cond}
    return torch.cat([uncond, cond])


class ClassifierFreeGuidance:
    """eps = e_u + scale * (e_c - e_u), both from one batched call on [x; x] with context [uc; c]
    (unconditional rows first, as upstream). Without an unconditional conditioning, or at scale 1, one
    conditional call on x.

    `guidance(net, x, t)` wraps a network call net(x_rows, t_rows, context_rows) -> noise rows; caches
    that batch several steps use `rows`, `context` and `combine` directly.
    """

    def __init__(self, cond, uncond=None, scale=1.0):
        self.guided = uncond is not None and scale != 1.0
        self.scale = scale
        self.context = cat_cond(uncond, cond) if self.guided else cond

    def rows(self, x):
        return torch.cat([x, x]) if self.guided else x

    def combine(self, out):
        """Noise rows of one step (in the layout of `rows`) -> the guided noise, float32."""
        out = out.float()
        if not self.guided:
            return out
        e_u, e_c = out.chunk(2)
        return e_u + self.scale * (e_c - e_u)

    def __call__(self, net, x, t):
        """The guided noise prediction of net at one timestep t (a 0-dim tensor)."""
        x_in = self.rows(x)
        return self.combine(net(x_in, t.expand(len(x_in)), self.context))
