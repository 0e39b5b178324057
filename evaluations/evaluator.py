"""ADM-compatible sample metrics: Inception Score, FID, sFID, precision and recall.

Usage: python evaluations/evaluator.py REF.npz SAMPLE.npz

Gives the numbers of the evaluation suite of openai/guided-diffusion (`evaluations/evaluator.py`) with the
same method: the same Inception graph and tensors, statistics, splits, k-NN manifolds, and the same TensorFlow
graph for the float16 pairwise distances of precision and recall. Runs on current NumPy, SciPy and TensorFlow
(TF1-compat graph mode). Stand-alone: it needs numpy, scipy, tqdm and tensorflow.
"""
import argparse
import contextlib
import functools
import http.client
import json
import os
import signal
import sys
import threading
import urllib.request
import warnings
import zipfile
import zlib

import numpy as np
import scipy
from scipy import linalg
from tqdm.auto import tqdm

INCEPTION_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/classify_image_graph_def.pb"
INCEPTION_INPUT = "ExpandDims:0"
INCEPTION_POOL = "pool_3:0"
INCEPTION_SPATIAL = "mixed_6/conv:0"
INCEPTION_SOFTMAX_MATMUL = "softmax/logits/MatMul"
SPATIAL_CHANNELS = 7  # sFID keeps the first 7 channels of mixed_6/conv
NHOOD_SIZE = 3  # k of the k-NN manifolds of precision and recall
STAT_KEYS = (("mu", "sigma"), ("mu_s", "sigma_s"))  # precomputed (pool, spatial) statistics in a batch file
METRICS = ("FID", "sFID")  # the Frechet distances of the (pool, spatial) features
# The imaginary part of sqrtm(sigma1 sigma2) that is rounding, not a defect of the statistics: ADM's absolute 1e-3,
# or (as rounding grows with the features' scale) a sum over the diagonal below this share of the real trace.
IMAGINARY_TOLERANCE, RELATIVE_IMAGINARY_TOLERANCE = 1e-3, 1e-6
# What reading a corrupt or cut .npz raises (a bad CRC-32, bad compressed data, a cut member, a bad .npy header).
NPZ_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, ValueError, OSError)


class InputError(Exception):
    """Bad input or set-up; the message is one line for the user."""


class IllConditionedError(ValueError):
    """The square root in a Frechet distance has an imaginary part beyond rounding (ADM raises a ValueError)."""

    def __init__(self, imaginary, dims):
        super().__init__(f"Imaginary component {imaginary}")
        self.dims = dims


class Terminated(KeyboardInterrupt):
    """SIGTERM (what schedulers and `kill` send), raised as an interrupt so that the same clean-up runs."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one `error:` line (no usage block), exit status 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


@contextlib.contextmanager
def reading_npz(path):
    """Within the block, what reading a corrupt or cut .npz raises becomes an InputError naming the file."""
    try:
        yield
    except NPZ_READ_ERRORS as e:
        raise InputError(f"{path}: unreadable .npz ({e})") from None


# ----------------------------------------------------------------------------------------------------------
# Reading batch files


class NpzArrayReader:
    """One array of an .npz file read in batches along its first axis, streamed when its layout allows."""

    def __init__(self, path, name="arr_0"):
        self.path, self.name = path, name
        self._zip = zipfile.ZipFile(path)
        try:
            if f"{name}.npy" not in self._zip.namelist():
                raise InputError(f"{path}: no array named {name!r} in the .npz")
            self._file = self._zip.open(f"{name}.npy")
            self.shape, fortran_order, self.dtype = _read_npy_header(self._file)
        except BaseException:
            self._zip.close()
            raise
        self.streaming = not fortran_order and not self.dtype.hasobject

    def __len__(self):
        return self.shape[0]

    def read_batches(self, batch_size):
        """Yield consecutive [<=batch_size, ...] slices of the array."""
        if not self.streaming:
            with reading_npz(self.path), np.load(self.path) as npz:
                array = npz[self.name]
            for i in range(0, len(array), batch_size):
                yield array[i:i + batch_size]
            return
        row_bytes = self.dtype.itemsize * int(np.prod(self.shape[1:]))
        for i in range(0, len(self), batch_size):
            rows = min(batch_size, len(self) - i)
            with reading_npz(self.path):
                data = self._file.read(rows * row_bytes)
            if len(data) != rows * row_bytes:
                raise InputError(f"{self.path}: {self.name} is truncated")
            yield np.frombuffer(data, dtype=self.dtype).reshape((rows, *self.shape[1:]))

    def close(self):
        self._file.close()
        self._zip.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _read_npy_header(f):
    """(shape, fortran_order, dtype) from an open .npy stream, left at the start of the data."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version in ((2, 0), (3, 0)):  # 3.0 only allows utf8 in structured field names
        return np.lib.format.read_array_header_2_0(f)
    raise ValueError(f"unsupported .npy format version {version}")


def check_batch_file(path):
    """Check that path is an ADM batch: uint8 NHWC images in arr_0, enough of them, well-formed statistics."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        raise InputError(f"{path}: not an .npz file")
    try:
        with NpzArrayReader(path, "arr_0") as reader:
            shape, dtype = reader.shape, reader.dtype
        stats = precomputed_statistics_dims(path)
        if stats is not None:
            check_statistics_finite(path)
    except NPZ_READ_ERRORS as e:
        raise InputError(f"{path}: unreadable .npz ({e})") from None
    if dtype != np.uint8:
        raise InputError(f"{path}: arr_0 has dtype {dtype}; expected uint8 images (0..255)")
    if len(shape) != 4 or shape[3] != 3:
        raise InputError(f"{path}: arr_0 has shape {tuple(shape)}; expected [N, height, width, 3] (NHWC, RGB)")
    if shape[0] < 2:
        raise InputError(f"{path}: arr_0 holds {shape[0]} image(s); FID needs at least 2 for a covariance")
    if shape[0] < NHOOD_SIZE + 1:
        raise InputError(f"{path}: arr_0 holds {shape[0]} images; precision/recall need at least "
                         f"{NHOOD_SIZE + 1} (k+1 for k={NHOOD_SIZE} nearest neighbours)")
    return stats


def image_count(path):
    """The number of images in arr_0 of a checked batch file, from its header."""
    with NpzArrayReader(path, "arr_0") as reader:
        return len(reader)


def image_size(path):
    """(height, width) of the images in a checked batch file."""
    with NpzArrayReader(path, "arr_0") as reader:
        return tuple(reader.shape[1:3])


def warn_if_sizes_differ(ref_batch, sample_batch):
    """One warning line on stderr when the reference images and the samples differ in size (ADM does not check)."""
    (h, w), (sh, sw) = image_size(ref_batch), image_size(sample_batch)
    if (h, w) != (sh, sw):
        print(f"warning: the reference images are {h}x{w} and the samples {sh}x{sw}; the graph resizes both, but "
              "scores are comparable only between sample batches of one size", file=sys.stderr)


def precomputed_statistics_dims(path):
    """Feature dims (pool, spatial) of the statistics stored in path, or None; checks their shapes agree."""
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    if "mu.npy" not in names:
        return None
    dims = []
    for mean_key, cov_key in STAT_KEYS:
        for key in (mean_key, cov_key):
            if f"{key}.npy" not in names:
                raise InputError(f"{path}: has precomputed mu but no {key}")
        with NpzArrayReader(path, mean_key) as mean, NpzArrayReader(path, cov_key) as cov:
            if len(mean.shape) != 1 or cov.shape != (mean.shape[0],) * 2:
                raise InputError(f"{path}: {mean_key} has shape {mean.shape} and {cov_key} {cov.shape}; "
                                 f"expected [d] and [d, d]")
            dims.append(mean.shape[0])
    return tuple(dims)


def check_statistics_finite(path):
    """Check that the precomputed statistics in path are finite numbers, reading them in batches of rows."""
    for key in (key for keys in STAT_KEYS for key in keys):
        with NpzArrayReader(path, key) as reader:
            if reader.dtype.kind not in "fiu":
                raise InputError(f"{path}: precomputed {key} has dtype {reader.dtype}; expected numbers")
            for rows in reader.read_batches(256):
                check_finite(path, f"precomputed {key}", rows)


def check_finite(path, what, array):
    """A NaN or infinite statistic gives FID nan or a SciPy traceback: one error naming the file and the array."""
    if not np.isfinite(array).all():
        raise InputError(f"{path}: NaN or infinite values in {what}")


def has_precomputed_statistics(path):
    """Whether a batch file holds precomputed statistics (mu and the rest), which the evaluator uses as they are."""
    with zipfile.ZipFile(path) as zf:
        return "mu.npy" in zf.namelist()


def warn_if_too_few_images(paths, feature_dims, metrics=METRICS):
    """One warning line on stderr for each batch whose statistics come from fewer images than features: the
    covariance is then singular and the Frechet distances of those features are biased and unreliable."""
    for path in paths:
        count = image_count(path)
        short = [(metric, dim) for metric, dim in zip(metrics, feature_dims) if dim is not None and count < dim]
        if short:
            features = " and the ".join(f"{dim} features of {metric}" for metric, dim in short)
            print(f"warning: {path} holds {count} images, fewer than the {features}: "
                  f"{'/'.join(metric for metric, _ in short)} are then biased and unreliable; use at least "
                  f"{max(dim for _, dim in short)} images", file=sys.stderr)


def check_statistics_dims(path, stats_dims, network):
    """Check that precomputed statistics have the dims of the network's (pool, spatial) features."""
    if stats_dims is None:
        return
    for (key, _), dim, expected, what in zip(STAT_KEYS, stats_dims, network.feature_dims, ("pool", "spatial")):
        if expected is not None and dim != expected:
            raise InputError(f"{path}: precomputed {key} has {dim} dims but the Inception {what} features "
                             f"have {expected}")


# ----------------------------------------------------------------------------------------------------------
# Inception network (TensorFlow, TF1-compat graph mode)


def _import_tensorflow():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    import tensorflow.compat.v1 as tf
    return tf


def _relax_batch_dims(graph_def):
    """Turn static batch-1 shapes stored in the graph into unknown batch sizes (the TTUR trick)."""
    for node in graph_def.node:
        shapes = list(node.attr["_output_shapes"].list.shape) if "_output_shapes" in node.attr else []
        if "shape" in node.attr:
            shapes.append(node.attr["shape"].shape)
        for shape in shapes:
            if len(shape.dim) > 0 and shape.dim[0].size == 1:
                shape.dim[0].size = -1
    return graph_def


class InceptionNetwork:
    """The Inception graph in a TF1 session: pool_3 and spatial features of images, softmax of pool features."""

    def __init__(self, graph_path, batch_size=64, softmax_batch_size=512, threads=None):
        check_tf_threads(threads)
        tf = _import_tensorflow()
        self.batch_size, self.softmax_batch_size = batch_size, softmax_batch_size
        graph_def = tf.GraphDef()
        try:
            with open(graph_path, "rb") as f:
                graph_def.ParseFromString(f.read())
        except Exception as e:
            raise InputError(f"{graph_path}: cannot read the Inception graph ({type(e).__name__})"
                             f"{_refetch_hint(graph_path)}") from None
        self.graph = tf.Graph()
        with self.graph.as_default():
            self.image_input = tf.placeholder(tf.float32, [None, None, None, 3])
            try:
                pool, spatial = tf.import_graph_def(
                    _relax_batch_dims(graph_def), input_map={INCEPTION_INPUT: self.image_input},
                    return_elements=[INCEPTION_POOL, INCEPTION_SPATIAL], name="inception")
                weights = self.graph.get_operation_by_name(f"inception/{INCEPTION_SOFTMAX_MATMUL}").inputs[1]
            except (ValueError, KeyError) as e:
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise InputError(f"{graph_path}: not an Inception graph with {INCEPTION_INPUT}, {INCEPTION_POOL}, "
                                 f"{INCEPTION_SPATIAL} and {INCEPTION_SOFTMAX_MATMUL} ({reason})"
                                 f"{_refetch_hint(graph_path)}") from None
            self.pool_features = pool
            self.spatial_features = spatial[..., :SPATIAL_CHANNELS]
            self.softmax_input = tf.placeholder(tf.float32, [None, weights.shape[0]])
            self.softmax = tf.nn.softmax(tf.matmul(self.softmax_input, weights))  # no bias, as ADM
        config = tf.ConfigProto(allow_soft_placement=True)
        config.gpu_options.allow_growth = True
        if threads:
            config.intra_op_parallelism_threads = config.inter_op_parallelism_threads = threads
        self.sess = tf.Session(graph=self.graph, config=config)

    @property
    def feature_dims(self):
        """(pool, spatial) feature sizes known from the graph's static shapes; None where unknown."""
        dims = []
        for tensor in (self.pool_features, self.spatial_features):
            shape = tensor.shape.as_list() if tensor.shape.rank is not None else [None]
            dims.append(None if None in shape[1:] else int(np.prod(shape[1:])))
        return tuple(dims)

    def warmup(self):
        self.compute_activations([np.zeros([8, 64, 64, 3])])

    def read_activations(self, npz_path):
        """(pool, spatial) features of the images in arr_0 of an .npz, streamed in batches."""
        with NpzArrayReader(npz_path, "arr_0") as reader:
            batches = reader.read_batches(self.batch_size)
            return self.compute_activations(batches, total=-(-len(reader) // self.batch_size))

    def compute_activations(self, batches, total=None):
        """Pool features [N, 2048] and flattened (H, W, C) spatial features [N, 17*17*7] of uint8 NHWC batches."""
        pools, spatials = [], []
        for batch in tqdm(batches, total=total, unit="batch"):
            pool, spatial = self.sess.run([self.pool_features, self.spatial_features],
                                          {self.image_input: batch.astype(np.float32)})
            pools.append(pool.reshape([len(pool), -1]))
            spatials.append(spatial.reshape([len(spatial), -1]))
        return np.concatenate(pools, axis=0), np.concatenate(spatials, axis=0)

    def compute_softmax(self, pool_features):
        """Class probabilities [N, 1008] from pool features, in batches."""
        return np.concatenate([
            self.sess.run(self.softmax, {self.softmax_input: pool_features[i:i + self.softmax_batch_size]})
            for i in range(0, len(pool_features), self.softmax_batch_size)
        ], axis=0)

    def close(self):
        self.sess.close()


def default_cache_dir():
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ldm-faster-diffusion")


def cached_graph_path(cache_dir=None):
    """Where fetch_inception_graph keeps the Inception graph."""
    return os.path.join(cache_dir or default_cache_dir(), os.path.basename(INCEPTION_URL))


def _refetch_hint(graph_path):
    """For the cached download, how to get it again: a damaged cache would otherwise fail every run."""
    if os.path.abspath(graph_path) != os.path.abspath(cached_graph_path()):
        return ""
    return f"; delete {graph_path} and run again to download it again"


def fetch_inception_graph(cache_dir=None):
    """Path of the cached Inception graph, downloaded once from the ADM URL."""
    path = cached_graph_path(cache_dir)
    if not os.path.isfile(path):
        download_inception_graph(path)
    return path


def download_inception_graph(path):
    """Download the Inception graph to path through a temporary file: a failed or cut download leaves nothing."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with urllib.request.urlopen(INCEPTION_URL, timeout=60) as response, open(tmp, "wb") as f:
            size = int(response.headers.get("Content-Length") or 0) or None
            received = _copy_with_progress(response, f, size)
        if size is not None and received != size:
            raise InputError(f"the download of the Inception graph from {INCEPTION_URL} stopped at {received} of "
                             f"{size} bytes; run again")
        os.replace(tmp, path)
    except (OSError, http.client.HTTPException, ValueError) as e:  # URLError and timeouts are OSErrors
        reason = getattr(e, "reason", None) or e
        raise InputError(f"cannot download the Inception graph from {INCEPTION_URL} ({reason}); "
                         f"download it yourself and pass --inception_path") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _copy_with_progress(response, f, size):
    """Copy the response's body into f with a progress bar; returns the number of bytes copied."""
    received = 0
    with tqdm(total=size, unit="B", unit_scale=True, desc="Inception graph") as bar:
        while chunk := response.read(1 << 20):
            f.write(chunk)
            received += len(chunk)
            bar.update(len(chunk))
    return received


# ----------------------------------------------------------------------------------------------------------
# Metrics: FID and Inception Score in NumPy / SciPy, precision and recall with distances in TensorFlow as ADM


class FIDStatistics:
    """Mean and covariance of a set of features."""

    def __init__(self, mu, sigma):
        self.mu, self.sigma = mu, sigma

    @classmethod
    def from_activations(cls, activations):
        return cls(np.mean(activations, axis=0), np.cov(activations, rowvar=False))

    def frechet_distance(self, other, eps=1e-6):
        """Frechet distance between the Gaussians (self.mu, self.sigma) and (other.mu, other.sigma)."""
        mu1, mu2 = np.atleast_1d(self.mu), np.atleast_1d(other.mu)
        sigma1, sigma2 = np.atleast_2d(self.sigma), np.atleast_2d(other.sigma)
        if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
            raise ValueError(f"statistics of different sizes: {mu1.shape} and {mu2.shape}")
        diff = mu1 - mu2
        covmean = _sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():
            warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates")
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
        if np.iscomplexobj(covmean):
            imaginary = np.abs(np.diagonal(covmean).imag)
            if (imaginary.max() > IMAGINARY_TOLERANCE
                    and imaginary.sum() > RELATIVE_IMAGINARY_TOLERANCE * abs(np.trace(covmean.real))):
                raise IllConditionedError(np.max(np.abs(covmean.imag)), len(mu1))
            covmean = covmean.real
        return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


_SQRTM_HAS_DISP = tuple(int(part) for part in scipy.__version__.split(".")[:2]) < (1, 16)


def _sqrtm(a):
    """Principal square root of a matrix, as scipy.linalg.sqrtm(a, disp=False)[0], without printing or warning."""
    if _SQRTM_HAS_DISP:
        return linalg.sqrtm(a, disp=False)[0]
    with warnings.catch_warnings():  # SciPy >= 1.16 warns where disp=False was silent
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        return linalg.sqrtm(a)


def compute_inception_score(probs, split_size=5000):
    """Mean over consecutive splits of exp(mean_i KL(p(y|x_i) || p(y))), from softmax rows [N, classes]."""
    scores = []
    for i in range(0, len(probs), split_size):
        part = probs[i:i + split_size]
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = part * (np.log(part) - np.log(np.mean(part, axis=0, keepdims=True)))
        kl = np.where(part > 0, kl, 0)  # 0 log 0 = 0, where ADM's expression gives NaN
        scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
    return float(np.mean(scores))


def _batch_pairwise_distances(tf, u, v):
    """Squared Euclidean distances between the rows of u and v, max(|u|^2 - 2 u.v + |v|^2, 0): ADM's graph."""
    with tf.variable_scope("pairwise_dist_block"):
        norm_u = tf.reshape(tf.reduce_sum(tf.square(u), 1), [-1, 1])
        norm_v = tf.reshape(tf.reduce_sum(tf.square(v), 1), [1, -1])
        return tf.maximum(norm_u - 2 * tf.matmul(u, v, False, True) + norm_v, 0.0)


class DistanceBlock:
    """Pairwise squared distances in TensorFlow exactly as ADM computes them: both batches cast to float16, the
    float16 result cast to float32 if it is finite everywhere, else the distances recomputed in float32; and the
    ball-membership tests of precision and recall on those distances, in the same graph."""

    def __init__(self, session=None):
        tf = _import_tensorflow()
        self.session = session or tf.Session(graph=tf.Graph())
        with self.session.graph.as_default():
            self._features_1 = tf.placeholder(tf.float32, shape=[None, None])
            self._features_2 = tf.placeholder(tf.float32, shape=[None, None])
            distances_16 = _batch_pairwise_distances(tf, tf.cast(self._features_1, tf.float16),
                                                     tf.cast(self._features_2, tf.float16))
            self.distances = tf.cond(tf.reduce_all(tf.math.is_finite(distances_16)),
                                     lambda: tf.cast(distances_16, tf.float32),
                                     lambda: _batch_pairwise_distances(tf, self._features_1, self._features_2))
            self._radii_1 = tf.placeholder(tf.float32, shape=[None, None])
            self._radii_2 = tf.placeholder(tf.float32, shape=[None, None])
            distances_32 = tf.cast(self.distances, tf.float32)[..., None]
            self._in_2 = tf.math.reduce_any(distances_32 <= self._radii_2, axis=1)
            self._in_1 = tf.math.reduce_any(distances_32 <= self._radii_1[:, None], axis=0)

    def pairwise_distances(self, u, v):
        """Squared distances [len(u), len(v)], float32."""
        return self.session.run(self.distances, {self._features_1: u, self._features_2: v})

    def less_thans(self, features_1, radii_1, features_2, radii_2):
        """(rows of features_1 inside some ball of features_2, rows of features_2 inside some ball of features_1)."""
        return self.session.run([self._in_2, self._in_1], {self._features_1: features_1, self._features_2: features_2,
                                                           self._radii_1: radii_1, self._radii_2: radii_2})


class ManifoldEstimator:
    """k-NN manifolds of feature sets (improved precision and recall, Kynkaanniemi et al. 2019)."""

    def __init__(self, distance_block=None, row_batch_size=10000, col_batch_size=10000, nhood_sizes=(NHOOD_SIZE,)):
        self.distance_block = distance_block or DistanceBlock()
        self.row_batch_size, self.col_batch_size = row_batch_size, col_batch_size
        self.nhood_sizes = list(nhood_sizes)

    def manifold_radii(self, features):
        """Squared distance from each point to its k-th nearest neighbour (itself counted at 0): [N, len(k)]."""
        num = len(features)
        radii = np.zeros([num, len(self.nhood_sizes)], dtype=np.float32)
        distances = np.zeros([min(self.row_batch_size, num), num], dtype=np.float32)
        for begin1 in range(0, num, self.row_batch_size):
            rows = features[begin1:begin1 + self.row_batch_size]
            for begin2 in range(0, num, self.col_batch_size):
                cols = features[begin2:begin2 + self.col_batch_size]
                distances[:len(rows), begin2:begin2 + len(cols)] = self.distance_block.pairwise_distances(rows, cols)
            block = np.partition(distances[:len(rows)], self.nhood_sizes, axis=1)
            radii[begin1:begin1 + len(rows)] = block[:, self.nhood_sizes]
        return radii

    def evaluate_pr(self, features_1, radii_1, features_2, radii_2):
        """(precision, recall) per k: the share of set 2 inside set 1's manifold, and of set 1 inside set 2's."""
        inside_2 = np.zeros([len(features_1), radii_2.shape[1]], dtype=bool)  # point of set 1 in some ball of set 2
        inside_1 = np.zeros([len(features_2), radii_1.shape[1]], dtype=bool)  # point of set 2 in some ball of set 1
        for begin1 in range(0, len(features_1), self.row_batch_size):
            end1 = begin1 + self.row_batch_size
            for begin2 in range(0, len(features_2), self.col_batch_size):
                end2 = begin2 + self.col_batch_size
                in_2, in_1 = self.distance_block.less_thans(features_1[begin1:end1], radii_1[begin1:end1],
                                                            features_2[begin2:end2], radii_2[begin2:end2])
                inside_2[begin1:end1] |= in_2
                inside_1[begin2:end2] |= in_1
        return np.mean(inside_1, axis=0, dtype=np.float64), np.mean(inside_2, axis=0, dtype=np.float64)


def compute_prec_recall(ref_features, sample_features, estimator=None):
    """Precision (samples on the reference manifold) and recall (references on the sample manifold), k=3."""
    estimator = estimator or ManifoldEstimator()
    ref_radii = estimator.manifold_radii(ref_features)
    sample_radii = estimator.manifold_radii(sample_features)
    precision, recall = estimator.evaluate_pr(ref_features, ref_radii, sample_features, sample_radii)
    return float(precision[0]), float(recall[0])


def read_statistics(npz_path, activations):
    """(pool, spatial) FIDStatistics: precomputed in the file if it has mu, else from the activations."""
    with reading_npz(npz_path), np.load(npz_path) as obj:
        if "mu" in obj.files:
            arrays = {key: obj[key] for keys in STAT_KEYS for key in keys}
            for key, array in arrays.items():
                check_finite(npz_path, f"precomputed {key}", array)
            return tuple(FIDStatistics(arrays[mean_key], arrays[cov_key]) for mean_key, cov_key in STAT_KEYS)
    for acts, features in zip(activations, ("pool", "spatial")):
        check_finite(npz_path, f"the {features} features of arr_0", acts)
    return tuple(FIDStatistics.from_activations(acts) for acts in activations)


def ill_conditioned_error(error, paths):
    """An IllConditionedError as one line for the user, saying how many images the statistics need."""
    counts = [image_count(path) for path in paths if not has_precomputed_statistics(path)]
    if counts and min(counts) < error.dims:
        return InputError(f"the covariance square root is ill-conditioned ({error}): {min(counts)} images for "
                          f"{error.dims} features; use at least {error.dims} images")
    return InputError(f"the covariance square root is ill-conditioned ({error}): a covariance is singular (features "
                      "that are constant or depend on others) or not positive semi-definite")


# ----------------------------------------------------------------------------------------------------------
# Command line


def write_json(path, data):
    """Write data to path as JSON through a temporary file, removed if anything fails."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_json_path(path):
    """--json names a writable file (not a folder) in a writable folder that exists."""
    if os.path.isdir(path):
        raise InputError(f"{path}: is a directory; --json needs a file name")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise InputError(f"{path}: its directory does not exist (--json)")
    if not os.access(folder, os.W_OK | os.X_OK) or os.path.exists(path) and not os.access(path, os.W_OK):
        raise InputError(f"{path}: not writable (--json)")


def check_inception_path(path):
    """--inception_path names a file."""
    if os.path.isdir(path):
        raise InputError(f"{path}: is a directory, not the graph file (--inception_path)")
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file (--inception_path)")


def check_tf_threads(threads):
    """--tf_threads: None or 0 leave the choice to TensorFlow; a negative count makes TensorFlow abort."""
    if threads is not None and threads < 0:
        raise InputError(f"--tf_threads must be at least 0 (0: TensorFlow's choice), not {threads}")


def check_numbers(args):
    """--batch_size and --tf_threads are counts that TensorFlow accepts."""
    if args.batch_size < 1:
        raise InputError(f"--batch_size must be at least 1, not {args.batch_size}")
    check_tf_threads(args.tf_threads)


def prepare(args, metrics=METRICS, other_batches=()):
    """Check the batch files, the --json folder and the Inception graph (downloading it once if needed), then
    load the graph and check precomputed statistics against its feature sizes; returns the network. Before any
    image goes through the graph, warns about batches whose statistics will come from fewer images than the graph
    has features (other_batches too: batches that the caller checked)."""
    stats_dims = {path: check_batch_file(path) for path in (args.ref_batch, args.sample_batch) if path}
    if args.sample_batch:
        warn_if_sizes_differ(args.ref_batch, args.sample_batch)
    if args.json:
        check_json_path(args.json)
    if args.inception_path:
        check_inception_path(args.inception_path)
    graph_path = args.inception_path or fetch_inception_graph()
    network = InceptionNetwork(graph_path, batch_size=args.batch_size, threads=args.tf_threads)
    try:
        for path, dims in stats_dims.items():
            check_statistics_dims(path, dims, network)
    except InputError:
        network.close()
        raise
    from_images = [path for path, dims in stats_dims.items() if dims is None] + list(other_batches)
    warn_if_too_few_images(from_images, network.feature_dims, metrics)
    return network


def evaluate(args):
    """Print ADM's progress lines and five metrics for args.ref_batch and args.sample_batch; returns the metrics."""
    network = prepare(args)
    try:
        print("warming up TensorFlow...")
        network.warmup()
        print("computing reference batch activations...")
        ref_acts = network.read_activations(args.ref_batch)
        print("computing/reading reference batch statistics...")
        ref_stats, ref_stats_spatial = read_statistics(args.ref_batch, ref_acts)
        print("computing sample batch activations...")
        sample_acts = network.read_activations(args.sample_batch)
        print("computing/reading sample batch statistics...")
        sample_stats, sample_stats_spatial = read_statistics(args.sample_batch, sample_acts)

        print("Computing evaluations...")
        metrics = score(network, ref_acts, (ref_stats, ref_stats_spatial), sample_acts,
                        (sample_stats, sample_stats_spatial))
    except IllConditionedError as e:
        raise ill_conditioned_error(e, (args.ref_batch, args.sample_batch)) from None
    finally:
        network.close()
    return metrics


def score(network, ref_acts, ref_stats, sample_acts, sample_stats, log=print):
    """The five metrics from the (pool, spatial) activations and statistics of both batches, each logged as ADM
    prints it."""
    metrics = {"inception_score": compute_inception_score(network.compute_softmax(sample_acts[0]))}
    log("Inception Score:", metrics["inception_score"])
    metrics["fid"] = sample_stats[0].frechet_distance(ref_stats[0])
    log("FID:", metrics["fid"])
    metrics["sfid"] = sample_stats[1].frechet_distance(ref_stats[1])
    log("sFID:", metrics["sfid"])
    estimator = ManifoldEstimator(DistanceBlock(network.sess))  # in the Inception session, as ADM
    metrics["precision"], metrics["recall"] = compute_prec_recall(ref_acts[0], sample_acts[0], estimator)
    log("Precision:", metrics["precision"])
    log("Recall:", metrics["recall"])
    return metrics


def interrupt_exit_status(interrupt):
    """128 + the signal number, as a shell reports a process that a signal ended: 143 for SIGTERM, else 130."""
    return 128 + (signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT)


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within the block, SIGTERM raises Terminated, a KeyboardInterrupt (only the main thread can handle signals)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def stopped_in_one_line(main):
    """Decorates a main(argv): Ctrl-C or SIGTERM anywhere in it prints one line, `stopped`, and exits with status
    130 or 143 instead of a traceback."""
    @functools.wraps(main)
    def guarded(argv=None):
        try:
            with sigterm_as_interrupt():
                return main(argv)
        except KeyboardInterrupt as interrupt:
            print("stopped", file=sys.stderr, flush=True)
            sys.exit(interrupt_exit_status(interrupt))
    return guarded


@stopped_in_one_line
def main(argv=None):
    parser = ArgumentParser(description="ADM-compatible Inception Score, FID, sFID, precision and recall.")
    parser.add_argument("ref_batch", help="reference batch .npz (arr_0: uint8 NHWC; optional mu/sigma/mu_s/sigma_s)")
    parser.add_argument("sample_batch", nargs="?", help="sample batch .npz (arr_0: uint8 NHWC images)")
    parser.add_argument("--inception_path", help="local classify_image_graph_def.pb (default: download it once "
                                                 "into $XDG_CACHE_HOME, else ~/.cache, /ldm-faster-diffusion)")
    parser.add_argument("--batch_size", type=int, default=64, help="images per Inception batch")
    parser.add_argument("--tf_threads", type=int, default=None,
                        help="TensorFlow intra/inter-op threads (default or 0: TensorFlow's choice)")
    parser.add_argument("--json", help="also write the five metrics and the input file names to this JSON file")
    parser.add_argument("--check_only", action="store_true",
                        help="only check the inputs and the Inception graph (fetching it if needed), then exit")
    args = parser.parse_args(argv)
    if not (args.sample_batch or args.check_only):
        parser.error("the sample batch is required (unless --check_only)")
    try:
        check_numbers(args)
        if args.check_only:
            prepare(args).close()
            print("evaluator inputs are ready")
            return None
        metrics = evaluate(args)
        if args.json:
            write_json(args.json, {"ref_batch": args.ref_batch, "sample_batch": args.sample_batch, **metrics})
    except (InputError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    return metrics


if __name__ == "__main__":
    main()
