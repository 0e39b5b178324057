"""benchmarks/bench_sampler.py: bad flags are one-line errors before any sampling; each mode is timed once."""
import sys

import pytest
import torch

from conftest import REPO, TINY_CKPT, TINY_CONFIG

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_sampler  # noqa: E402

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
    (["--modes", "ddim", "ddim@fp64"], "unknown precision 'fp64'"),
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
                                         (["--modes", "ddim", "ddim+none", "ddim@fp32"], ["DDIM fp32"]),
                                         (["--modes", "ddim", "ddim+fd:0,1@bf16"], ["DDIM fp32", "DDIM + FD 0,1 bf16"])])
def test_each_mode_is_one_row(argv, modes, capsys):
    """`ddim` and `ddim+none` (what --cache none adds to the plain DDIM row) are one mode, timed once."""
    assert exit_status(TINY + ["--warmup", "0"] + argv) == 0
    assert [line.split("|")[1].strip() for line in capsys.readouterr().out.splitlines()[3:]] == modes
