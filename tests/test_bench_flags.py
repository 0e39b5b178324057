"""The benchmark scripts without a test file of their own: bad flags are one `error:` line and exit status 2, before
any model work; bench_memory.py reports a failed child in one line."""
import importlib
import sys

import pytest

from conftest import REPO, TINY_CKPT, TINY_CONFIG, exit_status

sys.path.insert(0, str(REPO / "benchmarks"))

TINY = ["--config", str(TINY_CONFIG), "--device", "cpu"]
BASE = {"bench_decode_memory": TINY, "bench_memory": TINY + ["--steps", "10", "--key_steps", "uniform:3"],
        "bench_precision": TINY, "bench_weights": TINY, "check_compile": TINY + ["--steps", "10"],
        "bench_sample_memory": [], "bench_cache_steps": TINY}


def status(script, argv):
    """The script's exit status for its base flags and argv."""
    return exit_status(importlib.import_module(script), BASE[script] + argv)


def malformed(path):
    path.write_text("model: [unclosed\n  a: {")
    return path


def truncated(path):
    path.write_bytes(TINY_CKPT.read_bytes()[:5000])
    return path


FILES = {"malformed.yaml": malformed, "truncated.ckpt": truncated}

NOT_A_NUMBER = "expected a whole number"
STEPS_7 = "--steps: 7 DDIM steps do not fit the uniform schedule"
CASES = {
    "bench_cache_steps": [
        (["--repeats", "0"], "argument --repeats: must be at least 1, not 0"),
        (["--interval", "x"], "argument --interval: expected a whole number, not 'x'"),
        (["--device", "cuda:7"], "--device cuda:7: "),
    ],
    "bench_decode_memory": [
        (["--batches", "0"], "argument --batches: expected a comma list of whole numbers of at least 1, not '0'"),
        (["--batches", "4,-2"], "argument --batches: expected a comma list"),
        (["--batches", "a,b"], "argument --batches: expected a comma list"),
        (["--chunk", "0"], "argument --chunk: must be at least 1, not 0"),
        (["--chunk", "-1"], "argument --chunk: must be at least 1, not -1"),
        (["--config", "/nope.yaml"], "cannot load the model: config not found: /nope.yaml"),
        (["--config", "malformed.yaml"], "cannot load the model: cannot read config"),
        (["--device", "tpu"], "--device 'tpu' is not a device name")],
    "bench_memory": [
        (["--ckpt", "/nope.ckpt"], "checkpoint not found: /nope.ckpt"),
        (["--batch", "0"], "argument --batch: must be at least 1, not 0"),
        (["--steps", "7"], STEPS_7),
        (["--steps", "2"], "key_steps 'uniform:3' does not fit 2 steps"),
        (["--chunks", "x"], "argument --chunks: expected a comma list of whole numbers of at least 0, not 'x'"),
        (["--chunks", "0,-3"], "argument --chunks: expected a comma list"),
        (["--key_steps", "0,3,3"], "key_steps must be strictly increasing without repeats"),
        (["--key_steps", "nope"], "unknown key_steps preset 'nope'"),
        (["--key_steps", "auto:3"], "--key_steps auto:3: bench_memory.py needs explicit steps"),
        (["--stop_after", "0"], "argument --stop_after: must be at least 1, not 0"),
        (["--stop_after", "11"], "--stop_after must be at most --steps (10), not 11"),
        (["--scale", "nan"], "--scale must be a finite number that float32 can hold, not nan"),
        (["--device", "tpu"], "--device 'tpu' is not a device name"),
        (["--config", "/nope.yaml"], "cannot load the model: config not found")],
    "bench_precision": [
        (["--config", "/nope.yaml"], "cannot load the model: config not found"),
        (["--ckpt", "/nope.ckpt"], "checkpoint not found: /nope.ckpt"),
        (["--tiny_config", "/nope.yaml"], "cannot load the model: config not found: /nope.yaml"),
        (["--tiny_ckpt", "/nope.ckpt"], "checkpoint not found: /nope.ckpt"),
        (["--repeats", "0"], "argument --repeats: must be at least 1, not 0"),
        (["--quality_steps", "-5"], "argument --quality_steps: must be at least 0, not -5"),
        (["--quality_steps", "7"], "--quality_steps: 7 DDIM steps do not fit"),
        (["--quality_steps", "2"], "key_steps 'uniform:4' does not fit 2 steps"),
        (["--device", "tpu"], "--device 'tpu' is not a device name")],
    "bench_weights": [
        (["--config", "/nope.yaml"], "cannot load the model: config not found"),
        (["--ckpt", "/nope.ckpt"], "checkpoint not found: /nope.ckpt"),
        (["--repeats", "0"], "argument --repeats: must be at least 1, not 0"),
        (["--batch", "0"], "argument --batch: must be at least 1, not 0"),
        (["--batch", "x"], f"argument --batch: {NOT_A_NUMBER}, not 'x'"),
        (["--steps", "0"], "--steps: number of DDIM steps must be in 1..1000, not 0"),
        (["--steps", "7"], STEPS_7),
        (["--channels_last", "maybe"], "argument --channels_last: expected on or off, not 'maybe'"),
        (["--device", "tpu"], "--device 'tpu' is not a device name")],
    "check_compile": [
        (["--config", "/nope.yaml"], "cannot load the model: config not found"),
        (["--ckpt", "/nope.ckpt"], "checkpoint not found: /nope.ckpt"),
        (["--batch", "0"], "argument --batch: must be at least 1, not 0"),
        (["--steps", "0"], "--steps: number of DDIM steps must be in 1..1000, not 0"),
        (["--steps", "7"], STEPS_7),
        (["--key_steps", "nope"], "unknown key_steps preset 'nope'"),
        (["--inductor", "bogus=1"], "argument --inductor: torch._inductor.config has no option 'bogus'"),
        (["--device", "tpu"], "--device 'tpu' is not a device name")],
    "bench_sample_memory": [
        (["--num_samples", "x"], "argument --num_samples: expected a comma list of whole numbers of at least 1"),
        (["--num_samples", "16,0"], "argument --num_samples: expected a comma list"),
        (["--latent_size", "0"], "argument --latent_size: must be at least 1, not 0"),
        (["--processes", "0"], "argument --processes: must be at least 1, not 0"),
        (["--batch_size", "0"], "argument --batch_size: must be at least 1, not 0"),
        (["--ddim_steps", "3"], "--ddim_steps: 3 DDIM steps do not fit"),
        (["--config_path", "/nope.yaml"], "cannot load the model: config not found: /nope.yaml"),
        (["--model_path", "/nope.ckpt"], "checkpoint not found: /nope.ckpt")],
}


@pytest.mark.parametrize("script, argv, message",
                         [(script, argv, message) for script, cases in CASES.items() for argv, message in cases])
def test_bad_flags_are_one_line_errors(script, argv, message, tmp_path, capsys):
    argv = [str(FILES[a](tmp_path / a)) if a in FILES else a for a in argv]
    assert status(script, argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: ") and captured.err.count("\n") == 1
    assert message in captured.err
    assert list(tmp_path.iterdir()) == [tmp_path / a for a in argv if a.startswith(str(tmp_path))]


def test_a_failed_child_is_its_last_line(tmp_path, capsys):
    """bench_memory.py measures each mode in a child process: a checkpoint that does not load fails there."""
    assert status("bench_memory", ["--ckpt", str(truncated(tmp_path / "model.ckpt"))]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith("error: cannot load the model: ") and "is not a PyTorch checkpoint" in captured.err


def test_decode_memory_table(capsys):
    assert status("bench_decode_memory", ["--batches", "1,2", "--chunk", "2"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [row.split("|")[1].strip() for row in rows] == ["batch", "1", "2"]


def test_bench_cache_steps_times_each_step_and_prints_the_shares(capsys):
    assert status("bench_cache_steps", ["--repeats", "2", "--calls", "1"]) == 0
    out = capsys.readouterr().out
    for row in ("whole UNet (DeepCache full step)", "DeepCache shallow step", "DeepCache forecast 2 shallow step",
                "adaptive shallow step (probe, decision)"):
        assert f"| {row}" in out
    assert "of a DeepCache N = 5 run of 20 steps" in out and "to a shallow step" in out
