"""The shipped digits model: it draws the digits asked for, and the whole pipeline runs on it.

image_sample.py (one process and under mpiexec) -> .npz -> evaluations/evaluator.py with the shipped classifier
graph as feature network.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO, run_main
from evaluations import evaluator
from evaluations.digit_classifier import graph_predict
from ldm.data.digits import REFERENCE_SEED, make_digits
from ldm.sampling import generate, num_classes, reconstruct, sample_generators, to_uint8, unconditional_class
from ldm.util import instantiate_from_config, load_model

pytestmark = pytest.mark.slow  # the shipped model sampled and scored end to end

MODEL = REPO / "models" / "digits32"
CONFIG, CKPT, CLASSIFIER = MODEL / "config.yaml", MODEL / "model.safetensors", MODEL / "classifier.pb"
MPIEXEC = Path(sys.executable).parent / "mpiexec"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def digits_model():
    return load_model(str(CONFIG), str(CKPT))


def test_shipped_model_classes_come_from_its_config(digits_model):
    assert num_classes(digits_model) == 10 and unconditional_class(digits_model) == 10
    assert digits_model.image_size == 8 and digits_model.channels == 3
    images, _ = generate(digits_model, torch.tensor([3, 7]), 5, 1.5, generators=sample_generators(0, range(2)))
    assert to_uint8(images).shape == (2, 32, 32, 3)


def recognised(model, per_class):
    """Fraction of DDIM samples (S = 20, guidance 1.5) that the shipped classifier reads as the digit asked for."""
    labels = torch.arange(10).repeat(per_class)
    with torch.no_grad():
        images, _ = generate(model, labels, 20, 1.5, generators=sample_generators(0, range(len(labels))))
    return float((graph_predict(str(CLASSIFIER), to_uint8(images)) == labels.numpy()).mean())


def test_shipped_model_draws_the_digits_asked_for_and_random_weights_do_not(digits_model):
    # 200 samples: the binomial error of a 90% rate is 2.1 points there, 4.7 at 40; 95.5% of them are read (of 500,
    # 96.8%)
    assert recognised(digits_model, per_class=20) >= 0.9
    torch.manual_seed(0)
    untrained = instantiate_from_config(OmegaConf.load(CONFIG).model).eval()
    assert recognised(untrained, per_class=4) < 0.5


def test_first_stage_reconstructs_held_out_digits(digits_model):
    images, labels = make_digits(REFERENCE_SEED, range(200))
    reconstructed = reconstruct(digits_model, torch.from_numpy(images)).numpy()
    assert reconstructed.dtype == np.uint8 and reconstructed.shape == images.shape
    # 5.47 of 255 on average; encoded without the latent scale factor (1.033) 5.70, with 1.2 times it 10.0, with
    # 0.8 times it 12.1 (other codes are chosen)
    assert np.abs(reconstructed.astype(float) - images).mean() < 5.6
    assert (graph_predict(str(CLASSIFIER), reconstructed) == labels).mean() >= 0.95


def sample(out_dir, processes=1):
    """image_sample.py's .npz: one process runs in this one (conftest.run_main), several under mpiexec."""
    flags = ["--config", str(CONFIG), "--ckpt", str(CKPT), "--num_samples", "12", "--batch_size", "4", "--steps", "10",
             "--scale", "1.5", "--tqdm_disable", "yes", "--output_dir", str(out_dir)]
    if processes == 1:
        result = run_main("scripts/image_sample.py", *flags)
    else:
        result = subprocess.run([str(MPIEXEC), "-n", str(processes), sys.executable,
                                 str(REPO / "scripts" / "image_sample.py"), *flags],
                                cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return Path(result.stdout.strip().splitlines()[-1].removeprefix("samples: "))


def test_sampling_script_and_evaluator_run_end_to_end(tmp_path, capsys):
    one = sample(tmp_path / "one")
    two = sample(tmp_path / "two", processes=2)
    with np.load(one) as a, np.load(two) as b:
        assert a["arr_0"].shape == (12, 32, 32, 3) and a["arr_0"].dtype == np.uint8
        assert set(a["arr_1"].tolist()) <= set(range(10))
        np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
        assert np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int)).max() <= 1  # float rounding only
    ref_images, ref_labels = make_digits(REFERENCE_SEED, range(40))
    np.savez(tmp_path / "ref.npz", arr_0=ref_images, arr_1=ref_labels)
    evaluator.main([str(tmp_path / "ref.npz"), str(one), "--inception_path", str(CLASSIFIER)])
    printed = capsys.readouterr().out
    metrics = dict(line.split(": ") for line in printed.strip().splitlines() if ": " in line)
    for name in ("Inception Score", "FID", "sFID", "Precision", "Recall"):
        assert np.isfinite(float(metrics[name])), metrics
    assert 1.0 <= float(metrics["Inception Score"]) <= 10.0  # ten classes bound the score


def test_a_class_the_model_lacks_is_one_error_line(tmp_path):
    out = tmp_path / "x.png"
    result = run_main("infer_ldm.py", "--config", CONFIG, "--ckpt", CKPT, "--classes", "3", "10", "--steps", "5",
                      "--out", out)
    assert result.returncode == 2
    assert "10 classes" in result.stderr.strip().splitlines()[-1] and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()
