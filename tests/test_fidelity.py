"""evaluations/fidelity.py: per-pair fidelity measures against independent computations, the bootstrap, the
command line and its refusals.

The feature graph is the small fake Inception graph of test_evaluator.py (integer weights, so its pool_3 features
are exact in float32 and fake_features recomputes them, and its class probabilities, in NumPy).
"""
import json
import math
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
from skimage.metrics import structural_similarity

from conftest import REPO, load_script
from test_evaluator import SMALL, build_fake_inception, fake_features, fake_weights, flip_byte_of

fidelity = load_script("evaluations/fidelity.py")
evaluator = fidelity.evaluator
SCRIPT = REPO / "evaluations" / "fidelity.py"


# ----------------------------------------------------------------------------------------------------------
# Synthetic batches


def base_images(n, size=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def noisy(images, scales, seed=1):
    """images with Gaussian noise of standard deviation scales[i] on image i, rounded and clipped to uint8."""
    noise = np.random.default_rng(seed).normal(size=images.shape) * np.reshape(scales, (-1, 1, 1, 1))
    return np.clip(np.round(images + noise), 0, 255).astype(np.uint8)


def latents_like(n, seed=2):
    return np.random.default_rng(seed).normal(size=(n, 4, 4, 4)).astype(np.float32)


def write_batch(path, images, labels=None, latents=None):
    arrays = {"arr_0": images}
    if labels is not None:
        arrays["arr_1"] = np.asarray(labels)
    if latents is not None:
        arrays["latents"] = latents
    np.savez(path, **arrays)
    return str(path)


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    """(path, weights) of the fake Inception graph."""
    weights = fake_weights(**SMALL)
    return str(build_fake_inception(tmp_path_factory.mktemp("graph") / "graph.pb", weights, False)), weights


@pytest.fixture
def batches(tmp_path):
    """(base, closer, farther): 60 pairs from the same labels; 'closer' has less image and latent noise."""
    n = 60
    images, labels, latents = base_images(n), np.arange(n) % 10, latents_like(n)
    scales = np.linspace(2, 40, n)
    rng = np.random.default_rng(3)
    base = write_batch(tmp_path / "base.npz", images, labels, latents)
    closer = write_batch(tmp_path / "closer.npz", noisy(images, scales, seed=4), labels,
                         latents + 0.05 * rng.normal(size=latents.shape).astype(np.float32))
    farther = write_batch(tmp_path / "farther.npz", noisy(images, 2 * scales, seed=5), labels,
                          latents + 0.2 * rng.normal(size=latents.shape).astype(np.float32))
    return base, closer, farther


def strict_json(path):
    """The JSON file at path, refusing NaN and Infinity (which json.dump writes but JSON does not allow)."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")
    with open(path) as f:
        return json.load(f, parse_constant=refuse)


def run_main(argv, capsys):
    """(exit status, stdout, stderr) of fidelity.main(argv), without any warning raised as an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        status = fidelity.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# ----------------------------------------------------------------------------------------------------------
# Independent computations


def psnr_reference(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2, axis=(1, 2, 3))
    return 10 * np.log10(255.0 ** 2 / mse)


def ssim_reference(a, b):
    """The mean over channels of SSIM on each 2-D channel."""
    return np.array([np.mean([structural_similarity(x[..., c], y[..., c], data_range=255) for c in range(3)])
                     for x, y in zip(a, b)])


def relative_l2_reference(a, b):
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.sqrt(((a - b) ** 2).sum(axis=(1, 2, 3))) / np.sqrt((a ** 2).sum(axis=(1, 2, 3)))


def bootstrap_interval_reference(values, resamples=1000, seed=0):
    """The percentile bootstrap of the mean as specified: rng.integers(0, n, n) of default_rng(seed) per resample."""
    rng = np.random.default_rng(seed)
    means = [values[rng.integers(0, len(values), len(values))].mean() for _ in range(resamples)]
    return np.percentile(means, [2.5, 97.5])


# ----------------------------------------------------------------------------------------------------------
# Per-pair measures


def test_psnr_is_its_formula_in_float64_and_inf_for_identical_images():
    a = base_images(12, size=9)
    b = noisy(a, np.linspace(0.5, 60, 12))
    b[3] = a[3]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        values = fidelity.psnr(a, b)
    assert values[3] == math.inf
    np.testing.assert_allclose(np.delete(values, 3), psnr_reference(np.delete(a, 3, 0), np.delete(b, 3, 0)),
                               rtol=1e-13)
    extreme = np.stack([np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 3), 255, np.uint8)])
    assert fidelity.psnr(extreme[:1], extreme[1:]) == pytest.approx([0.0], abs=1e-12)  # mse = peak^2


def test_ssim_is_the_mean_of_per_channel_ssim_and_one_for_identical_images():
    a = base_images(5, size=12)
    b = noisy(a, [3, 10, 30, 60, 90])
    np.testing.assert_allclose(fidelity.ssim(a, b), ssim_reference(a, b), rtol=1e-12)
    assert fidelity.ssim(a, a.copy()) == pytest.approx(np.ones(5), abs=1e-12)


def test_relative_l2_of_each_pair():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 4, 3, 3)), rng.normal(size=(6, 4, 3, 3))
    np.testing.assert_allclose(fidelity.relative_l2(a, b), relative_l2_reference(a, b), rtol=1e-13)
    zero = np.zeros((2, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list(fidelity.relative_l2(zero, np.stack([np.zeros(5), np.ones(5)]))) == [0.0, math.inf]


def test_features_and_classes_are_the_graphs(graph):
    path, weights = graph
    images = base_images(70, size=11)  # more than one run of the graph
    network = evaluator.InceptionNetwork(path)
    try:
        chunk = fidelity.describe(network, images, None)
    finally:
        network.close()
    pool, _, probs = fake_features(images, weights)
    np.testing.assert_array_equal(chunk.features, pool)
    np.testing.assert_array_equal(chunk.classes, probs.argmax(axis=1))


# ----------------------------------------------------------------------------------------------------------
# Bootstrap


def test_percentile_interval_is_numpys_and_keeps_inf():
    values = np.random.default_rng(0).normal(size=101)
    assert fidelity.percentile_interval(values) == pytest.approx(tuple(np.percentile(values, [2.5, 97.5])), rel=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        low, high = fidelity.percentile_interval(np.r_[np.arange(90.0), [math.inf] * 10])
        assert low == pytest.approx(np.percentile(np.arange(90.0), 2.5 * 99 / 89)) and high == math.inf
        assert fidelity.percentile_interval(np.full(10, math.inf)) == (math.inf, math.inf)
        low, high = fidelity.percentile_interval(np.r_[[-math.inf] * 10, np.arange(90.0)])
        assert low == -math.inf and high == pytest.approx(np.percentile(np.arange(90.0), 100 - 2.5 * 99 / 89))
        assert all(math.isnan(bound) for bound in fidelity.percentile_interval(np.r_[1.0, math.nan]))


def test_bootstrap_interval_covers_the_mean_at_its_nominal_rate():
    """400 samples of 200 draws of a skewed distribution (Gamma(4), mean 4): the 95% interval covers the mean in
    between 91% and 98% of them (binomial bounds of a true 95% at about 3 standard deviations)."""
    rng = np.random.default_rng(0)
    covered = 0
    for repetition in range(400):
        values = rng.gamma(4.0, size=(200, 1))
        low, high = fidelity.percentile_interval(fidelity.bootstrap_means(values, 1000, repetition)[:, 0])
        covered += low <= 4.0 <= high
    assert 0.91 <= covered / 400 <= 0.98


def test_bootstrap_resamples_the_same_pairs_for_every_column():
    values = np.random.default_rng(1).normal(size=50)
    means = fidelity.bootstrap_means(np.stack([values, values + 1], axis=1), 200, seed=7)
    np.testing.assert_allclose(means[:, 1] - means[:, 0], 1.0, rtol=1e-12)
    rng = np.random.default_rng(7)
    np.testing.assert_allclose(means[:, 0], [values[rng.integers(0, 50, 50)].mean() for _ in range(200)], rtol=1e-12)


def test_infinite_means_give_inf_and_an_undefined_difference():
    psnr = np.array([20.0, math.inf, 30.0, 25.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = fidelity.summarize({"samples": {"psnr": psnr}, "other": {"psnr": psnr[::-1].copy()}}, 100, 0)
    assert report["samples_vs_base"]["psnr"]["mean"] == math.inf
    assert report["samples_vs_base"]["psnr"]["identical"] == 1 and report["samples_vs_base"]["psnr"]["median"] == 27.5
    assert math.isnan(report["samples_minus_other"]["psnr"]["mean"])
    assert fidelity.json_safe(report["samples_minus_other"]["psnr"])["mean"] is None
    assert fidelity.json_safe({"a": [math.inf, -math.inf, 1.5]}) == {"a": ["inf", "-inf", 1.5]}


# ----------------------------------------------------------------------------------------------------------
# End to end, in this process


def test_means_match_independent_computations(graph, batches, tmp_path, capsys):
    path, weights = graph
    base, closer, _ = batches
    out = tmp_path / "out.json"
    status, stdout, stderr = run_main([base, closer, "--inception_path", path, "--json", out], capsys)
    assert status == 0 and stderr == ""
    report = strict_json(out)
    with np.load(base) as b, np.load(closer) as s:
        a, c, za, zc = b["arr_0"], s["arr_0"], b["latents"], s["latents"]
    pool_a, _, probs_a = fake_features(a, weights)
    pool_c, _, probs_c = fake_features(c, weights)
    feature_distance = np.linalg.norm(pool_a - pool_c, axis=1) / np.linalg.norm(pool_a, axis=1)
    same_class = probs_a.argmax(1) == probs_c.argmax(1)
    expected = {"psnr": psnr_reference(a, c), "ssim": ssim_reference(a, c), "feature_distance": feature_distance,
                "same_class": same_class.astype(float), "latent_rel_l2": relative_l2_reference(za, zc)}
    measures = report["samples_vs_base"]
    assert set(measures) == set(expected)
    for key, values in expected.items():
        assert measures[key]["mean"] == pytest.approx(values.mean(), rel=1e-12), key
    assert measures["psnr"]["interval"] == pytest.approx(list(bootstrap_interval_reference(expected["psnr"])),
                                                         rel=1e-12)
    assert measures["psnr"]["identical"] == 0
    assert measures["psnr"]["median"] == pytest.approx(np.median(expected["psnr"]), rel=1e-12)
    assert 0 < same_class.mean() < 1 and feature_distance.min() < feature_distance.max()  # the test discriminates
    assert {key: report[key] for key in ("base", "samples", "pairs", "resamples", "seed", "level")} == {
        "base": base, "samples": closer, "pairs": 60, "resamples": 1000, "seed": 0, "level": 0.95}

    lines = stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["PSNR (dB)", "SSIM", "feature distance", "same class",
                                                      "latent rel. L2"]
    psnr = measures["psnr"]
    assert lines[0] == (f"PSNR (dB): {psnr['mean']:.2f} [{psnr['interval'][0]:.2f}, {psnr['interval'][1]:.2f}] "
                        f"(60 pairs, 0 identical, median {psnr['median']:.1f})")
    assert lines[3] == "same class: {:.1f}% [{:.1f}%, {:.1f}%]".format(
        100 * same_class.mean(), *(100 * bound for bound in measures["same_class"]["interval"]))


def test_identical_images_give_psnr_inf_and_valid_json(graph, tmp_path, capsys):
    images, labels = base_images(20), np.arange(20)
    base = write_batch(tmp_path / "base.npz", images, labels)
    same = write_batch(tmp_path / "same.npz", images, labels)
    partly = images.copy()
    partly[5:] = noisy(images[5:], np.full(15, 10.0))
    partly_path = write_batch(tmp_path / "partly.npz", partly, labels)
    out = tmp_path / "out.json"
    status, stdout, stderr = run_main([base, same, "--vs", partly_path, "--inception_path", graph[0],
                                       "--json", out], capsys)
    assert status == 0 and stderr == ""
    lines = stdout.splitlines()
    assert lines[1] == "  PSNR (dB): inf [inf, inf] (20 pairs, 20 identical, median inf)"
    assert lines[2:5] == ["  SSIM: 1.0000 [1.0000, 1.0000]", "  feature distance: 0 [0, 0]",
                          "  same class: 100.0% [100.0%, 100.0%]"]
    assert lines[6].startswith("  PSNR (dB): inf [") and "(20 pairs, 5 identical, median " in lines[6]
    report = strict_json(out)
    assert report["samples_vs_base"]["psnr"] == {"mean": "inf", "interval": ["inf", "inf"], "identical": 20,
                                                 "median": "inf"}
    other = report["other_vs_base"]["psnr"]
    assert other["mean"] == "inf" and other["identical"] == 5
    finite = psnr_reference(images[5:], partly[5:])
    assert other["median"] == pytest.approx(np.median(np.r_[finite, [np.inf] * 5]), rel=1e-12)
    assert other["median"] == pytest.approx(np.sort(finite)[9:11].mean(), rel=1e-12)  # pairs 10 and 11 of 20
    assert report["samples_minus_other"]["psnr"]["mean"] is None  # inf - inf: undefined, written as null
    assert report["samples_minus_other"]["ssim"]["mean"] > 0


def test_vs_ranks_the_closer_batch_with_a_paired_interval(graph, batches, tmp_path, capsys):
    base, closer, farther = batches
    out = tmp_path / "out.json"
    status, stdout, _ = run_main([base, closer, "--vs", farther, "--inception_path", graph[0], "--json", out,
                                  "--resamples", "500", "--seed", "3"], capsys)
    assert status == 0
    report = strict_json(out)
    assert report["other"] == farther and report["resamples"] == 500 and report["seed"] == 3
    difference = report["samples_minus_other"]
    for key in ("psnr", "ssim", "feature_distance", "same_class", "latent_rel_l2"):
        expected = report["samples_vs_base"][key]["mean"] - report["other_vs_base"][key]["mean"]
        assert difference[key]["mean"] == pytest.approx(expected, rel=1e-12, abs=1e-15)
        low, high = difference[key]["interval"]
        assert low <= difference[key]["mean"] <= high
    for key in ("psnr", "ssim"):  # closer: higher PSNR and SSIM ...
        assert difference[key]["interval"][0] > 0
    for key in ("feature_distance", "latent_rel_l2"):  # ... lower distances
        assert difference[key]["interval"][1] < 0

    with np.load(base) as b, np.load(closer) as c, np.load(farther) as f:
        paired = psnr_reference(b["arr_0"], c["arr_0"]) - psnr_reference(b["arr_0"], f["arr_0"])
    assert difference["psnr"]["interval"] == pytest.approx(list(bootstrap_interval_reference(paired, 500, 3)),
                                                           rel=1e-12)
    lines = stdout.splitlines()
    assert lines[0] == f"{closer} vs {base}:" and lines[6] == f"{farther} vs {base}:"
    assert lines[12] == f"{closer} - {farther} (paired; same class in percentage points):"
    assert lines[13].startswith(f"  PSNR (dB): +{difference['psnr']['mean']:.2f} [+")
    assert len(lines) == 18


def test_results_do_not_depend_on_the_chunk_size(graph, batches, tmp_path, capsys):
    base, closer, farther = batches
    reports = []
    for batch_size in (7, 500):
        out = tmp_path / f"out{batch_size}.json"
        status, _, _ = run_main([base, closer, "--vs", farther, "--inception_path", graph[0], "--json", out,
                                 "--batch_size", batch_size, "--resamples", "200"], capsys)
        assert status == 0
        reports.append(strict_json(out))
    assert reports[0] == reports[1]


def test_damaged_images_found_while_measuring_leave_no_json(graph, batches, tmp_path, capsys):
    base, closer, _ = batches
    with np.load(closer) as batch:
        images = batch["arr_0"]
    flip_byte_of(tmp_path / "closer.npz", images)
    out = tmp_path / "out.json"
    status, stdout, stderr = run_main([base, closer, "--inception_path", graph[0], "--json", out], capsys)
    assert status == 2 and stdout == ""
    assert stderr == f"error: {closer}: unreadable .npz (Bad CRC-32 for file 'arr_0.npy')\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.npz", "closer.npz", "farther.npz"]


def test_non_finite_latents_are_refused(graph, tmp_path, capsys):
    images, latents = base_images(10), latents_like(10)
    base = write_batch(tmp_path / "base.npz", images, latents=latents)
    latents[7, 1, 2, 3] = np.nan
    samples = write_batch(tmp_path / "samples.npz", images, latents=latents)
    status, stdout, stderr = run_main([base, samples, "--inception_path", graph[0], "--batch_size", "4",
                                       "--json", tmp_path / "out.json"], capsys)
    assert (status, stdout) == (2, "")
    assert stderr == f"error: {samples}: NaN or infinite values in latents\n"
    assert not (tmp_path / "out.json").exists()


@pytest.mark.parametrize("interrupt, status", [(KeyboardInterrupt, 130), (evaluator.Terminated, 143)])
def test_interrupt_is_one_line(batches, tmp_path, capsys, monkeypatch, interrupt, status):
    base, closer, _ = batches

    class Network:
        def close(self):
            pass

    def interrupted(*args):
        raise interrupt

    monkeypatch.setattr(evaluator, "InceptionNetwork", lambda path: Network())
    monkeypatch.setattr(fidelity, "describe", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        fidelity.main([base, closer, "--inception_path", __file__, "--json", str(tmp_path / "out.json")])
    assert exit_info.value.code == status
    assert capsys.readouterr().err == "stopped\n"
    assert not (tmp_path / "out.json").exists()


# ----------------------------------------------------------------------------------------------------------
# Bad input: one error line, exit status 2, before any TensorFlow work, no JSON


@pytest.fixture
def no_network(monkeypatch):
    """Fail the test if the feature graph is fetched or loaded: bad input must be caught before."""
    def refuse(*args, **kwargs):
        raise AssertionError("the feature graph was reached before the input was checked")
    monkeypatch.setattr(evaluator, "InceptionNetwork", refuse)
    monkeypatch.setattr(evaluator, "fetch_inception_graph", refuse)


def bad_inputs(tmp_path, case):
    """(argv, expected error line) of one kind of bad input."""
    n, labels, latents = 10, np.arange(10), latents_like(10)
    base = write_batch(tmp_path / "base.npz", base_images(n), labels, latents)
    good = write_batch(tmp_path / "good.npz", base_images(n, seed=1), labels, latents)
    bad = str(tmp_path / "bad.npz")
    argv, expected = [base, bad], None
    if case == "count":
        write_batch(bad, base_images(8), labels[:8], latents[:8])
        expected = f"the batches are not paired: {base} holds 10 samples, {bad} 8"
    elif case == "image size":
        write_batch(bad, base_images(n, size=12), labels, latents)
        expected = f"the batches are not paired: {base} holds 16x16x3 images, {bad} 12x12x3"
    elif case == "labels differ":
        write_batch(bad, base_images(n), labels[::-1], latents)
        expected = f"the batches are not paired: {base} and {bad} have different labels (arr_1)"
    elif case == "labels in one":
        write_batch(bad, base_images(n), None, latents)
        expected = f"the batches are not paired: {base} holds labels (arr_1) and {bad} none"
    elif case == "latents in base only":
        write_batch(bad, base_images(n), labels)
        expected = (f"the batches are not paired: {base} holds latents and {bad} none (sample both with "
                    "--save_latents, or neither)")
    elif case == "latents in samples only":
        argv = [good, base]
        write_batch(good, base_images(n), labels)
        expected = (f"the batches are not paired: {base} holds latents and {good} none (sample both with "
                    "--save_latents, or neither)")
    elif case == "latent shapes":
        write_batch(bad, base_images(n), labels, latents[:, :2])
        expected = f"the batches are not paired: {base} holds latents of shape 4x4x4, {bad} 2x4x4"
    elif case == "latents not one per image":
        write_batch(bad, base_images(n), labels, latents[:9])
        expected = f"{bad}: latents has shape (9, 4, 4, 4); expected one array per image (10)"
    elif case == "empty":
        argv = [bad, bad]
        write_batch(bad, np.zeros((0, 16, 16, 3), np.uint8))
        expected = f"{bad}: arr_0 holds no images"
    elif case == "not uint8":
        write_batch(bad, base_images(n).astype(np.float32), labels, latents)
        expected = f"{bad}: arr_0 has dtype float32; expected uint8 images (0..255)"
    elif case == "too small for SSIM":
        argv = [bad, bad]
        write_batch(bad, base_images(n, size=6))
        expected = f"{bad}: its images are 6x6; SSIM needs at least 7x7"
    elif case == "not an npz":
        with open(bad, "w") as f:
            f.write("not a zip archive\n")
        expected = f"{bad}: not an .npz file"
    elif case == "missing":
        expected = f"{bad}: no such file"
    elif case == "damaged labels":
        write_batch(bad, base_images(n), labels, latents)
        flip_byte_of(tmp_path / "bad.npz", labels)
        expected = f"{bad}: unreadable .npz (Bad CRC-32 for file 'arr_1.npy')"
    elif case == "json folder missing":
        argv = [base, good, "--json", tmp_path / "absent" / "out.json"]
        expected = f"{tmp_path / 'absent' / 'out.json'}: its directory does not exist (--json)"
    elif case == "vs unpaired":
        write_batch(bad, base_images(n), labels + 1, latents)
        argv = [base, good, "--vs", bad]
        expected = f"the batches are not paired: {base} and {bad} have different labels (arr_1)"
    elif case == "graph missing":
        argv = [base, good, "--inception_path", tmp_path / "absent.pb"]
        expected = f"{tmp_path / 'absent.pb'}: no such file (--inception_path)"
    return argv, f"error: {expected}\n"


@pytest.mark.parametrize("case", [
    "count", "image size", "labels differ", "labels in one", "latents in base only", "latents in samples only",
    "latent shapes", "latents not one per image", "empty", "not uint8", "too small for SSIM", "not an npz",
    "missing", "damaged labels", "json folder missing", "vs unpaired", "graph missing"])
def test_bad_input_is_one_line_before_any_tensorflow_work(tmp_path, capsys, no_network, case):
    argv, expected = bad_inputs(tmp_path, case)
    if "--json" not in argv:
        argv += ["--json", tmp_path / "out.json"]
    files = sorted(tmp_path.iterdir())
    status, stdout, stderr = run_main(argv, capsys)
    assert (status, stdout, stderr) == (2, "", expected)
    assert sorted(tmp_path.iterdir()) == files  # no JSON, nothing half-written


@pytest.mark.parametrize("flag, value, expected", [
    ("--batch_size", "0", "--batch_size must be at least 1, not 0"),
    ("--resamples", "1", "--resamples must be at least 2, not 1"),
    ("--seed", "-1", "--seed must be at least 0, not -1"),
])
def test_numbers_checked_first(tmp_path, capsys, no_network, flag, value, expected):
    argv = [tmp_path / "absent.npz", tmp_path / "absent.npz", flag, value]
    assert run_main(argv, capsys) == (2, "", f"error: {expected}\n")


def test_malformed_command_line_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        fidelity.main([str(tmp_path / "base.npz"), str(tmp_path / "samples.npz"), "--resamples", "many"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: argument --resamples: invalid int value: 'many'")


# ----------------------------------------------------------------------------------------------------------
# The command, in a subprocess


@pytest.mark.slow
def test_command_on_1000_pairs_of_32x32_within_a_minute(graph, tmp_path):
    """TensorFlow's start included, on 2 cores."""
    images, labels, latents = base_images(1000, size=32), np.arange(1000) % 10, latents_like(1000)
    sample_images = noisy(images, np.full(1000, 8.0))
    base = write_batch(tmp_path / "base.npz", images, labels, latents)
    samples = write_batch(tmp_path / "samples.npz", sample_images, labels,
                          latents + np.float32(0.1) * latents_like(1000, seed=9))
    out = tmp_path / "out.json"
    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(SCRIPT), base, samples, "--inception_path", graph[0],
                             "--json", str(out)], capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    assert elapsed < 60
    assert "Warning" not in result.stderr and "Traceback" not in result.stderr
    lines = result.stdout.splitlines()
    median = np.median(psnr_reference(images, sample_images))
    assert len(lines) == 5 and lines[0].endswith(f" (1000 pairs, 0 identical, median {median:.1f})")
    report = strict_json(out)
    assert report["pairs"] == 1000 and set(report["samples_vs_base"]) == {
        "psnr", "ssim", "feature_distance", "same_class", "latent_rel_l2"}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("out")] == ["out.json"]
