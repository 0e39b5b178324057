"""benchmarks/profile_forward.py: kernel families, and one profiled forward of the tiny model on the CPU; the GPU
scripts gpu_profile.sh and gpu_check.sh without a GPU."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY_CONFIG, exit_status

sys.path.insert(0, str(REPO / "benchmarks"))
import profile_forward  # noqa: E402
import roofline  # noqa: E402


@pytest.mark.parametrize("name, family", [
    ("sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize128x256x64", "convolution"),
    ("void cudnn::ops::nchwToNhwcKernel<__half, __half, float, false, true>", "convolution"),
    ("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1", "matmul"),
    ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_f16_s161616gemm_f16_32x32_128x2_tn_align8>", "matmul"),
    ("nvjet_sm90_hsh_192x192_64x4_1x2_h_bz_coopB_bias_TNN", "matmul"),  # cuBLAS's Hopper kernels
    ("fmha_cutlassF_f16_aligned_64x128_rf_sm80(PyTorchMemEffAttention::AttentionKernel)", "attention"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4>>", "attention"),
    ("triton_poi_fused_convolution_silu_3", "generated (Triton)"),
    ("triton_red_fused_native_group_norm_0", "generated (Triton)"),
    ("void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<float, float>", "normalization"),
    ("aten::native_group_norm", "normalization"), ("aten::mkldnn_convolution", "convolution"),
    ("aten::addmm", "matmul"), ("aten::mm", "matmul"), ("aten::bmm", "matmul"), ("aten::baddbmm", "matmul"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::Half>>", "elementwise and other"),
    ("aten::silu", "elementwise and other"), ("aten::cat", "elementwise and other"),
])
def test_families(name, family):
    assert profile_forward.family_of(name) == family


def test_cpu_profile_lists_every_convolution(capsys):
    assert profile_forward.main(profile_forward.parse_args(
        ["--device", "cpu", "--config", str(TINY_CONFIG), "--rows", "2", "--precision", "fp32",
         "--warmup", "1", "--repeats", "2", "--top", "40"])) == 0
    out = capsys.readouterr().out
    counted = roofline.unet_operations(str(TINY_CONFIG), 2, "fp32")
    convolutions = sum(name == "convolution" for name, _, _ in counted)
    listed = {cells[0]: cells[1:] for cells in
              ([c.strip() for c in line.strip("|").split("|")] for line in out.splitlines() if line.startswith("| aten::"))}
    assert float(listed["aten::convolution"][1]) == convolutions  # calls per forward, whichever kernel runs them
    gflop = float(out.split(" GFLOP,")[0].rsplit(", ", 1)[1])
    assert gflop == pytest.approx(sum(f for _, f, _ in counted) / 1e9, rel=1e-4)
    assert "| total" in out and "MFU" not in out  # no peak for a CPU


def test_no_cuda_is_one_line_and_status_2(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert profile_forward.main(profile_forward.parse_args(["--device", "cuda"])) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1


@pytest.mark.parametrize("argv, message", [
    (["--rows", "0"], "argument --rows: must be at least 1, not 0"),
    (["--rows", "-2"], "argument --rows: must be at least 1, not -2"),
    (["--repeats", "0"], "argument --repeats: must be at least 1, not 0"),
    (["--warmup", "-1"], "argument --warmup: must be at least 0, not -1"),
    (["--top", "0"], "argument --top: must be at least 1, not 0"),
    (["--peak", "-1"], "argument --peak: expected a positive number, not '-1'"),
    (["--inductor", "bogus=1"], "argument --inductor: torch._inductor.config has no option 'bogus'"),
    (["--device", "tpu"], "--device 'tpu' is not a device name"),
    (["--config", "missing.yaml"], "cannot load the model: config not found"),
    (["--config", "malformed"], "cannot load the model: cannot read config")])
def test_bad_flags_are_one_line_errors(argv, message, tmp_path, capsys):
    if argv[-1] == "malformed":
        (tmp_path / "config.yaml").write_text("model: [unclosed\n  a: {")
        argv = ["--config", str(tmp_path / "config.yaml")]
    assert exit_status(profile_forward, ["--device", "cpu", "--config", str(TINY_CONFIG), "--rows", "2"] + argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: ") and captured.err.count("\n") == 1
    assert message in captured.err


def test_matmul_attention_profiles_its_matmuls(capsys):
    assert profile_forward.main(profile_forward.parse_args(
        ["--device", "cpu", "--config", str(TINY_CONFIG), "--rows", "2", "--precision", "fp32",
         "--warmup", "1", "--repeats", "1", "--top", "60", "--attention", "matmul"])) == 0
    out = capsys.readouterr().out
    assert "matmul attention" in out.splitlines()[0] and "cuDNN benchmark n/a" in out.splitlines()[0]
    listed = {line.strip("|").split("|")[0].strip() for line in out.splitlines() if line.startswith("| aten::")}
    assert {"aten::baddbmm", "aten::bmm", "aten::_softmax"} <= listed
    assert not any("attention" in name for name in listed)


FAKE_PROFILE = """#!/bin/sh
[ "$1" = -c ] && exit 0
echo "ran: $*"
case "$*" in
  *--compile*--inductor\\ coordinate*) echo "forward: 185.0 ms without the profiler" ;;
  *--compile*--inductor\\ freezing*) echo "forward: 188.0 ms without the profiler" ;;
  *--compile*--inductor\\ max_autotune*) echo "forward: 180.2 ms without the profiler" ;;
  *--compile*) echo "forward: 190.9 ms without the profiler" ;;
  *) echo "forward: 100.0 ms without the profiler" ;;
esac
"""
DEFAULTS_FASTEST = FAKE_PROFILE.replace("185.0", "195.0").replace("188.0", "196.0")


def run_gpu_profile(tmp_path, profile=FAKE_PROFILE, **env):
    """benchmarks/gpu_profile.sh --rows 8 with a stand-in for Python that has a GPU, prints the flags it gets and a
    forward time: compiled, 190.9 ms with the defaults, 188.0 frozen, 185.0 with coordinate-descent tuning, 180.2
    with max-autotune (only on request); 100 ms eager (never a pick: the flags are for compiled rows)."""
    fake = tmp_path / "python"
    fake.write_text(profile)
    fake.chmod(0o755)
    run = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_profile.sh"), "--rows", "8"], cwd=tmp_path,
                         env={**os.environ, "PYTHON": str(fake), "OUT_DIR": str(tmp_path / "tables"), **env},
                         capture_output=True, text=True, check=True)
    ran = [line.removeprefix("ran: benchmarks/profile_forward.py --device cuda ").split()
           for line in run.stdout.splitlines() if line.startswith("ran:")]
    return run, ran, Path(run.stdout.splitlines()[-1].removeprefix("tables: "))


COMPILED_RUNS = [  # in this order: the tuning most likely to pay before the one that may not fit in LIMIT
    ["--compile", "--top", "15", "--rows", "8"],
    ["--compile", "--inductor", "coordinate_descent_tuning=True", "--top", "15", "--rows", "8"],
    ["--compile", "--inductor", "freezing=True", "--top", "15", "--rows", "8"]]
COMPILED_TABLES = ["compiled.txt", "compiled_inductor_coordinate_descent_tuning_True.txt",
                   "compiled_inductor_freezing_True.txt"]


def test_gpu_profile_script_runs_the_compiled_variants_and_picks_the_fastest(tmp_path):
    run, ran, tables = run_gpu_profile(tmp_path)
    assert ran == COMPILED_RUNS
    assert tables.parent == tmp_path / "tables"
    assert sorted(p.name for p in tables.iterdir()) == sorted(COMPILED_TABLES)
    assert (tables / "compiled.txt").read_text().splitlines()[0] == \
        "ran: benchmarks/profile_forward.py --device cuda --compile --top 15 --rows 8"
    assert (tmp_path / "tables" / "best_flags").read_text() == "--inductor coordinate_descent_tuning=True\n"
    assert "fastest compiled forward: 185.0 ms" in run.stdout
    run, _, _ = run_gpu_profile(tmp_path, DEFAULTS_FASTEST)
    assert (tmp_path / "tables" / "best_flags").read_text() == "\n"  # the defaults won: no flags
    assert "fastest compiled forward: 190.9 ms" in run.stdout


def test_gpu_profile_script_adds_max_autotune_on_request(tmp_path):
    run, ran, tables = run_gpu_profile(tmp_path, MAX_AUTOTUNE="1")
    assert ran == COMPILED_RUNS + [["--compile", "--inductor", "max_autotune=True", "--top", "15", "--rows", "8"]]
    assert sorted(p.name for p in tables.iterdir()) == sorted(
        COMPILED_TABLES + ["compiled_inductor_max_autotune_True.txt"])
    assert (tmp_path / "tables" / "best_flags").read_text() == "--inductor max_autotune=True\n"


def test_gpu_profile_script_adds_eager_on_request(tmp_path):
    run, ran, tables = run_gpu_profile(tmp_path, EAGER="1")
    assert ran == COMPILED_RUNS + [["--top", "15", "--rows", "8"]]
    assert sorted(p.name for p in tables.iterdir()) == sorted(COMPILED_TABLES + ["eager.txt"])
    assert (tmp_path / "tables" / "best_flags").read_text() == "--inductor coordinate_descent_tuning=True\n"


@pytest.mark.slow
@pytest.mark.parametrize("script", ["gpu_check", "gpu_profile"])
def test_gpu_scripts_without_a_gpu_say_so_in_one_line(tmp_path, script):
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\n[ "$1" = -c ] && exit 1\necho "ran: $*"\n')  # a torch without CUDA
    fake.chmod(0o755)
    run = subprocess.run(["bash", str(REPO / "benchmarks" / f"{script}.sh")], env={**os.environ, "PYTHON": str(fake)},
                         capture_output=True, text=True)
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.startswith(f"{script}: no CUDA device") and run.stderr.count("\n") == 1
