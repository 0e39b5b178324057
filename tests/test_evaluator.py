"""ADM-compatible evaluator: metrics against independent computations, end to end with a small fake Inception graph.

The fake graph exposes the Inception tensor names (ExpandDims:0, mixed_6/conv:0, pool_3:0, softmax/logits/MatMul)
but is tiny: images are resized (nearest) to 4x4 instead of 17x17 and pool_3 has 64 features instead of 2048, so
that FID's matrix square roots stay fast. Its weights are small integers, so its features are exact in float32 and
the test recomputes them in NumPy from the same weights. Its spatial features are |conv - offset|, not linear in
the pixels, so that (as Inception's) they span all their dimensions: with more images than features, the
covariances are well-conditioned and FID agrees with the reference whatever the BLAS kernels.
"""
import functools
import http.server
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest
from scipy import special

from conftest import REPO, interruptible

EVALUATOR = REPO / "evaluations" / "evaluator.py"


def _load_evaluator():
    spec = importlib.util.spec_from_file_location("adm_evaluator", EVALUATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ev = _load_evaluator()

SIDE = 4  # spatial size of the fake mixed_6/conv (17 in Inception)
CHANNELS = 8
POOL_DIM = 64
CLASSES = 1008
SPATIAL_DIM = SIDE * SIDE * 7
PROGRESS_LINES = [
    "warming up TensorFlow...",
    "computing reference batch activations...",
    "computing/reading reference batch statistics...",
    "computing sample batch activations...",
    "computing/reading sample batch statistics...",
    "Computing evaluations...",
]
METRIC_LINES = [("Inception Score", "inception_score"), ("FID", "fid"), ("sFID", "sfid"),
                ("Precision", "precision"), ("Recall", "recall")]


# ----------------------------------------------------------------------------------------------------------
# Independent reference computations


def brute_force_prec_recall(ref, sample, k=3):
    """Improved precision/recall with exact float64 distances and full sorts."""
    def sq_dists(a, b):
        return ((a[:, None, :].astype(np.float64) - b[None, :, :]) ** 2).sum(-1)
    ref_radii = np.sort(sq_dists(ref, ref), axis=1)[:, k]
    sample_radii = np.sort(sq_dists(sample, sample), axis=1)[:, k]
    cross = sq_dists(ref, sample)
    precision = np.mean([(cross[:, j] <= ref_radii).any() for j in range(len(sample))])
    recall = np.mean([(cross[i] <= sample_radii).any() for i in range(len(ref))])
    return precision, recall


def psd_sqrt(m):
    w, v = np.linalg.eigh(m)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_reference(mu1, sigma1, mu2, sigma2):
    """FD with tr sqrt(S1 S2) = tr sqrt(S2^1/2 S1 S2^1/2), via symmetric eigendecompositions."""
    root2 = psd_sqrt(sigma2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2)
                 - 2 * np.trace(psd_sqrt(root2 @ sigma1 @ root2)))


def stats_reference(features):
    features = features.astype(np.float64)
    centered = features - features.mean(0)
    return features.mean(0), centered.T @ centered / (len(features) - 1)


def inception_score_reference(probs):
    marginal = probs.mean(0, keepdims=True)
    return float(np.exp(special.rel_entr(probs, marginal).sum(1).mean()))


def random_stats(rng, dim):
    a = rng.normal(size=(dim, dim))
    return rng.normal(size=dim), a @ a.T / dim + 0.5 * np.eye(dim)


def assert_well_conditioned(*features):
    """Covariances of condition number below 1e4: the square roots of FID then agree with the reference's to about
    1e4 x 1e-16 whatever the BLAS kernels, far inside the rel=1e-6 that the tests compare at. (With fewer images
    than features the covariances are singular: the imaginary part of sqrtm is then rounding, and on an AVX2 and
    an AVX-512 machine it differed by 3x and crossed ADM's 1e-3.)"""
    for f in features:
        eigenvalues = np.linalg.eigvalsh(np.cov(f, rowvar=False))
        assert eigenvalues.min() > 1e-4 * eigenvalues.max()


# ----------------------------------------------------------------------------------------------------------
# Fake Inception graph


def fake_weights(seed, shift, logit_std):
    rng = np.random.default_rng(seed)
    pool_mask = rng.random((SIDE * SIDE * CHANNELS, POOL_DIM)) < 0.06
    bias = np.zeros(CLASSES, np.float32)
    bias[0] = 100.0  # the graph's softmax bias, which the evaluator must not use
    return {
        "conv": rng.integers(-2, 3, size=(3, CHANNELS)).astype(np.float32),
        "pool": (pool_mask * rng.choice([-1.0, 1.0], size=pool_mask.shape)).astype(np.float32),
        "logits": rng.normal(0, logit_std, size=(POOL_DIM, CLASSES)).astype(np.float32),
        "bias": bias,
        "shift": shift,
    }


def build_fake_inception(path, weights, static_batch_one):
    """Write a GraphDef with Inception's tensor names; static_batch_one stores batch-1 shapes like Inception's."""
    tf = pytest.importorskip("tensorflow").compat.v1
    graph = tf.Graph()
    with graph.as_default():
        images = tf.placeholder(tf.float32, [1 if static_batch_one else None, None, None, 3], name="input")
        expanded = tf.identity(images, name="ExpandDims")
        small = tf.raw_ops.ResizeNearestNeighbor(images=expanded, size=[SIDE, SIDE], align_corners=False,
                                                 half_pixel_centers=False)
        conv = tf.nn.conv2d(small, weights["conv"][None, None], strides=1, padding="VALID")
        conv = tf.abs(conv - conv_offset(weights), name="mixed_6/conv")
        hidden = tf.matmul(tf.reshape(conv, [-1, SIDE * SIDE * CHANNELS]), weights["pool"])
        pool = tf.floor(hidden * 2.0 ** -weights["shift"])
        pool_3 = tf.reshape(pool, [-1, 1, 1, POOL_DIM], name="pool_3")
        logits = tf.matmul(tf.reshape(pool_3, [-1, POOL_DIM]), weights["logits"], name="softmax/logits/MatMul")
        tf.nn.softmax(tf.nn.bias_add(logits, weights["bias"]), name="softmax")
    path.write_bytes(graph.as_graph_def(add_shapes=static_batch_one).SerializeToString())
    return path


def conv_offset(weights):
    """The fake convolution's output for mid-grey pixels (128), which its spatial features are distances from."""
    return 128 * weights["conv"].sum(0)


def fake_features(images, weights):
    """(pool, spatial, softmax without bias) of the fake graph, in NumPy."""
    n, height, width = images.shape[:3]
    rows = np.floor(np.arange(SIDE) * (height / SIDE)).astype(int)
    cols = np.floor(np.arange(SIDE) * (width / SIDE)).astype(int)
    conv = np.abs(images[:, rows][:, :, cols].astype(np.float64) @ weights["conv"] - conv_offset(weights))
    pool = np.floor(conv.reshape(n, -1) @ weights["pool"] * 2.0 ** -weights["shift"])
    probs = special.softmax(pool @ weights["logits"].astype(np.float64), axis=1)
    return pool, conv[..., :7].reshape(n, -1), probs


LARGE = {"seed": 1, "shift": 3, "logit_std": 0.004}  # features overflow float16 distances: float32 path
SMALL = {"seed": 2, "shift": 9, "logit_std": 0.4}  # small integer features, exact in float16


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    root = tmp_path_factory.mktemp("graphs")
    large, small = fake_weights(**LARGE), fake_weights(**SMALL)
    return {
        "static": (build_fake_inception(root / "static.pb", large, static_batch_one=True), large),
        "dynamic": (build_fake_inception(root / "dynamic.pb", small, static_batch_one=False), small),
    }


def random_images(seed, n, size=8):
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def parse_output(out):
    lines = out.strip().splitlines()
    assert lines[:6] == PROGRESS_LINES
    assert [line.split(":")[0] for line in lines[6:]] == [name for name, _ in METRIC_LINES]
    return {key: float(line.split(": ")[1]) for line, (_, key) in zip(lines[6:], METRIC_LINES)}


# ----------------------------------------------------------------------------------------------------------
# End to end


def test_end_to_end_computed_statistics(graphs, tmp_path, capsys):
    pb, weights = graphs["static"]
    ref, sample = random_images(0, 200), random_images(1, 150)  # more images than the 112 spatial features
    np.savez(tmp_path / "ref.npz", np.asfortranarray(ref))  # not C-order: read whole
    np.savez_compressed(tmp_path / "sample.npz", sample, np.arange(150))  # arr_1 labels are ignored
    metrics = ev.main([str(tmp_path / "ref.npz"), str(tmp_path / "sample.npz"), "--inception_path", str(pb),
                       "--batch_size", "7"])
    captured = capsys.readouterr()
    assert parse_output(captured.out) == pytest.approx(metrics, rel=1e-12)
    assert "warning" not in captured.err

    ref_pool, ref_spatial, _ = fake_features(ref, weights)
    pool, spatial, probs = fake_features(sample, weights)
    assert_well_conditioned(ref_pool, ref_spatial, pool, spatial)
    # This graph's features are large integers: float16 distances overflow, exact float32 ones are compared.
    assert (ref_pool ** 2).sum(1).max() > 65504 and (pool ** 2).sum(1).max() > 65504
    assert metrics["inception_score"] == pytest.approx(inception_score_reference(probs), rel=1e-4)
    assert metrics["fid"] == pytest.approx(frechet_reference(*stats_reference(pool), *stats_reference(ref_pool)),
                                           rel=1e-6)
    assert metrics["sfid"] == pytest.approx(
        frechet_reference(*stats_reference(spatial), *stats_reference(ref_spatial)), rel=1e-6)
    assert (metrics["precision"], metrics["recall"]) == brute_force_prec_recall(ref_pool, pool)
    assert metrics["inception_score"] > 1.5  # the graph's bias would pin every image to class 0 (IS ~ 1)


@pytest.fixture
def precomputed_ref(tmp_path):
    """A reference batch with images and precomputed statistics (not those of its images)."""
    rng = np.random.default_rng(5)
    ref = random_images(2, 30)
    mu, sigma = random_stats(rng, POOL_DIM)
    mu_s, sigma_s = random_stats(rng, SPATIAL_DIM)
    np.savez(tmp_path / "ref.npz", arr_0=ref, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    np.savez(tmp_path / "sample.npz", random_images(3, 150))  # more images than features
    return tmp_path / "ref.npz", tmp_path / "sample.npz"


def test_end_to_end_precomputed_reference_statistics(graphs, precomputed_ref, capsys):
    pb, weights = graphs["dynamic"]
    ref_path, sample_path = precomputed_ref
    metrics = ev.main([str(ref_path), str(sample_path), "--inception_path", str(pb)])
    assert parse_output(capsys.readouterr().out) == pytest.approx(metrics, rel=1e-12)

    with np.load(ref_path) as ref:
        ref_pool = fake_features(ref["arr_0"], weights)[0]
        stats = {key: ref[key] for key in ("mu", "sigma", "mu_s", "sigma_s")}
    pool, spatial, probs = fake_features(np.load(sample_path)["arr_0"], weights)
    assert_well_conditioned(pool, spatial)
    assert metrics["inception_score"] == pytest.approx(inception_score_reference(probs), rel=1e-4)
    assert metrics["fid"] == pytest.approx(frechet_reference(*stats_reference(pool), stats["mu"], stats["sigma"]),
                                           rel=1e-6)
    assert metrics["sfid"] == pytest.approx(
        frechet_reference(*stats_reference(spatial), stats["mu_s"], stats["sigma_s"]), rel=1e-6)
    assert (metrics["precision"], metrics["recall"]) == brute_force_prec_recall(ref_pool, pool)


def test_corrupt_sample_batch_is_one_line_error(graphs, precomputed_ref, capsys):
    """A damaged image array shows only when read, after the progress lines: one error line, exit status 2."""
    pb, _ = graphs["dynamic"]
    ref_path, sample_path = precomputed_ref
    with np.load(sample_path) as sample:
        flip_byte_of(sample_path, sample["arr_0"])
    with pytest.raises(SystemExit) as exit_info:
        ev.main([str(ref_path), str(sample_path), "--inception_path", str(pb)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: {sample_path}: unreadable .npz (Bad CRC-32 for file 'arr_0.npy')"
    assert not any("Traceback" in line for line in err)


@pytest.mark.parametrize("samples, words", [
    (20, "20 images for 64 features; use at least 64 images"),
    (150, "a covariance is singular (features that are constant or depend on others) or not positive semi-definite"),
])
def test_ill_conditioned_square_root_is_one_line_error(graphs, precomputed_ref, monkeypatch, capsys, samples, words):
    """An imaginary part beyond rounding (simulated on any CPU) is one error line that says what to do, exit 2."""
    pb, _ = graphs["dynamic"]
    ref_path, sample_path = precomputed_ref
    np.savez(sample_path, random_images(3, samples))
    add_imaginary_part(monkeypatch, 1e3)
    with pytest.raises(SystemExit) as exit_info:
        ev.main([str(ref_path), str(sample_path), "--inception_path", str(pb)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: the covariance square root is ill-conditioned (Imaginary component 1000")
    assert last.endswith(words) and "Traceback" not in err


@pytest.mark.parametrize("interrupt, status", [(KeyboardInterrupt, 130), (ev.Terminated, 143)])
def test_interrupt_in_the_tensorflow_run_is_one_line(graphs, precomputed_ref, monkeypatch, capsys, interrupt, status):
    """Ctrl-C (SIGTERM: Terminated) while images go through the graph: `stopped`, the shell's exit status."""
    pb, _ = graphs["dynamic"]
    ref_path, sample_path = precomputed_ref

    def interrupted(self, batches, total=None):
        raise interrupt

    monkeypatch.setattr(ev.InceptionNetwork, "compute_activations", interrupted)
    sigterm_handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exit_info:
        ev.main([str(ref_path), str(sample_path), "--inception_path", str(pb)])
    assert exit_info.value.code == status
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "stopped" and "Traceback" not in err
    assert signal.getsignal(signal.SIGTERM) is sigterm_handler


@pytest.mark.slow
@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_the_run_stops_in_one_line(graphs, tmp_path, signum, status):
    """A real Ctrl-C (SIGINT) or SIGTERM to the running command, while it reads the reference's activations."""
    pb, _ = graphs["dynamic"]
    np.savez(tmp_path / "ref.npz", random_images(0, 20000))  # 20000 batches of 1: seconds of work when signalled
    np.savez(tmp_path / "sample.npz", random_images(1, 10))
    process = subprocess.Popen([sys.executable, str(EVALUATOR), str(tmp_path / "ref.npz"), str(tmp_path / "sample.npz"),
                                "--inception_path", str(pb), "--batch_size", "1"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=interruptible)
    try:
        for line in process.stdout:
            if line == "computing reference batch activations...\n":
                process.send_signal(signum)
                break
        out, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == status, err
    assert err.strip().splitlines()[-1] == "stopped" and "Traceback" not in err
    assert "Inception Score" not in out


@pytest.mark.parametrize("ref_images, sample_images, warned", [
    (None, 25, {"sample": "25 images, fewer than the 64 features of FID and the 112 features of sFID: FID/sFID are "
                          "then biased and unreliable; use at least 112 images"}),
    (None, 100, {"sample": "100 images, fewer than the 112 features of sFID: sFID are then biased and unreliable; "
                           "use at least 112 images"}),
    (None, 150, {}),
    (40, 150, {"ref": "40 images, fewer than the 64 features of FID and the 112 features of sFID"}),
])
def test_too_few_images_for_the_features_is_a_warning(graphs, precomputed_ref, tmp_path, capsys, ref_images,
                                                      sample_images, warned):
    """One line per batch whose statistics come from its images (not precomputed), once the graph has said how
    many features it has: --check_only shows it before any image goes through the graph."""
    pb, _ = graphs["dynamic"]
    ref_path, sample_path = precomputed_ref
    if ref_images:
        np.savez(ref_path, random_images(2, ref_images))
    np.savez(sample_path, random_images(3, sample_images))
    assert ev.main([str(ref_path), str(sample_path), "--check_only", "--inception_path", str(pb)]) is None
    captured = capsys.readouterr()
    assert captured.out == "evaluator inputs are ready\n"
    paths = {"ref": ref_path, "sample": sample_path}
    warnings_ = [line for line in captured.err.splitlines() if line.startswith("warning: ")]
    assert len(warnings_) == len(warned)
    for which, words in warned.items():
        assert any(line.startswith(f"warning: {paths[which]} holds {words}") for line in warnings_)


@pytest.mark.slow
def test_cli_prints_adm_lines_and_writes_json(graphs, precomputed_ref, tmp_path):
    pb, _ = graphs["dynamic"]
    ref_path, sample_path = precomputed_ref
    out_json = tmp_path / "metrics.json"
    result = subprocess.run([sys.executable, str(EVALUATOR), str(ref_path), str(sample_path),
                             "--inception_path", str(pb), "--json", str(out_json)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    printed = parse_output(result.stdout)
    saved = json.loads(out_json.read_text())
    assert saved == {"ref_batch": str(ref_path), "sample_batch": str(sample_path), **printed}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("metrics")] == ["metrics.json"]


def test_check_only(graphs, precomputed_ref, tmp_path, capsys):
    """--check_only loads the graph and checks the reference batch, computing nothing; bad input still fails."""
    pb, _ = graphs["dynamic"]
    ref_path, _ = precomputed_ref
    assert ev.main([str(ref_path), "--check_only", "--inception_path", str(pb)]) is None
    assert capsys.readouterr().out == "evaluator inputs are ready\n"
    assert ev.main([str(ref_path), "--check_only", "--inception_path", str(pb), "--tf_threads", "0"]) is None
    assert capsys.readouterr().out == "evaluator inputs are ready\n"  # 0: TensorFlow's own choice
    err = run_failing([tmp_path / "absent.npz", "--check_only", "--inception_path", pb], capsys)
    assert "absent.npz: no such file" in err
    with np.load(ref_path) as ref:
        np.savez(tmp_path / "small_mu.npz", arr_0=ref["arr_0"], mu=ref["mu"][:10], sigma=ref["sigma"][:10, :10],
                 mu_s=ref["mu_s"], sigma_s=ref["sigma_s"])
    err = run_failing([tmp_path / "small_mu.npz", "--check_only", "--inception_path", pb], capsys)
    assert "precomputed mu has 10 dims" in err


def test_sample_batch_required_without_check_only(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        ev.main([str(tmp_path / "ref.npz")])
    assert exit_info.value.code == 2
    assert "the sample batch is required" in capsys.readouterr().err


def test_batch_dimension_made_dynamic(graphs):
    tf = pytest.importorskip("tensorflow").compat.v1
    pb, _ = graphs["static"]
    graph_def = tf.GraphDef.FromString(pb.read_bytes())
    with tf.Graph().as_default():  # imported as is, the stored shapes pin the batch to 1
        inp = tf.placeholder(tf.float32, [None, None, None, 3])
        (pool,) = tf.import_graph_def(graph_def, input_map={"ExpandDims:0": inp}, return_elements=["pool_3:0"])
        assert pool.shape.as_list()[0] == 1
    for name in ("static", "dynamic"):
        network = ev.InceptionNetwork(str(graphs[name][0]), batch_size=5)
        try:
            assert network.pool_features.shape.as_list() == [None, 1, 1, POOL_DIM]
            assert network.spatial_features.shape.as_list() == [None, SIDE, SIDE, 7]
            assert network.feature_dims == (POOL_DIM, SPATIAL_DIM)
            pool, spatial = network.compute_activations([random_images(4, 5), random_images(5, 3, size=12)])
            assert pool.shape == (8, POOL_DIM) and spatial.shape == (8, SPATIAL_DIM)
        finally:
            network.close()


# ----------------------------------------------------------------------------------------------------------
# Metrics


def test_frechet_distance_matches_eigen_computation():
    rng = np.random.default_rng(0)
    (mu1, sigma1), (mu2, sigma2) = random_stats(rng, 32), random_stats(rng, 32)
    fd = ev.FIDStatistics(mu1, sigma1).frechet_distance(ev.FIDStatistics(mu2, sigma2))
    assert fd == pytest.approx(frechet_reference(mu1, sigma1, mu2, sigma2), rel=1e-9)
    assert ev.FIDStatistics(mu1, sigma1).frechet_distance(ev.FIDStatistics(mu1, sigma1)) == pytest.approx(0, abs=1e-8)


def test_fid_statistics_from_activations():
    acts = np.random.default_rng(1).normal(size=(50, 6)).astype(np.float32)
    stats = ev.FIDStatistics.from_activations(acts)
    mu, sigma = stats_reference(acts)
    np.testing.assert_allclose(stats.mu, mu, rtol=1e-6)
    np.testing.assert_allclose(stats.sigma, sigma, rtol=1e-10)


def test_frechet_distance_singular_product_adds_eps():
    nilpotent = ev.FIDStatistics(np.zeros(2), np.array([[0.0, 1.0], [0.0, 0.0]]))
    identity = ev.FIDStatistics(np.ones(2), np.eye(2))
    with pytest.warns(UserWarning, match="adding 1e-06 to diagonal"):
        fd = nilpotent.frechet_distance(identity)
    eps = 1e-6  # sqrt((1+eps) [[eps, 1], [0, eps]]) has trace 2 sqrt(eps (1 + eps))
    assert fd == pytest.approx(2 + 0 + 2 - 4 * np.sqrt(eps * (1 + eps)), rel=1e-9)


def test_frechet_distance_complex_square_root():
    identity = ev.FIDStatistics(np.zeros(2), np.eye(2))
    tiny_negative = ev.FIDStatistics(np.zeros(2), np.diag([-1e-8, 1.0]))  # imaginary part 1e-4: kept real part
    assert tiny_negative.frechet_distance(identity) == pytest.approx((1 - 1e-8) + 2 - 2 * 1.0, rel=1e-12)
    negative = ev.FIDStatistics(np.zeros(2), np.diag([-1.0, 1.0]))
    with pytest.raises(ValueError, match="Imaginary component 1.0"):
        negative.frechet_distance(identity)


def add_imaginary_part(monkeypatch, value):
    """Make the evaluator's sqrtm return value * i more on the diagonal, as another CPU's BLAS rounds differently."""
    sqrtm = ev._sqrtm
    monkeypatch.setattr(ev, "_sqrtm", lambda a: sqrtm(a) + value * 1j * np.eye(len(a)))


def test_frechet_distance_keeps_the_real_part_of_rounding(monkeypatch):
    """Rounding in sqrtm grows with the features' scale: an imaginary part beyond ADM's 1e-3 (3.6e-3 was seen with
    AVX2 kernels on the 24 and 20 images that this file's end-to-end test once used) is still rounding when it is
    tiny next to the trace; the real part is the honest number."""
    rng = np.random.default_rng(0)
    (mu1, sigma1), (mu2, sigma2) = random_stats(rng, 16), random_stats(rng, 16)
    sample, ref = ev.FIDStatistics(mu1 * 100, sigma1 * 1e4), ev.FIDStatistics(mu2 * 100, sigma2 * 1e4)  # scale 100
    exact = sample.frechet_distance(ref)
    add_imaginary_part(monkeypatch, 4e-3)  # a sum of 0.064 against a trace of about 1.6e5
    assert sample.frechet_distance(ref) == pytest.approx(exact, rel=1e-12)


def test_frechet_distance_refuses_an_imaginary_part_beyond_rounding(monkeypatch):
    rng = np.random.default_rng(0)
    (mu1, sigma1), (mu2, sigma2) = random_stats(rng, 16), random_stats(rng, 16)
    add_imaginary_part(monkeypatch, 1.0)  # a sum of 16 against a trace of about 16
    with pytest.raises(ev.IllConditionedError, match="^Imaginary component 1.0") as error:
        ev.FIDStatistics(mu1, sigma1).frechet_distance(ev.FIDStatistics(mu2, sigma2))
    assert isinstance(error.value, ValueError) and error.value.dims == 16  # a ValueError, as ADM raises


def test_inception_score_known_distributions():
    assert ev.compute_inception_score(np.full((10, 7), 1 / 7)) == pytest.approx(1.0, abs=1e-12)
    assert ev.compute_inception_score(np.eye(6)) == pytest.approx(6.0, rel=1e-12)
    probs = special.softmax(np.random.default_rng(0).normal(scale=3, size=(40, 12)), axis=1)
    assert ev.compute_inception_score(probs) == pytest.approx(inception_score_reference(probs), rel=1e-12)


def test_inception_score_uses_consecutive_splits():
    probs = np.concatenate([np.eye(3), np.full((3, 3), 1 / 3)])
    assert ev.compute_inception_score(probs, split_size=3) == pytest.approx((3 + 1) / 2, rel=1e-12)
    assert ev.compute_inception_score(probs, split_size=6) == pytest.approx(inception_score_reference(probs))
    default = np.concatenate([np.eye(10)[np.arange(5000) % 10], np.full((2000, 10), 0.1)])  # splits 5000 + 2000
    assert ev.compute_inception_score(default) == pytest.approx((10 + 1) / 2, rel=1e-9)


@pytest.fixture(scope="module")
def block():
    """ADM's TensorFlow distance graph in a session of its own."""
    return ev.DistanceBlock()


def test_pairwise_distances_float16_then_float32(block):
    rng = np.random.default_rng(0)
    u, v = rng.normal(size=(9, 16)), rng.normal(size=(7, 16))
    exact = ((u[:, None] - v[None]) ** 2).sum(-1)
    d16 = block.pairwise_distances(u, v)
    assert d16.dtype == np.float32
    np.testing.assert_array_equal(d16, d16.astype(np.float16))  # computed in float16
    np.testing.assert_allclose(d16, exact, atol=0.1)
    d32 = block.pairwise_distances(u * 1e3, v * 1e3)  # |u|^2 ~ 1.6e7 overflows float16
    assert d32.dtype == np.float32
    with np.errstate(over="ignore"):
        assert not np.array_equal(d32, d32.astype(np.float16))  # so the whole block is recomputed in float32
    np.testing.assert_allclose(d32, exact * 1e6, rtol=1e-4)
    self_distances = block.pairwise_distances(u, u).diagonal()  # float16 rounding of |u|^2 ~ 16: steps of 1/64
    assert (self_distances < 0.1).all() and (self_distances < 0.02).mean() > 0.5


def test_less_thans_are_ball_memberships(block):
    rng = np.random.default_rng(1)
    f1, f2 = rng.integers(0, 4, size=(6, 3)).astype(np.float32), rng.integers(0, 4, size=(5, 3)).astype(np.float32)
    r1, r2 = rng.integers(0, 6, size=(6, 1)).astype(np.float32), rng.integers(0, 6, size=(5, 1)).astype(np.float32)
    d = ((f1[:, None] - f2[None]) ** 2).sum(-1)  # small integers: exact in float16
    in_2, in_1 = block.less_thans(f1, r1, f2, r2)
    np.testing.assert_array_equal(in_2[:, 0], (d <= r2[:, 0][None]).any(axis=1))
    np.testing.assert_array_equal(in_1[:, 0], (d <= r1).any(axis=0))


@pytest.mark.parametrize("scale", [1, 256])  # 256: float16 overflows, float32 fallback (still exact)
@pytest.mark.parametrize("batches", [(10000, 10000), (5, 3)])
def test_precision_recall_brute_force(block, scale, batches):
    rng = np.random.default_rng(scale)
    ref = rng.integers(-3, 4, size=(23, 8)).astype(np.float32) * scale
    sample = np.concatenate([ref[:4], ref[:2], rng.integers(0, 7, size=(13, 8)) * scale]).astype(np.float32)
    estimator = ev.ManifoldEstimator(block, row_batch_size=batches[0], col_batch_size=batches[1])
    precision, recall = ev.compute_prec_recall(ref, sample, estimator)
    assert (precision, recall) == brute_force_prec_recall(ref, sample)
    assert 0 < precision < 1 and 0 < recall < 1
    radii = estimator.manifold_radii(ref)
    exact = np.sort(((ref[:, None].astype(np.float64) - ref[None]) ** 2).sum(-1), axis=1)[:, 3]
    np.testing.assert_array_equal(radii[:, 0], exact)


def test_precision_recall_float16_rounding_blocked_as_unblocked(block):
    rng = np.random.default_rng(3)
    ref, sample = rng.normal(size=(40, 32)).astype(np.float32), rng.normal(size=(30, 32)).astype(np.float32)
    whole = ev.compute_prec_recall(ref, sample, ev.ManifoldEstimator(block))
    assert whole == ev.compute_prec_recall(ref, sample, ev.ManifoldEstimator(block, row_batch_size=7, col_batch_size=4))
    radii = ev.ManifoldEstimator(block).manifold_radii(ref)[:, 0]
    np.testing.assert_array_equal(radii, radii.astype(np.float16))  # float16 distances
    np.testing.assert_allclose(whole, brute_force_prec_recall(ref, sample), atol=0.1)


def test_precision_recall_duplicates_count_as_neighbours(block):
    ref = np.repeat(np.eye(3, 8, dtype=np.float32), 4, axis=0)  # each point 4 times: radius 0
    sample = np.concatenate([ref[::4], np.ones((3, 8), np.float32)])
    assert ev.compute_prec_recall(ref, np.repeat(sample, 4, axis=0), ev.ManifoldEstimator(block)) == (0.5, 1.0)


# ----------------------------------------------------------------------------------------------------------
# Reading batches


def write_npz_with_version(path, array, version):
    with zipfile.ZipFile(path, "w") as zf, zf.open("arr_0.npy", "w") as f:
        np.lib.format.write_array(f, array, version=version)


@pytest.mark.parametrize("layout", ["v1", "v2", "v3", "compressed", "fortran"])
def test_npz_reader_batches(tmp_path, layout):
    images = random_images(7, 20)
    path = tmp_path / "batch.npz"
    if layout.startswith("v"):
        write_npz_with_version(path, images, (int(layout[1]), 0))
    elif layout == "compressed":
        np.savez_compressed(path, images)
    else:
        np.savez(path, np.asfortranarray(images))
    with ev.NpzArrayReader(str(path)) as reader:
        assert reader.shape == images.shape and reader.dtype == np.uint8 and len(reader) == 20
        assert reader.streaming == (layout != "fortran")
        batches = list(reader.read_batches(7))
    assert [len(b) for b in batches] == [7, 7, 6]
    np.testing.assert_array_equal(np.concatenate(batches), images)


def flip_byte_of(path, array):
    """Flip one byte in the middle of an array stored (uncompressed) in the .npz at path."""
    raw = bytearray(path.read_bytes())
    data = np.ascontiguousarray(array).tobytes()
    at = raw.find(data) + len(data) // 2
    assert raw.find(data) > 0
    raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("layout", ["c", "fortran"])  # streamed, and read whole
def test_corrupt_batch_is_input_error_naming_the_file(tmp_path, layout):
    images = random_images(7, 20, size=32)  # larger than what reading the header reads ahead (4 KiB)
    path = tmp_path / "batch.npz"
    np.savez(path, np.asfortranarray(images) if layout == "fortran" else images)
    flip_byte_of(path, np.asfortranarray(images).ravel(order="K") if layout == "fortran" else images)
    ev.check_batch_file(str(path))  # the header is intact: only reading the images finds the damage
    with ev.NpzArrayReader(str(path)) as reader, \
            pytest.raises(ev.InputError, match=f"^{path}: unreadable .npz \\(Bad CRC-32 for file 'arr_0.npy'\\)$"):
        list(reader.read_batches(7))


def test_corrupt_precomputed_statistics_are_input_error(tmp_path):
    path = tmp_path / "ref.npz"
    mu, sigma = random_stats(np.random.default_rng(0), 8)
    np.savez(path, arr_0=random_images(0, 5), mu=mu, sigma=sigma, mu_s=mu, sigma_s=sigma)
    flip_byte_of(path, sigma)
    with pytest.raises(ev.InputError, match=f"^{path}: unreadable .npz \\(Bad CRC-32"):
        ev.read_statistics(str(path), None)


# ----------------------------------------------------------------------------------------------------------
# Bad input


@pytest.fixture
def no_network(monkeypatch):
    """Fail the test if the evaluator reaches the Inception network: bad input must be caught before."""
    def refuse(*args, **kwargs):
        raise AssertionError("the Inception network was built before the input was checked")
    monkeypatch.setattr(ev, "InceptionNetwork", refuse)


def run_failing(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        ev.main([str(a) for a in argv])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing started before the error
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    return err


def bad_file(tmp_path, case):
    path = tmp_path / f"{case}.npz"
    if case == "missing":
        return path
    if case == "not_npz":
        path.write_text("not a zip file")
    elif case == "no_arr_0":
        np.savez(path, images=random_images(0, 5))
    elif case == "float":
        np.savez(path, random_images(0, 5).astype(np.float32))
    elif case == "rank3":
        np.savez(path, random_images(0, 5)[..., 0])
    elif case == "channels4":
        np.savez(path, np.zeros((5, 8, 8, 4), np.uint8))
    elif case == "one_image":
        np.savez(path, random_images(0, 1))
    elif case == "three_images":
        np.savez(path, random_images(0, 3))
    elif case == "sigma_mismatch":
        np.savez(path, arr_0=random_images(0, 5), mu=np.zeros(4), sigma=np.eye(3), mu_s=np.zeros(2), sigma_s=np.eye(2))
    elif case == "text_stats":
        np.savez(path, arr_0=random_images(0, 5), mu=np.array(["a", "b"]), sigma=np.full((2, 2), "c"),
                 mu_s=np.zeros(2), sigma_s=np.eye(2))
    elif case == "no_sigma_s":
        np.savez(path, arr_0=random_images(0, 5), mu=np.zeros(3), sigma=np.eye(3), mu_s=np.zeros(2))
    return path


BAD_FILES = {
    "missing": "no such file",
    "not_npz": "not an .npz file",
    "no_arr_0": "no array named 'arr_0'",
    "float": "arr_0 has dtype float32; expected uint8",
    "rank3": "expected [N, height, width, 3] (NHWC",
    "channels4": "arr_0 has shape (5, 8, 8, 4)",
    "one_image": "holds 1 image(s); FID needs at least 2",
    "three_images": "holds 3 images; precision/recall need at least 4 (k+1 for k=3",
    "sigma_mismatch": "mu has shape (4,) and sigma (3, 3); expected [d] and [d, d]",
    "no_sigma_s": "has precomputed mu but no sigma_s",
    "text_stats": "precomputed mu has dtype <U1; expected numbers",
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
@pytest.mark.parametrize("which", ["ref", "sample"])
def test_bad_batch_file(tmp_path, capsys, no_network, case, which):
    good = tmp_path / "good.npz"
    np.savez(good, random_images(0, 5))
    bad = bad_file(tmp_path, case)
    argv = [bad, good] if which == "ref" else [good, bad]
    err = run_failing([*argv, "--inception_path", good], capsys)
    assert BAD_FILES[case] in err and str(bad) in err


@pytest.mark.parametrize("key", ["mu", "sigma", "mu_s", "sigma_s"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize("which", ["ref", "sample"])
def test_non_finite_precomputed_statistics(tmp_path, capsys, no_network, key, value, which):
    """A NaN mean gave `FID: nan` and exit status 0, an infinite covariance a SciPy traceback after the whole run:
    now one error naming the file and the array, before any TensorFlow work."""
    good = tmp_path / "good.npz"
    np.savez(good, random_images(0, 5))
    stats = dict(zip(("mu", "sigma"), random_stats(np.random.default_rng(0), 3)))
    stats.update(zip(("mu_s", "sigma_s"), random_stats(np.random.default_rng(1), 2)))
    stats[key].flat[1] = value
    bad = tmp_path / "stats.npz"
    np.savez(bad, arr_0=random_images(1, 5), **stats)
    argv = [bad, good] if which == "ref" else [good, bad]
    err = run_failing([*argv, "--inception_path", good], capsys)
    assert err == f"error: {bad}: NaN or infinite values in precomputed {key}"


def test_non_finite_statistics_are_refused_where_read(tmp_path):
    """read_statistics, which library users may call on unchecked files, refuses them too, and non-finite features."""
    path = tmp_path / "ref.npz"
    mu, sigma = random_stats(np.random.default_rng(0), 3)
    np.savez(path, arr_0=random_images(0, 5), mu=mu, sigma=sigma, mu_s=mu, sigma_s=np.full((3, 3), np.inf))
    with pytest.raises(ev.InputError, match=f"^{path}: NaN or infinite values in precomputed sigma_s$"):
        ev.read_statistics(str(path), None)
    np.savez(path, random_images(0, 5))
    features = np.ones((5, 4))
    features[2, 1] = np.nan
    with pytest.raises(ev.InputError, match=f"^{path}: NaN or infinite values in the pool features of arr_0$"):
        ev.read_statistics(str(path), (features, np.ones((5, 4))))


def test_precomputed_statistics_of_wrong_dimension(graphs, tmp_path, capsys):
    pb, _ = graphs["dynamic"]
    sample = tmp_path / "sample.npz"
    np.savez(sample, random_images(0, 5))
    rng = np.random.default_rng(0)
    for bad_key, expected in (("mu", f"precomputed mu has 10 dims but the Inception pool features have {POOL_DIM}"),
                              ("mu_s", f"mu_s has 10 dims but the Inception spatial features have {SPATIAL_DIM}")):
        stats = dict(zip(("mu", "sigma"), random_stats(rng, 10 if bad_key == "mu" else POOL_DIM)))
        stats.update(zip(("mu_s", "sigma_s"), random_stats(rng, 10 if bad_key == "mu_s" else SPATIAL_DIM)))
        np.savez(tmp_path / "ref.npz", arr_0=random_images(1, 5), **stats)
        err = run_failing([tmp_path / "ref.npz", sample, "--inception_path", pb], capsys)
        assert expected in err


def test_bad_inception_graph(tmp_path, capsys):
    batch = tmp_path / "batch.npz"
    np.savez(batch, random_images(0, 5))
    err = run_failing([batch, batch, "--inception_path", tmp_path / "absent.pb"], capsys)
    assert "absent.pb: no such file" in err
    err = run_failing([batch, batch, "--inception_path", tmp_path], capsys)
    assert err == f"error: {tmp_path}: is a directory, not the graph file (--inception_path)"
    junk = tmp_path / "junk.pb"
    junk.write_bytes(b"\xff" * 100)
    err = run_failing([batch, batch, "--inception_path", junk], capsys)
    assert "cannot read the Inception graph" in err and "delete" not in err  # the user's own file
    tf = pytest.importorskip("tensorflow").compat.v1
    with tf.Graph().as_default() as graph:
        tf.identity(tf.placeholder(tf.float32, [None, None, None, 3]), name="ExpandDims")
    other = tmp_path / "other.pb"
    other.write_bytes(graph.as_graph_def().SerializeToString())
    err = run_failing([batch, batch, "--inception_path", other], capsys)
    assert "not an Inception graph with ExpandDims:0, pool_3:0" in err


@pytest.mark.parametrize("flag, value, expected", [
    ("--batch_size", "0", "--batch_size must be at least 1, not 0"),
    ("--tf_threads", "-1", "--tf_threads must be at least 0 (0: TensorFlow's choice), not -1"),
])
def test_counts_checked_first(tmp_path, capsys, no_network, flag, value, expected):
    err = run_failing([tmp_path / "a.npz", tmp_path / "b.npz", flag, value], capsys)
    assert err == f"error: {expected}"


def test_negative_threads_refused_before_tensorflow(tmp_path):
    """TensorFlow aborts the process (a C++ stack dump) on a negative thread count: refused before."""
    with pytest.raises(ev.InputError, match="--tf_threads must be at least 0"):
        ev.InceptionNetwork(str(tmp_path / "graph.pb"), threads=-1)


def test_json_directory_must_exist(tmp_path, capsys, no_network):
    batch = tmp_path / "batch.npz"
    np.savez(batch, random_images(0, 5))
    err = run_failing([batch, batch, "--inception_path", batch, "--json", tmp_path / "nowhere" / "m.json"], capsys)
    assert "its directory does not exist" in err


def test_json_must_not_be_a_directory(tmp_path, capsys, no_network):
    batch = tmp_path / "batch.npz"
    np.savez(batch, random_images(0, 5))
    (tmp_path / "out").mkdir()
    err = run_failing([batch, batch, "--inception_path", batch, "--json", tmp_path / "out"], capsys)
    assert err == f"error: {tmp_path / 'out'}: is a directory; --json needs a file name"


def test_json_must_be_writable(tmp_path, capsys, no_network, monkeypatch):
    """Checked before any TensorFlow work (root may write anywhere, so os.access stands in for a read-only folder)."""
    batch = tmp_path / "batch.npz"
    np.savez(batch, random_images(0, 5))
    monkeypatch.setattr(ev.os, "access", lambda path, mode: False)
    err = run_failing([batch, batch, "--inception_path", batch, "--json", tmp_path / "m.json"], capsys)
    assert err == f"error: {tmp_path / 'm.json'}: not writable (--json)"


@pytest.mark.parametrize("argv, words", [
    ([], "the following arguments are required: ref_batch"),
    (["ref.npz"], "the sample batch is required (unless --check_only)"),
    (["ref.npz", "s.npz", "--batch_size", "abc"], "argument --batch_size: invalid int value: 'abc'"),
    (["ref.npz", "s.npz", "--colour"], "unrecognized arguments: --colour"),
])
def test_malformed_command_line_is_one_line(argv, words, capsys):
    err = run_failing(argv, capsys)
    assert words in err and err.endswith("(see --help)")


def test_images_of_another_size_than_the_reference_are_a_warning(tmp_path, capsys):
    for name, size in (("ref", 8), ("same", 8), ("big", 16)):
        np.savez(tmp_path / f"{name}.npz", random_images(0, 5, size))
    ev.warn_if_sizes_differ(tmp_path / "ref.npz", tmp_path / "same.npz")
    assert capsys.readouterr().err == ""
    ev.warn_if_sizes_differ(tmp_path / "ref.npz", tmp_path / "big.npz")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: the reference images are 8x8 and the samples 16x16;")


@pytest.mark.parametrize("case", ["directory", "unserialisable"])
def test_write_json_leaves_nothing_when_it_fails(tmp_path, case):
    path, data = tmp_path / "m.json", {"fid": 1.0}
    if case == "directory":
        path.mkdir()
    else:
        data["fid"] = object()
    with pytest.raises((OSError, TypeError)):
        ev.write_json(str(path), data)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["m.json"] if case == "directory" else [])


# ----------------------------------------------------------------------------------------------------------
# Inception graph download (never touches the network)


class FakeResponse:
    def __init__(self, payload):
        self.payload, self.headers = payload, {"Content-Length": str(len(payload))}

    def read(self, n):
        chunk, self.payload = self.payload[:n], self.payload[n:]
        return chunk

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def test_download_inception_graph_into_cache(tmp_path, monkeypatch):
    calls = []

    def fake_urlopen(url, timeout):
        calls.append(url)
        return FakeResponse(b"graph" * 1000)

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(ev.urllib.request, "urlopen", fake_urlopen)
    path = Path(ev.fetch_inception_graph())
    assert path == tmp_path / "ldm-faster-diffusion" / "classify_image_graph_def.pb"
    assert path.read_bytes() == b"graph" * 1000
    assert Path(ev.fetch_inception_graph()) == path and calls == [ev.INCEPTION_URL]  # cached: one download
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_download_offline_is_one_line_error(tmp_path, monkeypatch, capsys):
    def offline(url, timeout):
        raise urllib.error.URLError("no network")

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(ev.urllib.request, "urlopen", offline)
    batch = tmp_path / "batch.npz"
    np.savez(batch, random_images(0, 5))
    err = run_failing([batch, batch], capsys)
    assert "cannot download the Inception graph" in err and "no network" in err and "--inception_path" in err
    assert list((tmp_path / "cache" / "ldm-faster-diffusion").iterdir()) == []


class _CutHandler(http.server.BaseHTTPRequestHandler):
    """Announces the whole payload in Content-Length; sends half of it on the first request, then closes."""

    def __init__(self, payload, requests, *args, **kwargs):
        self.payload, self.requests = payload, requests
        super().__init__(*args, **kwargs)

    def do_GET(self):
        self.requests.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.payload)))
        self.end_headers()
        self.wfile.write(self.payload[:len(self.payload) // 2] if len(self.requests) == 1 else self.payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def cut_server(monkeypatch, tmp_path):
    """INCEPTION_URL on a local server whose first answer stops halfway; the cache under tmp_path."""
    payload, requests = b"graph" * 1000, []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_CutHandler, payload, requests))
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    monkeypatch.setattr(ev, "INCEPTION_URL", f"http://127.0.0.1:{httpd.server_address[1]}/graph.pb")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    yield payload, requests
    httpd.shutdown()
    httpd.server_close()


def test_cut_download_is_not_cached(cut_server, tmp_path, capsys):
    payload, requests = cut_server
    batch = tmp_path / "batch.npz"
    np.savez(batch, random_images(0, 5))
    with pytest.raises(SystemExit) as exit_info:
        ev.main([str(batch), str(batch)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the download's progress bar
    assert err == (f"error: the download of the Inception graph from {ev.INCEPTION_URL} stopped at 2500 of 5000 "
                   "bytes; run again")
    cache = tmp_path / "cache" / "ldm-faster-diffusion"
    assert list(cache.iterdir()) == []
    assert Path(ev.fetch_inception_graph()).read_bytes() == payload and len(requests) == 2  # the next run fetches it
    assert [p.name for p in cache.iterdir()] == ["graph.pb"]


def test_damaged_cached_graph_says_to_delete_it(tmp_path, monkeypatch, capsys, no_download):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cached = Path(ev.cached_graph_path())
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"\xff" * 100)  # as a cut download cached before this was checked
    batch = tmp_path / "batch.npz"
    np.savez(batch, random_images(0, 5))
    err = run_failing([batch, batch], capsys)
    assert err == (f"error: {cached}: cannot read the Inception graph (DecodeError); delete {cached} and run again "
                   "to download it again")


@pytest.fixture
def no_download(monkeypatch):
    """Fail the test if the evaluator downloads anything."""
    def refuse(*args, **kwargs):
        raise AssertionError("the evaluator downloaded the Inception graph")
    monkeypatch.setattr(ev.urllib.request, "urlopen", refuse)
