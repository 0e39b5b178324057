"""evaluations/paired_fid.py: the paired bootstrap of an FID difference, and its command line."""
import signal

import numpy as np
import pytest

from conftest import REPO, load_script

paired_fid = load_script("evaluations/paired_fid.py")
evaluator = paired_fid.evaluator
GRAPH = REPO / "models" / "digits32" / "classifier.pb"


def features(seed, n=300, dim=8, shift=0.0):
    return np.random.default_rng(seed).normal(size=(n, dim)) + shift


def reference():
    return evaluator.FIDStatistics.from_activations(features(99, n=2000))


def test_identical_batches_differ_by_nothing():
    a = features(1)
    fid_a, fid_b, difference, interval = paired_fid.paired_bootstrap(a, a.copy(), reference(), resamples=20)
    assert fid_a == fid_b and difference == 0 and interval == (0.0, 0.0)


def test_a_clearly_worse_batch_has_an_interval_above_zero():
    a, b = features(1, shift=0.5), features(2)
    fid_a, fid_b, difference, (low, high) = paired_fid.paired_bootstrap(a, b, reference(), resamples=50)
    ref = reference()
    assert fid_a == pytest.approx(evaluator.FIDStatistics.from_activations(a).frechet_distance(ref))
    assert fid_b == pytest.approx(evaluator.FIDStatistics.from_activations(b).frechet_distance(ref))
    assert difference == pytest.approx(fid_a - fid_b) and 0 < low < difference < high


def test_pairing_shares_the_resampled_rows():
    """B is A with a little noise: paired resamples keep the difference far tighter than the FIDs vary."""
    a = features(1)
    b = a + 0.01 * features(3)
    _, _, difference, (low, high) = paired_fid.paired_bootstrap(a, b, reference(), resamples=50)
    fids = [evaluator.FIDStatistics.from_activations(a[np.random.default_rng(s).integers(0, 300, 300)])
            .frechet_distance(reference()) for s in range(20)]
    assert low <= difference <= high and high - low < 0.1 * (max(fids) - min(fids))


def test_batches_of_different_sizes_are_not_paired():
    with pytest.raises(evaluator.InputError, match="not paired: 300 and 200 samples"):
        paired_fid.paired_bootstrap(features(1), features(2, n=200), reference())


def write_batch(path, seed, labels):
    images = np.random.default_rng(seed).integers(0, 256, size=(len(labels), 32, 32, 3), dtype=np.uint8)
    np.savez(path, images, np.asarray(labels))
    return str(path)


def test_command_line(tmp_path, capsys):
    ref = write_batch(tmp_path / "ref.npz", 0, [0] * 40)
    a = write_batch(tmp_path / "a.npz", 1, list(range(10)) * 2)
    b = write_batch(tmp_path / "b.npz", 2, list(range(10)) * 2)
    assert paired_fid.main([ref, a, b, "--inception_path", str(GRAPH), "--resamples", "10"]) == 0
    captured = capsys.readouterr()
    line = captured.out.strip().splitlines()[-1]
    assert line.startswith("FID A ") and "95% interval [" in line and "(10 paired resamples of 20 samples)" in line
    # FID only (paired_fid computes no sFID), from the 128 pooled features of the digits graph
    assert [line for line in captured.err.splitlines() if line.startswith("warning: ")] == [
        f"warning: {path} holds {n} images, fewer than the 128 features of FID: FID are then biased and unreliable; "
        "use at least 128 images" for path, n in ((ref, 40), (a, 20), (b, 20))]

    other = write_batch(tmp_path / "c.npz", 3, list(range(1, 11)) * 2)
    assert paired_fid.main([ref, a, other, "--inception_path", str(GRAPH)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not paired" in err and "different labels" in err


@pytest.fixture
def no_network(monkeypatch):
    """Fail the test if the feature graph is loaded: bad input must be caught before."""
    def refuse(*args, **kwargs):
        raise AssertionError("the feature graph was loaded before the input was checked")
    monkeypatch.setattr(evaluator, "InceptionNetwork", refuse)


def run_failing(argv, capsys):
    """main's exit status is 2 with one `error: ...` line and nothing else printed; returns that line."""
    assert paired_fid.main([str(a) for a in argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and captured.err.startswith("error: ")
    return captured.err.strip()


@pytest.mark.parametrize("flag, value, expected", [
    ("--seed", "-1", "--seed must be at least 0, not -1"),
    ("--resamples", "1", "--resamples must be at least 2, not 1"),
    ("--tf_threads", "-1", "--tf_threads must be at least 0 (0: TensorFlow's choice), not -1"),
])
def test_numbers_checked_first(tmp_path, capsys, no_network, flag, value, expected):
    batch = write_batch(tmp_path / "a.npz", 1, list(range(10)))
    assert run_failing([batch, batch, batch, flag, value], capsys) == f"error: {expected}"


def test_unpaired_counts_found_before_any_features(tmp_path, capsys, no_network):
    a = write_batch(tmp_path / "a.npz", 1, list(range(10)) * 2)
    b = write_batch(tmp_path / "b.npz", 2, list(range(8)) * 2)
    err = run_failing([a, a, b], capsys)
    assert err == f"error: the batches are not paired: {a} holds 20 samples, {b} 16"


def test_unpaired_image_sizes_found_before_any_features(tmp_path, capsys, no_network):
    a = write_batch(tmp_path / "a.npz", 1, list(range(10)))
    b = str(tmp_path / "b.npz")
    np.savez(b, np.zeros((10, 16, 16, 3), np.uint8), np.arange(10))
    err = run_failing([a, a, b], capsys)
    assert err == f"error: the batches are not paired: {a} holds 32x32 images, {b} 16x16"


def test_malformed_command_line_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        paired_fid.main([str(tmp_path / "ref.npz"), str(tmp_path / "a.npz")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.count("\n") == 1 and err.startswith("error: the following arguments are required: batch_b")


def flip_middle_byte(path, array):
    """Flip one byte in the middle of an array stored (uncompressed) in the .npz at path."""
    raw = bytearray(open(path, "rb").read())
    data = array.tobytes()
    assert raw.find(data) > 0
    raw[raw.find(data) + len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(raw))


def test_damaged_labels_are_one_line_error(tmp_path, capsys, no_network):
    labels = np.arange(20)
    a = write_batch(tmp_path / "a.npz", 1, labels)
    b = write_batch(tmp_path / "b.npz", 2, labels)
    flip_middle_byte(b, labels)
    err = run_failing([a, a, b], capsys)
    assert err == f"error: {b}: unreadable .npz (Bad CRC-32 for file 'arr_1.npy')"


def test_damaged_images_are_one_line_error(tmp_path, capsys):
    ref = write_batch(tmp_path / "ref.npz", 0, [0] * 40)
    a = write_batch(tmp_path / "a.npz", 1, list(range(10)) * 2)
    b = write_batch(tmp_path / "b.npz", 2, list(range(10)) * 2)
    with np.load(b) as batch:
        flip_middle_byte(b, batch["arr_0"])
    assert paired_fid.main([ref, a, b, "--inception_path", str(GRAPH), "--resamples", "10"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: {b}: unreadable .npz (Bad CRC-32 for file 'arr_0.npy')"
    assert not any("Traceback" in line for line in err)


def test_non_finite_reference_statistics_found_before_any_features(tmp_path, capsys, no_network):
    a = write_batch(tmp_path / "a.npz", 1, list(range(10)))
    ref = str(tmp_path / "ref.npz")
    stats = {"mu": np.zeros(3), "sigma": np.eye(3), "mu_s": np.zeros(2), "sigma_s": np.eye(2)}
    stats["mu"][1] = np.nan
    np.savez(ref, arr_0=np.zeros((5, 32, 32, 3), np.uint8), **stats)
    assert run_failing([ref, a, a], capsys) == f"error: {ref}: NaN or infinite values in precomputed mu"


@pytest.mark.parametrize("interrupt, status", [(KeyboardInterrupt, 130), (evaluator.Terminated, 143)])
def test_interrupt_is_one_line(tmp_path, capsys, monkeypatch, interrupt, status):
    """Ctrl-C (SIGTERM: Terminated) while the batches go through the graph: `stopped`, the shell's exit status."""
    ref = write_batch(tmp_path / "ref.npz", 0, [0] * 40)
    a = write_batch(tmp_path / "a.npz", 1, list(range(10)) * 2)

    def interrupted(self, npz_path):
        raise interrupt

    monkeypatch.setattr(evaluator.InceptionNetwork, "read_activations", interrupted)
    sigterm_handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exit_info:
        paired_fid.main([ref, a, a, "--inception_path", str(GRAPH)])
    assert exit_info.value.code == status
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "stopped" and "Traceback" not in err
    assert signal.getsignal(signal.SIGTERM) is sigterm_handler


def test_ill_conditioned_square_root_is_one_line_error(tmp_path, capsys, monkeypatch):
    """An imaginary part beyond rounding in the FIDs' square roots (simulated on any CPU): one error line."""
    ref = write_batch(tmp_path / "ref.npz", 0, [0] * 40)
    a = write_batch(tmp_path / "a.npz", 1, list(range(10)) * 2)
    sqrtm = evaluator._sqrtm
    monkeypatch.setattr(evaluator, "_sqrtm", lambda m: sqrtm(m) + 1e3j * np.eye(len(m)))
    assert paired_fid.main([ref, a, a, "--inception_path", str(GRAPH), "--resamples", "2"]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: the covariance square root is ill-conditioned (Imaginary component 1000")
    assert last.endswith(": 20 images for 128 features; use at least 128 images") and "Traceback" not in err
