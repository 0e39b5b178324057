"""A small digit classifier and its export as a feature graph for evaluations/evaluator.py.

The evaluator reads an Inception-style TensorFlow graph: images (float NHWC, 0..255) at `ExpandDims:0`,
spatial features at `mixed_6/conv:0` (sFID uses their first 7 channels), pooled features at `pool_3:0`
(FID, precision, recall) and the logits weights at `softmax/logits/MatMul` (Inception Score, without bias).
`export_graph` writes this classifier in that form, so the evaluator scores digit samples unchanged.
"""
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

IMAGE_SIZE = 32
# (in, out) channels of the 3x3 convolutions; a 2x2 max-pool follows the marked ones.
CONVS = ((3, 32), (32, 32), (32, 64), (64, 64), (64, 128), (128, 128))
POOL_AFTER = (1, 3)
SPATIAL_CONV = 4  # its output (before ReLU) is `mixed_6/conv`


class DigitClassifier(nn.Module):
    """Six 3x3 convolutions with ReLU, two max-pools, a global mean pool and a bias-free linear layer."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(i, o, 3, padding=1) for i, o in CONVS)
        self.logits = nn.Linear(CONVS[-1][1], num_classes, bias=False)
        for conv in self.convs:  # He initialisation keeps activations alive through the unnormalised stack
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            nn.init.zeros_(conv.bias)

    def features(self, images):
        """uint8-range NCHW images [N, 3, 32, 32] -> (spatial features before ReLU, pooled features)."""
        h = images / 127.5 - 1
        spatial = None
        for i, conv in enumerate(self.convs):
            h = conv(h)
            if i == SPATIAL_CONV:
                spatial = h
            h = F.relu(h)
            if i in POOL_AFTER:
                h = F.max_pool2d(h, 2)
        return spatial, h.mean(dim=(2, 3))

    def forward(self, images):
        return self.logits(self.features(images)[1])


def predict(classifier, images, batch_size=500):
    """Predicted digit of each uint8 NHWC image."""
    with torch.inference_mode():
        return torch.cat([classifier(torch.from_numpy(images[i:i + batch_size]).permute(0, 3, 1, 2).float()).argmax(1)
                          for i in range(0, len(images), batch_size)]).numpy()


def export_graph(classifier):
    """The classifier as a serialized TensorFlow GraphDef with the tensor names the evaluator reads."""
    import tensorflow as tf
    tf1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default():
        images = tf1.placeholder(tf.float32, [None, None, None, 3], name="input")
        h = tf.identity(images, name="ExpandDims")
        h = tf1.image.resize_bilinear(h, [IMAGE_SIZE, IMAGE_SIZE], align_corners=False, half_pixel_centers=True)
        h = h / 127.5 - 1
        for i, conv in enumerate(classifier.convs):
            kernel = conv.weight.detach().permute(2, 3, 1, 0).numpy()  # OIHW -> HWIO
            name = "mixed_6/conv" if i == SPATIAL_CONV else f"conv_{i}"
            h = tf.nn.conv2d(h, kernel, strides=1, padding="SAME")
            h = tf.nn.bias_add(h, conv.bias.detach().numpy(), name=name)
            h = tf.nn.relu(h)
            if i in POOL_AFTER:
                h = tf.nn.max_pool2d(h, 2, 2, padding="VALID")
        pool = tf.reduce_mean(h, axis=[1, 2], keepdims=True, name="pool_3")
        weights = classifier.logits.weight.detach().t().numpy()
        logits = tf.matmul(tf.reshape(pool, [-1, weights.shape[0]]), weights, name="softmax/logits/MatMul")
        tf.nn.softmax(logits, name="softmax")
    return graph.as_graph_def().SerializeToString()


def graph_logits(graph_bytes, images):
    """Logits of uint8 NHWC images through an exported graph."""
    import tensorflow as tf
    tf1 = tf.compat.v1
    graph_def = tf1.GraphDef()
    graph_def.ParseFromString(graph_bytes)
    graph = tf.Graph()
    with graph.as_default():
        tf.import_graph_def(graph_def, name="")
    with tf1.Session(graph=graph) as sess:
        return sess.run("softmax/logits/MatMul:0", {"ExpandDims:0": np.asarray(images, np.float32)})


def graph_predict(graph_path, images):
    """Predicted digit of each uint8 NHWC image, by the exported graph at graph_path."""
    with open(graph_path, "rb") as f:
        return graph_logits(f.read(), images).argmax(axis=1)
