"""run_image_sample.sh on the tiny model with a small fake Inception graph: checks before sampling, scores the file
the sampler names, never loses a previous evaluation.txt."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, TINY_CKPT, TINY_CONFIG
from test_evaluator import POOL_DIM, SMALL, SPATIAL_DIM, build_fake_inception, fake_weights, random_images, random_stats

pytestmark = pytest.mark.slow  # the whole pipeline under mpiexec, with the evaluator

SCRIPT = REPO / "run_image_sample.sh"


@pytest.fixture(scope="module")
def evaluator_inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("evaluator_inputs")
    rng = np.random.default_rng(0)
    (mu, sigma), (mu_s, sigma_s) = random_stats(rng, POOL_DIM), random_stats(rng, SPATIAL_DIM)
    np.savez(folder / "ref.npz", arr_0=random_images(0, 6, size=64), mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    return {"REF_BATCH": str(folder / "ref.npz"),
            "INCEPTION_PATH": str(build_fake_inception(folder / "graph.pb", fake_weights(**SMALL), False))}


def run_script(cwd, evaluator_inputs, **env):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RUN": "baseline", "NUM_GPUS": "1", "NUM_SAMPLES": "24",
           "DDIM_STEPS": "10", "CONFIG_PATH": str(TINY_CONFIG), "MODEL_PATH": str(TINY_CKPT),
           "PYTHON": sys.executable, "MPIEXEC": str(Path(sys.executable).parent / "mpiexec"),
           **evaluator_inputs, **env}
    return subprocess.run(["bash", str(SCRIPT)], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_samples_scores_and_keeps_scores(tmp_path, evaluator_inputs):
    first = run_script(tmp_path, evaluator_inputs)
    assert first.returncode == 0, first.stderr
    [npz] = (tmp_path / "outputs" / "samples").glob("*/samples_24x64x64x3.npz")  # the name the sampler chose
    evaluation = npz.parent / "evaluation.txt"
    scores = evaluation.read_text()
    assert [line.split(":")[0] for line in scores.splitlines()[-5:]] == [
        "Inception Score", "FID", "sFID", "Precision", "Recall"]

    again = run_script(tmp_path, evaluator_inputs)  # finished: scored again, not sampled again
    assert again.returncode == 0, again.stderr
    assert f"already done: {npz.relative_to(tmp_path)}" in again.stdout
    assert evaluation.read_text() == scores

    npz.write_bytes(b"broken")  # the evaluator now fails: the earlier scores stay
    broken = run_script(tmp_path, evaluator_inputs)
    assert broken.returncode != 0 and "error: " in broken.stderr
    assert evaluation.read_text() == scores
    assert sorted(p.name for p in npz.parent.iterdir()) == sorted([npz.name, npz.with_suffix(".json").name,
                                                                   "evaluation.txt"])


def test_missing_reference_batch_stops_before_sampling(tmp_path, evaluator_inputs):
    result = run_script(tmp_path, {**evaluator_inputs, "REF_BATCH": str(tmp_path / "absent.npz")})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'absent.npz'}: no such file"
    assert sorted(os.listdir(tmp_path)) == []
