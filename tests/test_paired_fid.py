"""evaluations/paired_fid.py: the paired bootstrap of an FID difference, and its command line."""
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
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("FID A ") and "95% interval [" in line and "(10 paired resamples of 20 samples)" in line

    other = write_batch(tmp_path / "c.npz", 3, list(range(1, 11)) * 2)
    assert paired_fid.main([ref, a, other, "--inception_path", str(GRAPH)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not paired" in err and "different labels" in err
