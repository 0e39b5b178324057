"""Run folders that earlier versions of the sampling run left stay valid (tests/fixtures/runs, made on the tiny model
with the flags below): a finished run is 'already done', with the checksum its record holds or without one (records
made before checksums), and a stopped run resumes from its saved batch."""
import shutil

import numpy as np
import pytest

from conftest import FIXTURES, TINY_CKPT, TINY_CONFIG, load_script

RUNS = FIXTURES / "runs"
FINAL = "samples_5x64x64x3.npz"
FLAGS = ["--config_path", str(TINY_CONFIG), "--model_path", str(TINY_CKPT), "--num_samples", "5", "--ddim_steps", "10",
         "--tqdm_disable", "yes", "--batch_size", "2"]

image_sample = load_script("scripts/image_sample.py")


def images(path):
    with np.load(path) as npz:
        return npz["arr_0"], npz["arr_1"]


@pytest.mark.parametrize("name", ["finished", "finished_with_checksum"])
def test_a_finished_run_is_already_done(name, tmp_path, capsys):
    out = shutil.copytree(RUNS / name, tmp_path / "out")
    assert image_sample.run([*FLAGS, "--output_dir", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"already done: {out / FINAL} holds these samples")


def test_a_stopped_run_resumes_with_its_saved_batch_unchanged(tmp_path):
    """The saved batch goes into the .npz as it is, bit for bit; the other batches are those a fresh run here makes,
    and the whole equals the finished run of the earlier version up to float rounding (other threads or kernels)."""
    out = shutil.copytree(RUNS / "stopped", tmp_path / "out")
    with np.load(RUNS / "stopped" / "shards_5x64x64x3" / "batch_000000.npz") as shard:
        saved = shard["images"]
    assert image_sample.run([*FLAGS, "--output_dir", str(out), "--resume"]) == 0
    assert image_sample.run([*FLAGS, "--output_dir", str(tmp_path / "fresh")]) == 0
    resumed, fresh, earlier = images(out / FINAL), images(tmp_path / "fresh" / FINAL), images(RUNS / "finished" / FINAL)
    np.testing.assert_array_equal(resumed[0][:2], saved)
    np.testing.assert_array_equal(resumed[0][2:], fresh[0][2:])
    np.testing.assert_array_equal(resumed[1], earlier[1])
    assert np.abs(resumed[0].astype(int) - earlier[0]).max() <= 1
