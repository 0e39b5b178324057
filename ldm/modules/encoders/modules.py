"""Conditioning encoders."""
from torch import nn

from ldm.modules.diffusionmodules.util import Embedding


class ClassEmbedder(nn.Module):
    """Class label -> one context token: {key: [N]} -> [N, 1, embed_dim]. The last class is 'unconditional'."""

    def __init__(self, embed_dim, n_classes=1000, key="class"):
        super().__init__()
        self.key = key
        self.embedding = Embedding(n_classes, embed_dim)

    def forward(self, batch, key=None):
        labels, count = batch[key or self.key], self.embedding.num_embeddings
        if labels.is_floating_point() or labels.is_complex():
            raise ValueError(f"class labels must be integers, not {labels.dtype}")
        if labels.numel() and labels.device.type != "meta":  # meta tensors (FLOP counting) hold no values
            low, high = labels.min().item(), labels.max().item()
            if low < 0 or high >= count:
                raise ValueError(f"class labels must be in 0..{count - 1} (the last is the unconditional class), "
                                 f"not {low if low < 0 else high}")
        return self.embedding(labels[:, None])
