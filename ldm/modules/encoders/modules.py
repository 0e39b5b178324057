"""Conditioning encoders."""
from torch import nn


class ClassEmbedder(nn.Module):
    """Class label -> one context token: {key: [N]} -> [N, 1, embed_dim]. The last class is 'unconditional'."""

    def __init__(self, embed_dim, n_classes=1000, key="class"):
        super().__init__()
        self.key = key
        self.embedding = nn.Embedding(n_classes, embed_dim)

    def forward(self, batch, key=None):
        return self.embedding(batch[key or self.key][:, None])
