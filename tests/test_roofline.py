"""benchmarks/roofline.py: the work of each operation counted on meta tensors, against direct computations."""
import sys

import pytest
import torch
from torch import nn

from conftest import REPO, TINY_CONFIG, exit_status
from ldm.flops import FlopCounter

sys.path.insert(0, str(REPO / "benchmarks"))
import roofline  # noqa: E402


def logged(module, x):
    log = roofline.OperationLog()
    with torch.inference_mode(), log:
        module(x)
    return log.ops


def test_a_convolution_moves_its_input_weights_and_output():
    conv = nn.Conv2d(8, 16, 3, padding=1, device="meta")
    ops = logged(conv, torch.zeros(5, 8, 12, 12, device="meta"))
    flops = 2 * 5 * 16 * 12 * 12 * 8 * 3 * 3
    moved = 4 * (5 * 8 * 12 * 12 + 16 * 8 * 3 * 3 + 16 + 5 * 16 * 12 * 12)
    assert ops == [("convolution", flops, moved)]


def test_views_and_eval_dropout_move_nothing_casts_move_both_sides():
    block = nn.Sequential(nn.Dropout(0.1), nn.Flatten(), nn.Linear(6, 4)).eval().to("meta")
    ops = logged(lambda x: block(x.float().half().float()), torch.zeros(3, 2, 3, device="meta", dtype=torch.half))
    assert [name for name, _, _ in ops] == ["_to_copy", "_to_copy", "_to_copy", "addmm"]
    assert [moved for _, _, moved in ops[:2]] == [18 * (2 + 4), 18 * (4 + 2)]
    assert ops[3] == ("addmm", 2 * 3 * 6 * 4, 4 * (4 + 3 * 6 + 6 * 4 + 3 * 4))


def test_unet_flops_match_the_flop_counter_on_a_real_forward(tiny_model):
    ops = roofline.unet_operations(str(TINY_CONFIG), 4, "fp32")
    unet = tiny_model.unet
    x = torch.randn(4, tiny_model.channels, tiny_model.image_size, tiny_model.image_size)
    t = torch.tensor([0, 10, 500, 999])
    with torch.inference_mode():
        context = tiny_model.get_learned_conditioning({tiny_model.cond_stage_key: torch.arange(4)})
        with FlopCounter() as counter:
            unet(x, t, context)
    assert sum(flops for _, flops, _ in ops) == counter.flops
    assert {"convolution", "addmm", "scaled_dot_product_attention", "native_group_norm"} <= {n for n, _, _ in ops}
    casts = sum(moved for name, _, moved in ops if name == "_to_copy")  # the timesteps, made float
    assert casts < 1e-3 * sum(moved for _, _, moved in ops)
    assert not {"_unsafe_view", "view", "t", "clone"} & {n for n, _, _ in ops}


def test_half_weights_add_the_float32_round_trips_of_the_normalizations():
    fp32 = roofline.unet_operations(str(TINY_CONFIG), 2, "fp32")
    fp16 = roofline.unet_operations(str(TINY_CONFIG), 2, "fp16")
    norms = sum(name.startswith("native_") and name.endswith("_norm") for name, _, _ in fp16)
    casts = sum(name == "_to_copy" for name, _, _ in fp16)
    assert casts >= 2 * norms > 0
    assert sum(f for _, f, _ in fp16) == sum(f for _, f, _ in fp32)
    convs = lambda ops: sum(m for n, _, m in ops if n == "convolution")
    assert convs(fp16) * 2 == convs(fp32)


def test_roofline_takes_the_slower_of_arithmetic_and_memory():
    ops = [("convolution", 10e12, 1e9), ("convolution", 1e12, 10e9), ("add", 0, 2e9), ("_to_copy", 0, 1e9)]
    kinds = roofline.roofline(ops, peak=100e12, bandwidth=1e12)
    assert kinds["convolution"] == [2, 11e12, 11e9, pytest.approx(0.1 + 0.01)]
    assert kinds[roofline.OTHER] == [1, 0, 2e9, pytest.approx(2e-3)]
    assert kinds["dtype casts"] == [1, 0, 1e9, pytest.approx(1e-3)]


def test_cli_prints_the_table_and_the_bound(capsys):
    assert roofline.main(roofline.parse_args(["--config", str(TINY_CONFIG), "--rows", "2"])) == 0
    out = capsys.readouterr().out
    assert "| convolution" in out and "| total" in out
    bound = float(out.rsplit("eager MFU bound: ", 1)[1].split("%")[0])
    assert 0 < bound < 100


def test_missing_config_is_one_line_and_status_2(capsys):
    assert roofline.main(roofline.parse_args(["--config", "no/such.yaml"])) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1


@pytest.mark.parametrize("argv, message", [
    (["--rows", "0"], "argument --rows: must be at least 1, not 0"),
    (["--rows", "-2"], "argument --rows: must be at least 1, not -2"),
    (["--repeats", "0"], "argument --repeats: must be at least 1, not 0"),
    (["--bandwidth", "-1"], "argument --bandwidth: expected a positive number, not '-1'"),
    (["--bandwidth", "inf"], "argument --bandwidth: expected a positive number, not 'inf'"),
    (["--peak", "0"], "argument --peak: expected a positive number, not '0'"),
    (["--device", "tpu"], "--device tpu: only cpu and cuda devices are supported"),
    (["--measure", "--device", "tpu"], "--device 'tpu' is not a device name"),
    (["--inductor", "bogus=1"], "unrecognized arguments: --inductor bogus=1"),
    (["--config", "malformed"], "cannot load the model: cannot read config")])
def test_bad_flags_are_one_line_errors(argv, message, tmp_path, capsys):
    if argv[-1] == "malformed":
        (tmp_path / "config.yaml").write_text("model: [unclosed\n  a: {")
        argv = ["--config", str(tmp_path / "config.yaml")]
    assert exit_status(roofline, ["--config", str(TINY_CONFIG), "--rows", "2"] + argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: ") and captured.err.count("\n") == 1
    assert message in captured.err


@pytest.mark.parametrize("name, kind", [
    ("convolution", "convolution"), ("aten::cudnn_convolution", "convolution"), ("aten::mkldnn_convolution", "convolution"),
    ("addmm", "matmul"), ("aten::mm", "matmul"), ("aten::bmm", "matmul"),
    ("scaled_dot_product_attention", "attention"), ("aten::_flash_attention_forward", "attention"),
    ("native_group_norm", "normalization"), ("aten::native_layer_norm", "normalization"),
    ("_to_copy", "dtype casts"), ("aten::copy_", "dtype casts"),
    ("add", roofline.OTHER), ("aten::silu", roofline.OTHER), ("aten::cat", roofline.OTHER)])
def test_counted_and_profiled_operations_fall_in_the_same_kinds(name, kind):
    assert roofline.kind_of(name) == kind


def test_measure_on_the_cpu_times_every_kind(capsys):
    forward = roofline.unet_forward(str(TINY_CONFIG), 2, "bf16", "cpu")
    kinds, wall = roofline.measure(forward, "cpu", repeats=1)
    assert wall > 0 and kinds["convolution"] > 0 and kinds["normalization"] > 0 and kinds["dtype casts"] > 0
    counted = roofline.roofline(roofline.unet_operations(str(TINY_CONFIG), 2, "bf16"), peak=1e12, bandwidth=1e12)
    assert set(kinds) <= set(counted)  # the profiled operations fall in the kinds that were counted
    args = ["--config", str(TINY_CONFIG), "--rows", "2", "--precision", "bf16", "--measure", "--device", "cpu",
            "--repeats", "1"]
    assert roofline.main(roofline.parse_args(args)) == 0
    out = capsys.readouterr().out
    assert "| measured ms" in out and "measured: " in out


def test_measure_without_a_gpu_is_one_line_and_status_2(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert roofline.main(roofline.parse_args(["--measure", "--device", "cuda"])) == 2
    assert capsys.readouterr().err.startswith("error: no CUDA device")


def test_matmul_attention_counts_the_same_flops_and_moves_the_scores():
    fused = roofline.unet_operations(str(TINY_CONFIG), 2, "fp32")
    plain = roofline.unet_operations(str(TINY_CONFIG), 2, "fp32", attention="matmul")
    assert sum(f for _, f, _ in plain) == sum(f for _, f, _ in fused)
    attention = [moved for name, _, moved in fused if name == "scaled_dot_product_attention"]
    scores = [moved for name, _, moved in plain if name in ("baddbmm", "_softmax", "bmm")]
    assert attention and "scaled_dot_product_attention" not in {name for name, _, _ in plain}
    assert len(scores) == 3 * len(attention)
    assert sum(scores) > sum(attention)
