"""benchmarks/bench_sampler.py: bad flags are one-line errors before any sampling; each mode is timed once; the modes
are timed in turn and the table gives medians, spreads and whether the repeats rank the modes."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, TINY_CKPT, TINY_CONFIG

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_sampler  # noqa: E402
from test_timing import ScriptedClock  # noqa: E402

TINY = ["--config", str(TINY_CONFIG), "--device", "cpu", "--steps", "10", "--repeats", "1"]


def exit_status(argv):
    """bench_sampler.py's exit status for the flags, bad ones included (argparse exits)."""
    try:
        return bench_sampler.main(argv)
    except SystemExit as stop:
        return stop.code


def truncated(path):
    path.write_bytes(TINY_CKPT.read_bytes()[:5000])


def of_another_model(path):
    torch.save({"state_dict": {"x": torch.zeros(1)}}, path)


CHECKPOINTS = {"truncated": truncated, "of another model": of_another_model}


@pytest.mark.parametrize("argv, message", [
    (["--repeats", "0"], "--repeats must be at least 1, not 0"),
    (["--batch", "0"], "--batch must be at least 1, not 0"),
    (["--steps", "0"], "--steps: number of DDIM steps must be in 1..1000"),
    (["--steps", "3"], "--steps: 3 DDIM steps do not fit"),
    (["--steps", "2"], "key_steps 'uniform:4' does not fit 2 steps"),  # the default --key_steps
    (["--modes", "dpmpp3m", "--steps", "2"], "--steps: DPM-Solver++ of order 3 needs at least 3 steps"),
    (["--noise_injection", "maybe"], "argument --noise_injection: boolean value expected"),
    (["--seed", "-1"], "--seed must be in 0.."),
    (["--device", "foo"], "--device 'foo' is not a device name"),
    (["--precision", "fp16"], "--precision fp16: fp16 needs a CUDA device"),
    (["--modes", "ddim", "ddim,precision=fp64"], "precision must be one of fp32, bf16, fp16, not 'fp64'"),
    (["--modes", "ddim", "foo"], "mode 'foo': unknown sampler 'foo'"),
    (["--key_steps", "auto:3"], "--key_steps auto:3: bench_sampler.py needs explicit steps"),
    (["--modes", "ddim+deepcache:auto:3"], "--modes ddim+deepcache:auto:3: bench_sampler.py needs explicit steps"),
    (["--cache", "deepcache", "--branch", "99"], "--branch: DeepCache branch must be in 0..11"),
    (["--config", "missing.yaml"], "cannot load the model: config not found"),
    (["--ckpt", "missing.ckpt"], "checkpoint not found: missing.ckpt"),
    (["--ckpt", "truncated"], "cannot load the model: {} is not a PyTorch checkpoint or is truncated"),
    (["--ckpt", "of another model"], "cannot load the model: {} does not match the model architecture")])
def test_bad_flags_are_one_line_errors(argv, message, tmp_path, capsys):
    if argv[-1] in CHECKPOINTS:
        CHECKPOINTS[argv[-1]](tmp_path / "model.ckpt")
        argv = argv[:-1] + [str(tmp_path / "model.ckpt")]
    assert exit_status(TINY + argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: ") and captured.err.count("\n") == 1
    assert message.format(argv[-1]) in captured.err


@pytest.mark.parametrize("argv, modes", [([], ["DDIM fp32", "DDIM + FD uniform:4 fp32"]),
                                         (["--cache", "none"], ["DDIM fp32"]),
                                         (["--modes", "ddim", "ddim+none", "ddim,precision=fp32"], ["DDIM fp32"]),
                                         (["--modes", "ddim", "ddim+fd:0,1,precision=bf16"], ["DDIM fp32", "DDIM + FD 0,1 bf16"])])
def test_each_mode_is_one_row(argv, modes, capsys):
    """`ddim` and `ddim+none` (what --cache none adds to the plain DDIM row) are one mode, timed once."""
    assert exit_status(TINY + ["--warmup", "0"] + argv) == 0
    assert [line.split("|")[1].strip() for line in table_lines(capsys.readouterr().out)] == modes


def table_lines(out):
    """The table's rows (after its header and separator) in bench_sampler.py's output."""
    return [line for line in out.splitlines() if line.startswith("|")][2:]


def test_modes_are_timed_in_turn_and_ranked_by_their_medians(monkeypatch, capsys):
    """DDIM's runs take 1, 3 and 2 s, FasterDiffusion's 0.5 s each, taken in turn (DDIM FD DDIM FD ...): the medians
    give 4.00x; every repeat of FasterDiffusion is faster than every one of DDIM, whose spread (100%) makes its time
    uncertain."""
    monkeypatch.setattr(bench_sampler, "device_clock", lambda device: ScriptedClock([1, 0.5, 3, 0.5, 2, 0.5]))
    assert exit_status(TINY + ["--warmup", "0", "--repeats", "3"]) == 0
    out = capsys.readouterr().out
    ddim, fd = ([cell.strip() for cell in line.split("|")[1:5]] for line in table_lines(out))
    assert ddim == ["DDIM fp32", "2.000", "100%", "1.00x"] and fd == ["DDIM + FD uniform:4 fp32", "0.500", "0%", "4.00x"]
    assert "median of 3 alternating runs after 0 warm-up" in out
    assert out.splitlines()[-1] == ("median of 3 repeats taken in turn; they rank the runs, but the repeats of DDIM "
                                    "fp32 spread by 100% of their median (more than 20%): its time is uncertain")


@pytest.mark.slow
def test_openmp_threads_wait_passively_unless_told(tmp_path):
    """The script sets OMP_WAIT_POLICY=PASSIVE before torch loads OpenMP (libgomp then spins 0 times), unless the user
    chose a wait policy."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")}
    script = str(REPO / "benchmarks" / "bench_sampler.py")
    for extra, spins in (({}, "'0'"), ({"GOMP_SPINCOUNT": "1000"}, "'1000'")):
        result = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=120,
                                env={**env, **extra, "OMP_DISPLAY_ENV": "VERBOSE"})
        assert result.returncode == 0, result.stderr
        if "GOMP_SPINCOUNT" not in result.stderr:
            pytest.skip("torch's OpenMP is not GNU libgomp")
        assert f"GOMP_SPINCOUNT = {spins}" in result.stderr
