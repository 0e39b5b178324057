"""Shared paths, the tiny fixture model and small helpers of the tests."""
import contextlib
import importlib.util
import io
import json
import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ldm.distributed import usable_cpus
from ldm.util import load_model, read_state_dict

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
TINY = FIXTURES / "tiny"
TINY_CONFIG = TINY / "config.yaml"
TINY_CKPT = TINY / "model.ckpt"


def pytest_configure(config):
    """Under pytest-xdist (two workers by default, pyproject.toml), the workers split the cores: one thread each
    on 2 cores, for torch here and for the scripts the tests start, unless OMP_NUM_THREADS is set."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, usable_cpus() // int(workers))
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def gradients_stay_as_they_were():
    """A script run in-process must not leave gradients turned off (or on) for the tests after it."""
    enabled = torch.is_grad_enabled()
    yield
    assert torch.is_grad_enabled() == enabled, "the test changed torch's global gradient mode"


@pytest.fixture(autouse=True)
def bf16_as_on_a_cpu_with_native_kernels(monkeypatch):
    """The front ends refuse bf16 on a CPU without native bfloat16 kernels (ldm.cli.check_precision_is_fast); the
    tests run it on every CPU, as on one with them, so that the suite is the same everywhere. The refusal itself is
    tested with the check turned the other way (test_precision_refusal.py)."""
    from ldm import cli
    monkeypatch.setattr(cli, "cpu_has_native_bf16", lambda: True)


@pytest.fixture(scope="session")
def tiny_model():
    return load_model(str(TINY_CONFIG), str(TINY_CKPT))


@pytest.fixture(scope="session")
def golden():
    return np.load(TINY / "golden.npz")


@pytest.fixture(scope="session")
def golden_cases():
    return json.loads((TINY / "golden.json").read_text())


@pytest.fixture(scope="session")
def solver_golden():
    """Outputs of the upstream PLMS, DeepCache and DPM-Solver++ code: (arrays, case settings)."""
    return np.load(TINY / "golden_solvers.npz"), json.loads((TINY / "golden_solvers.json").read_text())


@pytest.fixture(scope="session")
def conds(tiny_model, golden):
    """Class context and unconditional context (class 1000) of the golden labels."""
    labels = torch.from_numpy(golden["labels"])
    cond = tiny_model.get_learned_conditioning({"class_label": labels})
    uncond = tiny_model.get_learned_conditioning({"class_label": torch.full_like(labels, 1000)})
    return cond, uncond


def rel_err(a, b):
    """Relative error ||a - b|| / ||b|| in float64."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.fixture(scope="session")
def ten_class_files(tmp_path_factory):
    """(config, checkpoint) of the tiny model cut to 10 classes: its embeddings of classes 0..9, then its
    unconditional one (class 1000) as class 10, so that it samples exactly as the tiny model does."""
    folder = tmp_path_factory.mktemp("ten_classes")
    config = OmegaConf.load(TINY_CONFIG)
    config.model.params.cond_stage_config.params.n_classes = 11
    OmegaConf.save(config, folder / "config.yaml")
    state_dict = read_state_dict(str(TINY_CKPT))
    key = "cond_stage_model.embedding.weight"
    state_dict[key] = torch.cat([state_dict[key][:10], state_dict[key][1000:]])
    torch.save({"state_dict": state_dict}, folder / "model.ckpt")
    return folder / "config.yaml", folder / "model.ckpt"


def load_script(relative_path):
    """Import a script of the repository as a module (the repo root need not be on sys.path)."""
    path = REPO / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def exit_status(script, argv):
    """A benchmark module's exit status for argv, bad flags included (argparse exits): main(parse_args(argv))."""
    try:
        return script.main(script.parse_args([str(a) for a in argv]))
    except SystemExit as stop:
        return stop.code


def interruptible():
    """For Popen: Ctrl-C reaches the child even where this test runs with SIGINT ignored (a background job)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_main(relative_path, *args, cwd=None):
    """Run a script's main(argv) in this process (from the folder cwd, if given), as a subprocess would (no
    interpreter to start): a CompletedProcess with its exit status and what it printed. Restores the torch threads,
    the SIGTERM handler and torch's random state that scripts may set; the message of a SystemExit goes to stderr,
    with status 1."""
    script = load_script(relative_path)
    threads, sigterm = torch.get_num_threads(), signal.getsignal(signal.SIGTERM)
    stdout, stderr = io.StringIO(), io.StringIO()
    folder = contextlib.chdir(cwd) if cwd else contextlib.nullcontext()
    try:
        with torch.random.fork_rng(devices=[]), folder, contextlib.redirect_stdout(stdout), \
                contextlib.redirect_stderr(stderr):
            status = (getattr(script, "main", None) or script.run)([str(a) for a in args])
    except SystemExit as stop:
        status = stop.code
        if isinstance(status, str):
            print(status, file=stderr)
            status = 1
    finally:
        torch.set_num_threads(threads)
        signal.signal(signal.SIGTERM, sigterm)
    return subprocess.CompletedProcess([relative_path, *args], status or 0, stdout.getvalue(), stderr.getvalue())


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one thread (two MPI ranks or processes share the 2 cores of small machines)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
