"""benchmarks/gpu_table.py (the table of gpu_check.sh): its bookkeeping, and a dry run on the CPU."""
import sys

import pytest
import torch

import ldm.compile
from conftest import REPO, TINY_CONFIG, exit_status
from ldm.sampling import sample_latents

sys.path.insert(0, str(REPO / "benchmarks"))
import common  # noqa: E402
import gpu_table  # noqa: E402


@pytest.mark.parametrize("name, precision, peak", [
    ("NVIDIA H100 80GB HBM3", "fp16", 989), ("NVIDIA H100 80GB HBM3", "fp32", 495), ("NVIDIA H100 PCIe", "fp16", 756),
    ("NVIDIA H200", "fp16", 989), ("NVIDIA A100-SXM4-80GB", "fp32", 156), ("NVIDIA L4", "fp16", None)])
def test_peaks_by_gpu_name(name, precision, peak):
    assert gpu_table.peak_tflops(name, precision) == peak


@pytest.mark.parametrize("name, batch_size, steps", [
    ("ddim", 1, 100), ("ddim", 4, 25), ("ddim", 16, 6), ("ddim", 200, 1),
    ("deepcache", 4, 25), ("deepcache", 16, 10), ("deepcache", 200, 5), ("fd", 1, 250), ("fd", 64, 250)])
def test_timed_steps_are_whole_periods_or_the_whole_run(name, batch_size, steps):
    args = gpu_table.parse_args([])
    assert gpu_table.timed_steps(name, batch_size, args) == steps


def test_rows_run_fp16_before_fp32_eager_before_compiled_fasterdiffusion_first():
    rows = gpu_table.plan(gpu_table.parse_args([]))
    assert len(rows) == 3 * 4 * 2 * 2
    assert rows[0] == ("fd", "1", "fp16", "eager") and rows[-1] == ("deepcache", "auto", "fp32", "compiled")
    assert rows[12] == ("fd", "1", "fp16", "compiled") and rows[24] == ("fd", "1", "fp32", "eager")


@pytest.mark.slow
def test_dry_run_on_the_cpu(tmp_path, capsys):
    out = tmp_path / "table.md"
    args = gpu_table.parse_args(["--device", "cpu", "--steps", "2", "--config", str(TINY_CONFIG), "--precisions",
                                 "fp32,bf16", "--batches", "1,2", "--variants", "eager", "--out", str(out),
                                 "--attention", "matmul", "--inductor", "coordinate_descent_tuning=True"])
    assert gpu_table.main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("CPU (") and "S=2, guidance 1.5" in lines[0] and "matmul attention" in lines[0]
    assert "inductor: coordinate_descent_tuning=True" in lines[0]
    rows = [line.split("|")[1:-1] for line in lines[3:]]
    assert len(rows) == 12 and out.read_text().splitlines() == lines
    for cells in rows:
        images_per_s, timed = float(cells[4]), cells[9].strip()
        assert images_per_s > 0 and float(cells[6]) > 0 and timed == "2/2" and cells[8].strip() == "n/a"


def test_defaults_are_the_sampling_scripts():
    args = gpu_table.parse_args([])
    assert args.attention == "auto" and args.cudnn_benchmark is True
    assert gpu_table.parse_args(["--cudnn_benchmark", "off"]).cudnn_benchmark is False


@pytest.mark.parametrize("text, option", [
    ("coordinate_descent_tuning=True", ("coordinate_descent_tuning", True)),
    ("triton.cudagraphs=False", ("triton.cudagraphs", False)),
    ("max_autotune_gemm_backends='ATEN,TRITON'", ("max_autotune_gemm_backends", "ATEN,TRITON"))])
def test_inductor_options_are_names_of_its_config_and_python_values(text, option):
    assert gpu_table.parse_args(["--inductor", text]).inductor == [option]


@pytest.mark.parametrize("text, message", [
    ("coordinate_descent_tuning", "expected name=value"), ("no_such_option=1", "has no option 'no_such_option'"),
    ("max_autotune=yes please", "is not a Python literal")])
def test_bad_inductor_options_are_one_line_errors(text, message, capsys):
    with pytest.raises(SystemExit) as raised:
        gpu_table.parse_args(["--inductor", text])
    assert raised.value.code == 2 and message in capsys.readouterr().err.splitlines()[-1]


def test_inductor_options_hold_inside_their_block_only():
    config = torch._inductor.config
    with common.inductor_options([("coordinate_descent_tuning", not config.coordinate_descent_tuning)]):
        changed = config.coordinate_descent_tuning
    assert changed != config.coordinate_descent_tuning


def test_no_gpu_is_one_line_and_status_2(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_table.main(gpu_table.parse_args([])) == 2
    assert capsys.readouterr().err.startswith("error: no CUDA device")


@pytest.mark.parametrize("stop, every, min_seconds, steps_run", [
    (2, None, 0.0, 2),  # a fixed window
    (1, 2, 0.0, 2),  # whole periods: the window is rounded up to one
    (2, 2, 1e9, 10),  # periods until min_seconds have passed, at most S
])
def test_timed_window_is_whole_periods_until_min_seconds(stop, every, min_seconds, steps_run):
    args = gpu_table.parse_args(["--device", "cpu", "--steps", "10", "--config", str(TINY_CONFIG)])
    model = gpu_table.build_model(args.config, device="cpu")
    seconds, run = gpu_table.sample(model, gpu_table.modes(args)["ddim"], 1, stop, "fp32", args, every=every,
                                    min_seconds=min_seconds)
    assert run == steps_run and seconds > 0


def test_eager_rows_run_each_call_shape_of_their_mode_before_timing(monkeypatch):
    events = []
    run_each_call, sample = ldm.compile.run_each_call, gpu_table.sample
    monkeypatch.setattr(ldm.compile, "run_each_call", lambda model, modes, num_steps, rows, precision, steps: (
        events.append(("calls", modes, rows, steps)), run_each_call(model, modes, num_steps, rows, precision, steps))[1])
    monkeypatch.setattr(gpu_table, "sample", lambda *a, **k: (events.append(("sample",)), sample(*a, **k))[1])
    args = gpu_table.parse_args(["--device", "cpu", "--steps", "10", "--config", str(TINY_CONFIG), "--precisions", "fp32",
                                 "--key_steps", "0,3,5,7", "--modes", "fd"])
    bench = gpu_table.Bench(args)
    events.clear()
    cells = bench.row("fd", "2", "fp32", "eager", "CPU")
    assert float(cells[4]) > 0
    assert events[0] == ("calls", [bench.modes["fd"]], 4, {2, 3})  # decoder calls of 3, 2, 2 and 3 steps
    assert [e[0] for e in events[1:]] == ["sample", "sample"]  # the untimed warm-up steps, then the timed run


def test_compiled_rows_warm_up_only_their_own_mode(monkeypatch):
    warmed = []
    monkeypatch.setattr(gpu_table, "compile_unet", lambda model, buckets: model)
    monkeypatch.setattr(gpu_table, "warm_up", lambda model, modes, *args: (warmed.append(modes), (1, 0.5))[1])
    args = gpu_table.parse_args(["--device", "cpu", "--steps", "2", "--config", str(TINY_CONFIG), "--precisions", "fp32"])
    bench = gpu_table.Bench(args)
    bench.model("ddim", "fp32", "compiled", 3)
    bench.model("fd", "fp32", "compiled", 3)
    bench.model("ddim", "fp32", "compiled", 3)  # warmed already
    assert warmed == [[bench.modes["ddim"]], [bench.modes["fd"]]]
    assert bench.compile_seconds == {("ddim", "fp32", 3): 0.5, ("fd", "fp32", 3): 0.5}


@pytest.mark.parametrize("cap, compiles", [(None, [(10,)]), (8, [(2, 4), (2,)])])
def test_decoder_cap_reaches_fasterdiffusion_and_its_buckets(monkeypatch, cap, compiles):
    """Groups of 10 steps at S=20: whole groups are one 10-step shape at any batch, compiled once; a cap of 8 rows
    splits them into calls of 4 steps at 2 rows (4 + 4 + 2), of 2 steps at 4 rows, so each batch size compiles its
    own, and batch 1 again reuses its model."""
    compiled = []
    monkeypatch.setattr(gpu_table, "compile_unet", lambda model, buckets: (compiled.append(buckets), model)[1])
    monkeypatch.setattr(gpu_table, "warm_up", lambda model, modes, *args: (1, 0.5))
    argv = ["--device", "cpu", "--steps", "20", "--config", str(TINY_CONFIG), "--precisions", "fp32",
            "--modes", "fd", "--key_steps", "0,10"] + (["--max_decoder_batch", str(cap)] if cap else [])
    bench = gpu_table.Bench(gpu_table.parse_args(argv))
    assert bench.modes["fd"].cache.max_decoder_batch == cap
    for batch_size in (1, 2, 1):
        bench.model("fd", "fp32", "compiled", batch_size)
    assert compiled == compiles


def test_the_first_row_is_planned_at_the_assumed_rate():
    """Before a precision's first row, a row's seconds are estimated at 40 TFLOP/s in half precision unless
    --assumed_tflops says otherwise (the row is not run if the estimate is over the time left)."""
    argv = ["--device", "cpu", "--steps", "2", "--config", str(TINY_CONFIG), "--precisions", "bf16", "--modes", "ddim",
            "--min_seconds", "0"]
    estimates = [gpu_table.Bench(gpu_table.parse_args(argv + extra)).estimate("ddim", 10**6, "bf16", "eager")
                 for extra in ([], ["--assumed_tflops", "4000"])]
    assert estimates[0] == pytest.approx(100 * estimates[1])
    assert estimates[1] > 0


@pytest.mark.slow
@pytest.mark.parametrize("cap", [None, 8])
def test_flops_per_image_are_those_of_the_rows_batch(cap):
    """With a cap of 8 rows, a group of 3 steps is decoded in one call at batch 1 (2 rows a step) and in calls of 2
    and 1 steps at batch 2 (4 rows a step), which share fewer convolutions over their skip features: each row's FLOPs
    per image are a sampling run's at its batch."""
    argv = ["--device", "cpu", "--steps", "5", "--config", str(TINY_CONFIG), "--precisions", "fp32", "--modes",
            "ddim,fd,deepcache", "--key_steps", "0,3"] + (["--max_decoder_batch", str(cap)] if cap else [])
    bench = gpu_table.Bench(gpu_table.parse_args(argv))
    for name, mode in bench.modes.items():
        for batch_size in (1, 2):
            _, intermediates = sample_latents(bench.base, torch.arange(batch_size), 5, 1.5, mode=mode,
                                              count_flops=True)
            assert bench.flops_per_image(name, batch_size) == intermediates["stats"].flops / batch_size
    assert (bench.flops_per_image("fd", 1) < bench.flops_per_image("fd", 2)) == bool(cap)


DRY_RUN = ["--device", "cpu", "--steps", "2", "--config", str(TINY_CONFIG), "--precisions", "fp32", "--batches", "1",
           "--variants", "eager"]


@pytest.mark.parametrize("argv, message", [
    (["--batches", "1,x"], "argument --batches: expected a number of samples or auto, not 'x'"),
    (["--batches", "0"], "argument --batches: batch sizes are at least 1"),
    (["--batches", "1,auto"], "--batches auto fits the batch to a GPU's free memory"),
    (["--steps", "0"], "--steps: number of DDIM steps must be in 1..1000"),
    (["--steps", "3"], "--steps: 3 DDIM steps do not fit"),
    (["--modes", "ddim,foo"], "argument --modes: unknown 'foo'"),
    (["--precisions", "fp64"], "argument --precisions: unknown 'fp64'"),
    (["--precisions", "fp32,fp16"], "--precisions fp16: fp16 needs a CUDA device"),
    (["--variants", "bogus"], "argument --variants: unknown 'bogus'"),
    (["--device", "foo"], "--device 'foo' is not a device name"),
    (["--out", "{tmp}/missing/table.md"], "missing does not exist"),
    (["--out", "{tmp}"], "is a directory"),
    (["--key_steps", "zz"], "unknown key_steps preset 'zz'"),
    (["--key_steps", "auto:2"], "--key_steps auto:2: gpu_table.py needs explicit steps"),
    (["--cache_interval", "0"], "DeepCache interval must be a positive number"),
    (["--assumed_tflops", "0"], "--assumed_tflops must be positive"),
    (["--budget", "-1"], "argument --budget: expected a positive number, not '-1'"),
    (["--budget", "nan"], "argument --budget: expected a positive number, not 'nan'"),
    (["--window", "0"], "argument --window: must be at least 1, not 0"),
    (["--warmup_steps", "-1"], "argument --warmup_steps: must be at least 0, not -1"),
    (["--auto_limit", "0"], "argument --auto_limit: must be at least 1, not 0"),
    (["--config", "missing.yaml"], "cannot load the model: config not found")])
def test_bad_flags_are_one_line_errors_before_the_table(argv, message, tmp_path, capsys):
    assert exit_status(gpu_table, DRY_RUN + [a.format(tmp=tmp_path) for a in argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: ") and captured.err.count("\n") == 1
    assert message in captured.err


@pytest.mark.parametrize("failing, status", [({"ddim", "fd", "deepcache"}, 1), ({"fd"}, 0)])
def test_a_table_with_no_measured_row_exits_1(monkeypatch, capsys, failing, status):
    """Rows that fail at run time (out of GPU memory) are listed; only a table without any measurement fails."""
    row = gpu_table.Bench.row

    def flaky(bench, name, *rest):
        if name in failing:
            raise RuntimeError("CUDA out of memory")
        return row(bench, name, *rest)

    monkeypatch.setattr(gpu_table.Bench, "row", flaky)
    assert exit_status(gpu_table, DRY_RUN) == status
    captured = capsys.readouterr()
    rows = [line.split("|")[1:-1] for line in captured.out.splitlines()[3:]]
    assert len(rows) == 3 and sum(cells[4].strip() == "failed: RuntimeError" for cells in rows) == len(failing)
    assert captured.err.endswith("error: no row of the table was measured\n") == (status == 1)
