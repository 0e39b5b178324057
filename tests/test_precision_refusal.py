"""bf16 on a CPU without native bfloat16 kernels: every front end refuses it in one line (exit status 2) before any
model work; the Python API still computes in it."""
import importlib
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, TINY_CKPT, TINY_CONFIG, exit_status, load_script
from ldm import cli
from ldm.sampling import sample_latents

sys.path.insert(0, str(REPO / "benchmarks"))

MODEL = ["--config", str(TINY_CONFIG), "--ckpt", str(TINY_CKPT)]
REFUSED = "bf16: this CPU has no native bfloat16 kernels (AVX-512 BF16 or AMX), so bf16 would run many times " \
          "slower than fp32; "
CPU_BF16 = ["--precision", "bf16", "--device", "cpu"]
FRONT_ENDS = {  # script: (argv, the flag the line starts with)
    "scripts/image_sample.py": ([*MODEL, "--steps", "2", "--num_samples", "1", *CPU_BF16], "--precision"),
    "infer_ldm.py": ([*MODEL, "--steps", "2", "--classes", "1", *CPU_BF16], "--precision"),
    "scripts/frontier.py": ([*MODEL, "--modes", "ddim,precision=bf16@2", "--num_samples", "4", "--device", "cpu",
                             "--ref", "{ref}", "--inception_path", str(REPO / "models/digits32/classifier.pb")], "mode 'ddim,precision=bf16@2': --precision"),
    "bench_sampler": ([*MODEL, "--steps", "2", "--modes", "ddim", *CPU_BF16], "--precision"),
    "gpu_table": (["--config", str(TINY_CONFIG), "--device", "cpu", "--steps", "2", "--precisions", "bf16",
                   "--batches", "1"], "--precisions"),
    "roofline": (["--config", str(TINY_CONFIG), "--rows", "2", "--measure", *CPU_BF16], "--precision"),
    "bench_precision": (["--config", str(TINY_CONFIG), "--device", "cpu"], "the CPU's fast precision,"),
    "bench_weights": (["--config", str(TINY_CONFIG), "--device", "cpu"], "the CPU's half precision,"),
}

PARSED_BY_THE_CALLER = ("gpu_table", "roofline", "bench_precision", "bench_weights")  # main(parse_args(argv))


@pytest.fixture
def emulated_bf16(monkeypatch):
    monkeypatch.setattr(cli, "cpu_has_native_bf16", lambda: False)


@pytest.mark.parametrize("name", list(FRONT_ENDS))
def test_front_ends_refuse_emulated_bf16(name, emulated_bf16, tmp_path, monkeypatch, capsys):
    argv, flag = FRONT_ENDS[name]
    np.savez(tmp_path / "ref.npz", np.zeros((4, 64, 64, 3), np.uint8))
    argv = [a.format(ref=tmp_path / "ref.npz") for a in argv]
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    script = load_script(name) if name.endswith(".py") else importlib.import_module(name)
    status = exit_status(script, argv) if name in PARSED_BY_THE_CALLER else run_front_end(script, argv)
    assert status == cli.BAD_INPUT
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {flag} {REFUSED}"), lines
    assert list((tmp_path / "work").iterdir()) == []


def run_front_end(script, argv):
    """A script's exit status: its run(argv) or main(argv), which may exit through SystemExit."""
    try:
        return (getattr(script, "run", None) or script.main)(argv)
    except SystemExit as stop:
        return stop.code


def test_the_check_is_onednns(monkeypatch):
    monkeypatch.undo()  # the suite's own stand-in (conftest.py) is dropped: the real check
    assert cli.cpu_has_native_bf16() is bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def test_the_python_api_still_computes_in_bf16(emulated_bf16, tiny_model):
    latents, _ = sample_latents(tiny_model, torch.tensor([1]), 2, 1.5, precision="bf16")
    assert latents.dtype == torch.float32 and bool(torch.isfinite(latents).all())
