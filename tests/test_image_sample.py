"""scripts/image_sample.py end to end on the tiny model: MPI vs one process, resume, the .npz format, bad input."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, TINY_CKPT, TINY_CONFIG
from ldm.models.diffusion.faster_diffusion import FasterDiffusion
from ldm.sampling import generate, sample_generators, sample_labels, to_uint8

SCRIPT = REPO / "scripts" / "image_sample.py"
MPIEXEC = Path(sys.executable).parent / "mpiexec"
N = 5
FINAL = f"samples_{N}x64x64x3.npz"
SHARDS = f"shards_{N}x64x64x3"
MODES = {"ddim": [], "fd": ["--use_faster_diffusion", "true", "--key_steps", "uniform:3"]}


def run(out_dir, *flags, processes=1):
    """Run image_sample.py on the tiny model (N samples, 10 steps) with extra flags; later flags win."""
    cmd = [sys.executable, str(SCRIPT), "--config_path", str(TINY_CONFIG), "--model_path", str(TINY_CKPT),
           "--num_samples", str(N), "--ddim_steps", "10", "--tqdm_disable", "yes", "--output_dir", str(out_dir),
           *flags]
    if processes > 1:
        cmd = [str(MPIEXEC), "-n", str(processes), *cmd]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # 2 ranks on 2 cores: one thread each
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def load(path):
    with np.load(path) as npz:
        return npz["arr_0"], npz["arr_1"]


def assert_same_images(a, b):
    """Equal up to float rounding: no pixel off by more than one level, nearly all exactly equal."""
    assert a.shape == b.shape
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert diff.max() <= 1
    assert (diff == 0).mean() > 0.99


@pytest.fixture(scope="module", params=list(MODES))
def reference(request, tmp_path_factory):
    """An uninterrupted one-process run with batch size 3: (mode, output dir, images, labels)."""
    out = tmp_path_factory.mktemp(f"reference_{request.param}")
    result = run(out, "--batch_size", "3", *MODES[request.param])
    assert result.returncode == 0, result.stderr
    assert f"wrote {out / FINAL}" in result.stdout
    return (request.param, out, *load(out / FINAL))


def test_npz_format(reference):
    mode, out, _, _ = reference
    path = out / FINAL
    assert sorted(os.listdir(out)) == [FINAL]  # shards and temporary files are gone
    with zipfile.ZipFile(path) as zf:
        assert zf.namelist() == ["arr_0.npy", "arr_1.npy"]
        assert all(info.compress_type == zipfile.ZIP_STORED for info in zf.infolist())
        with zf.open("arr_0.npy") as f:  # the ADM evaluator reads arr_0 as a stream like this
            assert np.lib.format.read_magic(f) == (1, 0)
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            assert (shape, fortran, dtype) == ((N, 64, 64, 3), False, np.uint8)
            streamed = np.frombuffer(f.read(), dtype=np.uint8).reshape(shape)
    with np.load(path) as npz:
        assert npz.files == ["arr_0", "arr_1"]
        images, labels = npz["arr_0"], npz["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (N, 64, 64, 3)
    assert labels.dtype == np.int64 and labels.shape == (N,)
    np.testing.assert_array_equal(streamed, images)
    np.testing.assert_array_equal(labels, sample_labels(0, range(N)).numpy())
    assert images.std() > 0


def test_mpi_matches_one_process(reference, tmp_path):
    mode, _, images, labels = reference
    result = run(tmp_path, "--batch_size", "2", *MODES[mode], processes=2)
    assert result.returncode == 0, result.stderr
    assert "with 2 process(es)" in result.stdout
    mpi_images, mpi_labels = load(tmp_path / FINAL)
    np.testing.assert_array_equal(mpi_labels, labels)
    assert_same_images(mpi_images, images)
    assert sorted(os.listdir(tmp_path)) == [FINAL]


def test_matches_generate(reference, tiny_model):
    """The script's samples 3 and 4 are ldm.sampling.generate's for those indices."""
    mode, _, images, _ = reference
    fd = FasterDiffusion("uniform:3") if mode == "fd" else None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected, _ = generate(tiny_model, sample_labels(0, [3, 4]), 10, 1.5, faster_diffusion=fd,
                               generators=sample_generators(0, [3, 4]))
    finally:
        torch.set_num_threads(threads)
    assert_same_images(images[3:], to_uint8(expected).numpy())


@pytest.mark.parametrize("reference", ["fd"], indirect=True)
def test_resume_after_kill(reference, tmp_path):
    mode, _, images, labels = reference
    flags = ["--batch_size", "3", *MODES[mode]]
    killed = run(tmp_path, *flags, "--stop_after_batches", "1")
    assert killed.returncode == 3
    assert not (tmp_path / FINAL).exists()
    assert sorted(os.listdir(tmp_path / SHARDS)) == ["batch_000000.npz", "settings.json"]

    fresh = run(tmp_path, *flags)
    assert fresh.returncode != 0 and "--resume" in fresh.stderr.strip().splitlines()[-1]
    changed = run(tmp_path, *flags, "--resume", "--seed", "1")
    assert changed.returncode != 0 and "different settings: seed (0 vs 1)" in changed.stderr
    assert not (tmp_path / FINAL).exists()

    resumed = run(tmp_path, *flags, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "made 2 of 5 images" in resumed.stdout  # only the missing batch was sampled
    resumed_images, resumed_labels = load(tmp_path / FINAL)
    np.testing.assert_array_equal(resumed_labels, labels)
    np.testing.assert_array_equal(resumed_images, images)
    assert sorted(os.listdir(tmp_path)) == [FINAL]


def _garbage_checkpoint(tmp_path):
    (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint")
    return ["--model_path", str(tmp_path / "bad.ckpt")]


def _file_as_output_dir(tmp_path):
    (tmp_path / "file").write_text("x")
    return ["--output_dir", str(tmp_path / "file" / "out")]


BAD_INPUTS = {
    "missing config": (lambda p: ["--config_path", str(p / "missing.yaml")], ["config not found", "missing.yaml"]),
    "missing checkpoint": (lambda p: ["--model_path", str(p / "missing.ckpt")], ["checkpoint not found"]),
    "no samples": (lambda p: ["--num_samples", "0"], ["--num_samples", "at least 1"]),
    "zero batch": (lambda p: ["--batch_size", "0"], ["--batch_size", "at least 1"]),
    "unwritable output": (_file_as_output_dir, ["cannot write to output directory"]),
    "unknown key steps": (lambda p: [*MODES["fd"], "--key_steps", "bogus"], ["--key_steps", "unknown", "bogus"]),
    "key steps without 0": (lambda p: [*MODES["fd"], "--key_steps", "3,5"], ["--key_steps", "start with 0"]),
    "bad step count": (lambda p: ["--ddim_steps", "300"], ["--ddim_steps", "300"]),
    "fp16 on cpu": (lambda p: ["--precision", "fp16", "--device", "cpu"], ["fp16", "CUDA"]),
    "bad checkpoint": (_garbage_checkpoint, ["bad.ckpt", "not a PyTorch checkpoint"]),
}


def assert_one_error_line(result, words, out_dir):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0]
    assert not list(Path(out_dir).rglob("samples_*.npz"))


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input(case, tmp_path):
    make_flags, words = BAD_INPUTS[case]
    assert_one_error_line(run(tmp_path, *make_flags(tmp_path)), words, tmp_path)


@pytest.mark.parametrize("case", ["no samples", "bad checkpoint"])
def test_bad_input_mpi(case, tmp_path):
    """Checked on rank 0 before loading (no samples) or by every rank while loading (bad checkpoint)."""
    make_flags, words = BAD_INPUTS[case]
    assert_one_error_line(run(tmp_path, *make_flags(tmp_path), processes=2), words, tmp_path)
