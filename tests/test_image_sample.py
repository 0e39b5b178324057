"""scripts/image_sample.py end to end on the tiny model: MPI vs one process, resume, finished runs, the .npz
format, signals, bad input."""
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, TINY_CKPT, TINY_CONFIG, interruptible, load_script, run_main
from ldm import sampling_run
from ldm import cli, shards
from ldm.models.diffusion.faster_diffusion import FasterDiffusion
from ldm.sampling import decode_latents, generate, sample_generators, sample_labels, to_uint8

SCRIPT = REPO / "scripts" / "image_sample.py"
MPIEXEC = Path(sys.executable).parent / "mpiexec"
N = 5
FINAL = f"samples_{N}x64x64x3.npz"
RECORD = f"samples_{N}x64x64x3.json"
SHARDS = f"shards_{N}x64x64x3"
MODES = {"ddim": [], "fd": ["--use_faster_diffusion", "true", "--key_steps", "uniform:3"]}
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # 2 ranks on 2 cores: one thread each


image_sample = load_script("scripts/image_sample.py")


def command(out_dir, *flags, processes=1, config=TINY_CONFIG, ckpt=TINY_CKPT):
    """image_sample.py on the tiny model (N samples, 10 steps, published flag names) with extra flags."""
    cmd = [sys.executable, str(SCRIPT), "--config_path", str(config), "--model_path", str(ckpt),
           "--num_samples", str(N), "--ddim_steps", "10", "--tqdm_disable", "yes",
           *(["--output_dir", str(out_dir)] if out_dir else []), *flags]
    return [str(MPIEXEC), "-n", str(processes), *cmd] if processes > 1 else cmd


def run(out_dir, *flags, processes=1, cwd=REPO, **model):
    """Run image_sample.py (see command) from the folder cwd; later flags win. One process runs in this one, as a
    process would (conftest.run_main: no interpreter to start); several under mpiexec."""
    cmd = command(out_dir, *flags, processes=processes, **model)
    if processes == 1:
        return run_main("scripts/image_sample.py", *cmd[2:], cwd=cwd)
    return subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)


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
    assert result.stdout.splitlines()[-1] == f"samples: {out / FINAL}"
    return (request.param, out, *load(out / FINAL))


@pytest.mark.slow
def test_npz_format(reference):
    mode, out, _, _ = reference
    path = out / FINAL
    assert sorted(os.listdir(out)) == sorted([FINAL, RECORD])  # shards and temporary files are gone
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
    np.testing.assert_array_equal(labels, sample_labels(0, range(N), 1000).numpy())
    record = json.loads((out / RECORD).read_text())
    assert record["num_samples"] == N and record["image_shape"] == [64, 64, 3] and record["steps"] == 10
    assert record["checkpoint_sha256"] == shards.hashlib.sha256(TINY_CKPT.read_bytes()).hexdigest()
    assert images.std() > 0


@pytest.mark.slow
def test_mpi_matches_one_process(reference, tmp_path):
    mode, _, images, labels = reference
    result = run(tmp_path, "--batch_size", "2", *MODES[mode], processes=2)
    assert result.returncode == 0, result.stderr
    assert "with 2 process(es)" in result.stdout
    mpi_images, mpi_labels = load(tmp_path / FINAL)
    np.testing.assert_array_equal(mpi_labels, labels)
    assert_same_images(mpi_images, images)
    assert sorted(os.listdir(tmp_path)) == sorted([FINAL, RECORD])


@pytest.mark.slow
def test_matches_generate(reference, tiny_model):
    """The script's samples 3 and 4 are ldm.sampling.generate's for those indices."""
    mode, _, images, _ = reference
    fd = FasterDiffusion("uniform:3") if mode == "fd" else None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected, _ = generate(tiny_model, sample_labels(0, [3, 4], 1000), 10, 1.5, faster_diffusion=fd,
                               generators=sample_generators(0, [3, 4]))
    finally:
        torch.set_num_threads(threads)
    assert_same_images(images[3:], to_uint8(expected).numpy())


def plant_temporaries(folder, name):
    """Temporary files of `name` as killed runs leave them, and one of a live process (this test's parent, not the
    run, which may run in this process)."""
    folder.mkdir(parents=True, exist_ok=True)
    stale = [f".{name}.{socket.gethostname()}.999999999.tmp", f".{name}.999999999.tmp", f".{name}.elsewhere.7.tmp"]
    live = f".{name}.{socket.gethostname()}.{os.getppid()}.tmp"
    for tmp in [*stale, live]:
        (folder / tmp).write_bytes(b"partial")
    return live


@pytest.mark.slow
@pytest.mark.parametrize("reference", ["fd"], indirect=True)
def test_resume_after_kill(reference, tmp_path):
    mode, _, images, labels = reference
    flags = ["--batch_size", "3", *MODES[mode]]
    killed = run(tmp_path, *flags, "--stop_after_batches", "1")
    assert killed.returncode == 3
    assert not (tmp_path / FINAL).exists()
    assert sorted(os.listdir(tmp_path / SHARDS)) == ["batch_000000.npz", "settings.json"]

    fresh = run(tmp_path, *flags)
    assert fresh.returncode == 2 and "--resume" in fresh.stderr.strip().splitlines()[-1]
    changed = run(tmp_path, *flags, "--resume", "--seed", "1")
    assert changed.returncode == 2 and "other settings (seed: 0 -> 1)" in changed.stderr
    assert not (tmp_path / FINAL).exists()

    live = [plant_temporaries(tmp_path, FINAL), plant_temporaries(tmp_path / SHARDS, "batch_000001.npz")]
    resumed = run(tmp_path, *flags, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "made 2 of 5 images" in resumed.stdout  # only the missing batch was sampled
    resumed_images, resumed_labels = load(tmp_path / FINAL)
    np.testing.assert_array_equal(resumed_labels, labels)
    np.testing.assert_array_equal(resumed_images, images)
    assert sorted(os.listdir(tmp_path)) == sorted([FINAL, RECORD, live[0]])  # stale temporaries removed


@pytest.mark.slow
def test_resume_after_checkpoint_copied_and_touched(tmp_path):
    """The checkpoint is identified by its content: a copy elsewhere with a new mtime resumes the shards."""
    first, second = tmp_path / "a" / "model.ckpt", tmp_path / "b" / "model.ckpt"
    first.parent.mkdir()
    second.parent.mkdir()
    shutil.copyfile(TINY_CKPT, first)
    out = tmp_path / "out"
    assert run(out, "--batch_size", "3", "--stop_after_batches", "1", ckpt=first).returncode == 3
    shutil.copyfile(first, second)
    os.utime(second, ns=(10**18, 10**18))
    resumed = run(out, "--batch_size", "3", "--resume", ckpt=second)
    assert resumed.returncode == 0, resumed.stderr
    assert "made 2 of 5 images" in resumed.stdout


@pytest.mark.slow
@pytest.mark.parametrize("reference", ["ddim"], indirect=True)
def test_finished_run_is_recognised(reference, tmp_path):
    mode, out, images, _ = reference
    shutil.copytree(out, tmp_path, dirs_exist_ok=True)
    before = (tmp_path / FINAL).stat().st_mtime_ns
    # The same settings (another batch size and --resume make the same images): nothing to do.
    again = run(tmp_path, "--batch_size", "2", "--resume", *MODES[mode])
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith(f"already done: {tmp_path / FINAL}")
    assert again.stdout.splitlines()[-1] == f"samples: {tmp_path / FINAL}"
    assert (tmp_path / FINAL).stat().st_mtime_ns == before

    other = run(tmp_path, "--classifier_scale", "2", *MODES[mode])
    assert other.returncode == 2
    assert other.stderr.strip().splitlines() == [
        f"error: {tmp_path / FINAL} was made with other settings (scale: 1.5 -> 2.0); "
        "pass --overwrite to replace it, or choose another --output_dir"]
    assert (tmp_path / FINAL).stat().st_mtime_ns == before

    replaced = run(tmp_path, "--classifier_scale", "2", "--overwrite", *MODES[mode])
    assert replaced.returncode == 0, replaced.stderr
    assert json.loads((tmp_path / RECORD).read_text())["scale"] == 2.0
    assert not np.array_equal(load(tmp_path / FINAL)[0], images)
    assert sorted(os.listdir(tmp_path)) == sorted([FINAL, RECORD])


def test_both_spellings_of_each_flag():
    """The published flag names and the shorter ones shared with infer_ldm.py set the same options."""
    published = sampling_run.parse_args(["--config_path", "c.yaml", "--model_path", "m.ckpt", "--ddim_steps", "50",
                                         "--ddim_eta", "0.5", "--classifier_scale", "3", "--use_faster_diffusion",
                                         "True", "--tqdm_disable", "yes"])
    short = sampling_run.parse_args(["--config", "c.yaml", "--ckpt", "m.ckpt", "--steps", "50", "--eta", "0.5",
                                     "--scale", "3", "--faster_diffusion", "--tqdm_disable"])
    assert vars(published) == vars(short)
    assert (published.config, published.steps, published.scale, published.cache) == ("c.yaml", 50, 3.0, "fd")
    assert sampling_run.parse_args(["--use_faster_diffusion", "False"]).cache == "none"
    assert sampling_run.parse_args(["--use_faster_diffusion", "True", "--cache", "deepcache"]).cache == "deepcache"
    defaults = sampling_run.parse_args([])
    assert (defaults.scale, defaults.seed, defaults.sampler, defaults.cache, defaults.key_steps) == (
        1.5, 0, "ddim", "none", "ldm250")


@pytest.mark.slow
def test_interrupted_overwrite_says_how_to_continue_it(tmp_path, capsys):
    first = command(tmp_path, "--batch_size", "2")[2:]
    assert image_sample.run(first) == 0
    images = load(tmp_path / FINAL)[0]
    new = [*first, "--classifier_scale", "2"]
    with pytest.raises(SystemExit) as stopped:
        image_sample.run([*new, "--overwrite", "--stop_after_batches", "1"])
    assert stopped.value.code == sampling_run.STOPPED_EXIT_CODE
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:
        image_sample.run([*new, "--resume"])
    assert refused.value.code == cli.BAD_INPUT
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {tmp_path / FINAL} was made with other settings (scale: 1.5 -> 2.0); pass --overwrite --resume to "
        "replace it, continuing the saved batches of an interrupted --overwrite run, or choose another --output_dir"]
    np.testing.assert_array_equal(load(tmp_path / FINAL)[0], images)
    assert image_sample.run([*new, "--overwrite", "--resume"]) == 0
    assert json.loads((tmp_path / RECORD).read_text())["scale"] == 2.0


@pytest.mark.slow
def test_npz_without_record_is_not_overwritten(tmp_path):
    np.savez(tmp_path / FINAL, np.zeros((N, 64, 64, 3), np.uint8), np.zeros(N, np.int64))
    result = run(tmp_path)
    assert result.returncode == 2 and "no record of its settings" in result.stderr
    assert not load(tmp_path / FINAL)[0].any()


@pytest.mark.slow
def test_default_output_dir_depends_on_the_settings(tmp_path):
    """Without --output_dir, runs with other settings write to other folders (under ./outputs/samples), named
    after the model: tests/fixtures/tiny/config.yaml is 'tiny'."""
    for seed in ("0", "1"):
        result = run(None, "--num_samples", "2", "--steps", "1", "--seed", seed, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    written = sorted((tmp_path / "outputs" / "samples").glob("*/samples_2x64x64x3.npz"))
    assert [p.parent.name.split("_")[:4] for p in written] == [["tiny", "ddim1", "scale1.5", f"seed{s}"]
                                                               for s in "01"]


@pytest.mark.slow
def test_sigterm_stops_cleanly_with_a_line_on_resuming(tmp_path):
    proc = subprocess.Popen(command(tmp_path, "--num_samples", "200", "--batch_size", "1", "--steps", "50"),
                            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "shards_200x64x64x3" / "batch_000000.npz").exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stopped: ") and lines[0].endswith(
        "rerun the same command with --resume to continue"), err
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_interrupted_merge_keeps_shards_and_leaves_no_temporary(tmp_path, monkeypatch):
    files = shards.RunFiles(tmp_path, 4, (2, 2, 3))
    files.shard_dir.mkdir(parents=True)
    settings = {"num_samples": 4, "batch_size": 2, "image_shape": [2, 2, 3]}
    for k in range(2):
        shards.write_shard(files.shard(k), np.zeros((2, 2, 2, 3), np.uint8), np.arange(2), range(2 * k, 2 * k + 2))

    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(shards, "read_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        shards.write_samples(files, settings)
    assert sorted(os.listdir(tmp_path)) == [SHARDS.replace(str(N), "4").replace("64x64", "2x2")]
    assert sorted(os.listdir(files.shard_dir)) == ["batch_000000.npz", "batch_000001.npz"]


def test_out_of_memory_is_one_line_and_keeps_finished_batches(tmp_path, monkeypatch, capsys):
    calls = []

    def second_batch_runs_out(*args, **kwargs):
        calls.append(kwargs["generators"])
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return sample_latents(*args, **kwargs)
    sample_latents = sampling_run.sample_latents
    monkeypatch.setattr(sampling_run, "sample_latents", second_batch_runs_out)
    status = image_sample.run(command(tmp_path, "--batch_size", "2", "--use_faster_diffusion", "true",
                                      "--key_steps", "uniform:3")[2:])
    assert status == sampling_run.OUT_OF_MEMORY_EXIT_CODE
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "error: the GPU ran out of memory at batches of 2 samples; 1 finished batches are saved in "), lines
    assert lines[0].endswith("rerun with a smaller --batch_size and --overwrite, or a smaller --max_decoder_batch")
    assert sorted(os.listdir(tmp_path / SHARDS)) == ["batch_000000.npz", "settings.json"]
    assert not (tmp_path / FINAL).exists() and not [p for p in tmp_path.rglob("*.tmp")]


def test_full_disk_is_one_line_and_resumes(tmp_path, monkeypatch, capsys):
    written = []

    def disk_fills_up(path, *args):
        if written:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        written.append(path)
        write_shard(path, *args)
    write_shard = sampling_run.write_shard
    monkeypatch.setattr(sampling_run, "write_shard", disk_fills_up)
    argv = command(tmp_path, "--batch_size", "2")[2:]
    assert image_sample.run(argv) == sampling_run.WRITE_FAILED_EXIT_CODE
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"error: cannot write {tmp_path / SHARDS / 'batch_000001.npz'}: No space left on device; 1 finished "
                     f"batches are saved in {tmp_path / SHARDS}: rerun the same command with --resume"]
    monkeypatch.setattr(sampling_run, "write_shard", write_shard)
    assert image_sample.run([*argv, "--resume"]) == 0
    assert load(tmp_path / FINAL)[0].shape == (N, 64, 64, 3) and not [p for p in tmp_path.rglob("*.tmp")]


@pytest.mark.parametrize("in_the_way", [FINAL, RECORD, SHARDS])
def test_a_path_in_the_way_of_the_run_is_refused_before_sampling(in_the_way, tmp_path):
    path = tmp_path / in_the_way
    path.mkdir() if in_the_way != SHARDS else path.write_text("x")
    with pytest.raises(cli.UsageError, match="in the way of this run's files"):
        sampling_run.check_run(sampling_run.parse_args(command(tmp_path, "--overwrite")[2:]))


@pytest.mark.slow
def test_ten_class_model_draws_its_own_labels(ten_class_files, tiny_model, tmp_path):
    config, ckpt = ten_class_files
    result = run(tmp_path, "--batch_size", "5", config=config, ckpt=ckpt)
    assert result.returncode == 0, result.stderr
    images, labels = load(tmp_path / FINAL)
    np.testing.assert_array_equal(labels, sample_labels(0, range(N), 10).numpy())
    assert labels.max() < 10
    expected, _ = generate(tiny_model, torch.from_numpy(labels), 10, 1.5, generators=sample_generators(0, range(N)))
    assert_same_images(images, to_uint8(expected).numpy())


# --- bad input: one line, exit status 2, nothing written --------------------------------------------------

def _garbage_checkpoint(tmp_path):
    (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint")
    return ["--model_path", str(tmp_path / "bad.ckpt")]


def _file_as_output_dir(tmp_path):
    (tmp_path / "file").write_text("x")
    return ["--output_dir", str(tmp_path / "file" / "out")]


def _x0_config(tmp_path):
    config = TINY_CONFIG.read_text().replace("params:\n", "params:\n    parameterization: x0\n", 1)
    (tmp_path / "x0.yaml").write_text(config)
    return ["--config_path", str(tmp_path / "x0.yaml")]


def _convolutional_unet_config(tmp_path):
    """An upstream config of the UNet without spatial transformers (unconditional LDMs), which is not supported."""
    config = TINY_CONFIG.read_text().replace("use_spatial_transformer: true", "use_spatial_transformer: false")
    (tmp_path / "unet.yaml").write_text(config)
    return ["--config_path", str(tmp_path / "unet.yaml")]


def _edited_config(old, new):
    """Flags for the tiny config with one line changed, written as edited.yaml."""
    def flags(tmp_path):
        (tmp_path / "edited.yaml").write_text(TINY_CONFIG.read_text().replace(old, new, 1))
        return ["--config_path", str(tmp_path / "edited.yaml")]
    return flags


BAD_INPUTS = {
    "missing config": (lambda p: ["--config_path", str(p / "missing.yaml")], ["config not found", "missing.yaml"]),
    "missing checkpoint": (lambda p: ["--model_path", str(p / "missing.ckpt")],
                           ["checkpoint not found", "give --ckpt the checkpoint that goes with the config"]),
    "checkpoint is a directory": (lambda p: ["--model_path", str(p)], ["is a directory, not a file"]),
    "no samples": (lambda p: ["--num_samples", "0"], ["--num_samples", "at least 1"]),
    "zero batch": (lambda p: ["--batch_size", "0"], ["--batch_size", "at least 1"]),
    "word batch": (lambda p: ["--batch_size", "big"], ["argument --batch_size", "a number of samples or auto"]),
    "auto batch on cpu": (lambda p: ["--batch_size", "auto", "--device", "cpu"], ["--batch_size auto", "GPU"]),
    "bad tf32": (lambda p: ["--tf32", "yes"], ["argument --tf32", "expected on or off, not 'yes'"]),
    "stop after no batches": (lambda p: ["--stop_after_batches", "0"], ["--stop_after_batches", "at least 1"]),
    "negative seed": (lambda p: ["--seed", "-1"], ["--seed must be in 0..9223372036854775807, not -1"]),
    "huge seed": (lambda p: ["--seed", str(2**64)], ["--seed must be in 0.."]),
    "float seed": (lambda p: ["--seed", "1e20"], ["argument --seed: invalid int value: '1e20'"]),
    "negative eta": (lambda p: ["--ddim_eta", "-0.5"], ["--eta must be a number >= 0"]),
    "mps device": (lambda p: ["--device", "mps"], ["--device mps: only cpu and cuda devices are supported"]),
    "meta device": (lambda p: ["--device", "meta"], ["--device meta: only cpu and cuda"]),
    "no such device": (lambda p: ["--device", "tpu:0"], ["is not a device name"]),
    "unwritable output": (_file_as_output_dir, ["--output_dir", "cannot create a directory there", "is a file"]),
    "unknown key steps": (lambda p: [*MODES["fd"], "--key_steps", "bogus"], ["key_steps", "unknown", "bogus"]),
    "key steps without 0": (lambda p: [*MODES["fd"], "--key_steps", "3,5"], ["key_steps must start with 0"]),
    "bad step count": (lambda p: ["--ddim_steps", "300"], ["--steps: 300"]),
    "every timestep": (lambda p: ["--ddim_steps", "1000"], ["--steps: 1000 DDIM steps", "past the schedule's last"]),
    "zero interval": (lambda p: ["--cache", "deepcache", "--cache_interval", "0"],
                      ["error: DeepCache interval must be a positive number of steps, not 0"]),
    "no full steps": (lambda p: ["--cache", "deepcache", "--full_steps", "auto:0"],
                      ["DeepCache: cannot choose 0 of 10 steps: K must be in 1..10"]),
    "empty output dir": (lambda p: ["--output_dir", ""], ["--output_dir is empty"]),
    "no real class": (_edited_config("n_classes: 1001", "n_classes: 1"),
                      ["cannot load the model: the class embedding has 1 entry", "at least one real class"]),
    "fp16 on cpu": (lambda p: ["--precision", "fp16", "--device", "cpu"], ["fp16", "CUDA"]),
    "bad boolean": (lambda p: ["--use_faster_diffusion", "maybe"], ["boolean value expected"]),
    "x0 model": (_x0_config, ["cannot load the model: parameterization 'x0' is not supported"]),
    "concatenated conditioning": (_edited_config("conditioning_key: crossattn", "conditioning_key: concat"),
                                  ["cannot load the model: conditioning_key 'concat' is not supported"]),
    "embedder reads another key": (_edited_config("cond_stage_key: class_label", "cond_stage_key: image"),
                                   ["cannot load the model: cond_stage_key 'image' is not the key", "'class_label'"]),
    "unsupported UNet": (_convolutional_unet_config,
                         ["cannot load the model: only the spatial-transformer UNet (use_spatial_transformer: true)"]),
    "scale beyond float32": (lambda p: ["--scale", "1e308"], ["--scale must be a finite number that float32 can hold"]),
    "eta beyond float32": (lambda p: ["--eta", "1e308"], ["--eta must be a number >= 0 that float32 can hold"]),
    "eta past the schedule": (lambda p: ["--eta", "1.01"],
                              ["--eta 1.01: DDIM's noise would exceed the schedule at 10 steps", "at most 1.0069"]),
    "injection beyond float32": (lambda p: [*MODES["fd"], "--injection_scale", "1e308"],
                                 ["argument --injection_scale", "float32 can hold"]),
    "infinite pow": (lambda p: ["--cache", "deepcache", "--cache_interval", "2", "--nonuniform", "--pow", "inf"],
                     ["DeepCache pow must be a positive finite number, not inf"]),
    "nan scale_factor": (_edited_config("params:\n", "params:\n    scale_factor: .nan\n"),
                         ["sets scale_factor nan", "every latent would decode to NaN"]),
    "zero scale_factor": (_edited_config("params:\n", "params:\n    scale_factor: 0\n"), ["sets scale_factor 0"]),
}


def check_bad_input(args_or_result, words, folder):
    """One `error:` line holding words, and nothing written into folder (besides the test's own files)."""
    lines = args_or_result.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), args_or_result
    for word in words:
        assert word in lines[0]
    assert not [p for p in folder.rglob("*") if p.name not in ("file", "bad.ckpt", "x0.yaml", "unet.yaml", "edited.yaml")]


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input(case, tmp_path, capsys):
    """Checked in-process: parse_args and check_run, which run before any model is loaded."""
    make_flags, words = BAD_INPUTS[case]
    out = tmp_path / "out"
    argv = command(out, *make_flags(tmp_path))[2:]
    try:
        sampling_run.check_run(sampling_run.parse_args(argv))
    except cli.UsageError as e:
        message = f"error: {e}"
    except SystemExit as e:
        assert e.code == cli.BAD_INPUT
        message = capsys.readouterr().err
    else:
        raise AssertionError("accepted")
    check_bad_input(message, words, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["negative seed", "bad checkpoint", "x0 model", "unsupported UNet",
                                  "concatenated conditioning"])
def test_bad_input_command_line(case, tmp_path):
    """As a command: one line, exit status 2, no output folder (a checkpoint that fails to load included)."""
    make_flags, words = BAD_INPUTS.get(case) or (_garbage_checkpoint, ["bad.ckpt", "not a PyTorch checkpoint"])
    result = run(tmp_path / "out", *make_flags(tmp_path))
    assert result.returncode == 2
    check_bad_input(result.stderr, words, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["no samples", "bad checkpoint"])
def test_bad_input_mpi(case, tmp_path):
    """Checked on rank 0 before loading (no samples) or by every rank while loading (bad checkpoint)."""
    make_flags, words = BAD_INPUTS.get(case) or (_garbage_checkpoint, ["bad.ckpt", "not a PyTorch checkpoint"])
    result = run(tmp_path / "out", *make_flags(tmp_path), processes=2)
    assert result.returncode == 2
    check_bad_input(result.stderr, words, tmp_path)


@pytest.mark.parametrize("affinity", [True, False])
def test_ranks_on_a_node_share_its_cores(monkeypatch, affinity):
    """Two ranks on one node take half the cores each; where the OS cannot say which cores a process may use
    (no os.sched_getaffinity, as on macOS), the machine's count is used."""
    from ldm import distributed

    class TwoRanks:
        size = 2

        def local_size(self):
            return 2

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    if affinity:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)), raising=False)
    else:
        monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    threads = torch.get_num_threads()
    try:
        distributed.share_cpu_threads(TwoRanks())
        assert torch.get_num_threads() == (3 if affinity else 4)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_eta_at_the_schedule_limit_samples_finite_images(tmp_path):
    """The largest eta accepted (floored, as the refusal names it) still gives finite samples; just above is refused."""
    assert run(tmp_path, "--eta", "1.0069", "--batch_size", "5").returncode == 0
    assert load(tmp_path / FINAL)[0].std() > 0


# --- no silent garbage: sampling stops at the first non-finite latent ---------------------------------------


@pytest.mark.slow
def test_nan_weights_are_refused_when_loading(tmp_path):
    state = torch.load(TINY_CKPT, weights_only=True)
    weights = state["state_dict"]
    name = next(k for k in weights if k.startswith("model.diffusion_model.") and weights[k].is_floating_point())
    weights[name] = torch.full_like(weights[name], float("nan"))
    torch.save(state, tmp_path / "nan.ckpt")
    result = run(tmp_path / "out", "--model_path", str(tmp_path / "nan.ckpt"))
    assert result.returncode == cli.BAD_INPUT
    check_bad_input(result.stderr, ["nan.ckpt holds NaN or infinite weights", name], tmp_path / "out")


@pytest.mark.slow
def test_latents_that_overflow_stop_the_run_naming_batch_and_step(tmp_path):
    """--scale 1e38 fits float32, but guided noise predictions overflow it at the first step."""
    result = run(tmp_path, "--scale", "1e38", "--batch_size", "2")
    assert result.returncode == cli.BAD_INPUT
    assert result.stderr.strip().splitlines() == [
        "error: samples 0..1: the latents are NaN or infinite from step 1 of 10 on: these settings or this checkpoint "
        "cannot give finite samples; nothing of this batch was written"]
    assert not (tmp_path / FINAL).exists() and not list((tmp_path / SHARDS).glob("batch_*"))


@pytest.mark.slow
def test_images_that_decode_to_nan_stop_the_run(tmp_path):
    """A scale_factor so small that latents / scale_factor overflow: finite latents, NaN images."""
    (tmp_path / "tiny.yaml").write_text(TINY_CONFIG.read_text().replace("params:\n", "params:\n    scale_factor: 1e-45\n", 1))
    result = run(tmp_path / "out", "--config_path", str(tmp_path / "tiny.yaml"), "--batch_size", "5")
    assert result.returncode == cli.BAD_INPUT
    assert "error: samples 0..4: the decoded images are NaN or infinite" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_cpu_out_of_memory_is_one_line_like_the_gpus(tmp_path, monkeypatch, capsys):
    def out_of_memory(*args, **kwargs):
        return torch.empty(1 << 62, dtype=torch.uint8)  # the CPU allocator's own error
    monkeypatch.setattr(sampling_run, "sample_latents", out_of_memory)
    assert image_sample.run(command(tmp_path, "--batch_size", "2")[2:]) == sampling_run.OUT_OF_MEMORY_EXIT_CODE
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: the CPU ran out of memory at batches of 2 samples; rerun with a smaller --batch_size"]


# --- a run owns its folder and trusts only verified output ------------------------------------------------


def test_a_folder_held_by_another_run_is_refused(tmp_path, capsys):
    argv = command(tmp_path, "--batch_size", "5")[2:]
    with shards.FolderLock(tmp_path):  # another open file: flock conflicts as between two processes
        with pytest.raises(SystemExit) as refused:
            image_sample.run(argv)
        assert refused.value.code == cli.BAD_INPUT
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"error: {tmp_path} is in use by another run (process {os.getpid()} on {socket.gethostname()}); "
                       "wait for it to end, or choose another --output_dir"]
        assert sorted(os.listdir(tmp_path)) == [".lock"]
    assert image_sample.run(argv) == 0
    assert sorted(os.listdir(tmp_path)) == sorted([FINAL, RECORD])  # the run's own lock is gone with it


def test_a_run_in_progress_is_reported_in_use_not_as_an_earlier_run(tmp_path, capsys):
    """The checks made before taking the folder may see another run's first batches: that run is named, not
    taken for an interrupted one."""
    argv = command(tmp_path, "--batch_size", "2")[2:]
    with pytest.raises(SystemExit):
        image_sample.run([*argv, "--stop_after_batches", "1"])
    capsys.readouterr()
    with shards.FolderLock(tmp_path):  # that run, still going
        with pytest.raises(SystemExit) as refused:
            image_sample.run([*argv, "--scale", "2"])
    assert refused.value.code == cli.BAD_INPUT
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {tmp_path} is in use by another run (process {os.getpid()} on {socket.gethostname()}); "
        "wait for it to end, or choose another --output_dir"]
    with pytest.raises(SystemExit) as alone:  # once it has ended, the saved batch is what the line names
        image_sample.run([*argv, "--scale", "2"])
    assert alone.value.code == cli.BAD_INPUT and "--resume" in capsys.readouterr().err


@pytest.mark.slow
def test_the_lock_file_of_a_dead_run_is_not_in_the_way(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".lock").write_text(f"{socket.gethostname()} {dead.pid}\n")
    assert run(tmp_path, "--batch_size", "5").returncode == 0


@pytest.mark.slow
def test_a_refused_run_leaves_no_folder_behind(tmp_path):
    """The lock's folder is created for the run and removed when the run wrote nothing in it."""
    out = tmp_path / "a" / "b"
    result = run(out, "--scale", "1e38", "--batch_size", "5")
    assert result.returncode == cli.BAD_INPUT
    assert sorted(p.name for p in out.iterdir()) == [SHARDS]  # the shards' settings were written
    with shards.FolderLock(tmp_path / "c" / "d"):
        assert (tmp_path / "c" / "d" / ".lock").exists()
    assert sorted(os.listdir(tmp_path)) == ["a"]


@pytest.mark.slow
def test_two_runs_started_together_never_mix(tmp_path):
    """Two runs into one folder at the same moment: one samples, the other is refused (in use, or, if it came
    after, finished with other settings); the .npz holds the winner's images."""
    procs = [subprocess.Popen(command(tmp_path, "--scale", scale, "--batch_size", "1"), cwd=REPO, env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for scale in ("3", "2")]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(status for status, _ in results) == [0, cli.BAD_INPUT], results
    winner, loser = (0, 1) if results[0][0] == 0 else (1, 0)
    assert "is in use by another run" in results[loser][1] or "was made with other settings" in results[loser][1]
    assert json.loads((tmp_path / RECORD).read_text())["scale"] == float(("3", "2")[winner])
    alone = tmp_path / "alone"
    assert run(alone, "--scale", ("3", "2")[winner], "--batch_size", "5").returncode == 0
    assert_same_images(load(tmp_path / FINAL)[0], load(alone / FINAL)[0])


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "flipped byte"])
def test_a_damaged_npz_is_refused_with_how_to_redo_it(damage, tmp_path):
    assert run(tmp_path, "--batch_size", "5").returncode == 0
    data = bytearray((tmp_path / FINAL).read_bytes())
    if damage == "truncated":
        data = data[:5000]
    else:
        data[len(data) // 2] ^= 1  # inside the images
    (tmp_path / FINAL).write_bytes(bytes(data))
    result = run(tmp_path, "--batch_size", "5")
    assert result.returncode == cli.BAD_INPUT
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {tmp_path / FINAL} is damaged (") and lines[0].endswith(
        "); pass --overwrite to sample it again"), lines
    assert run(tmp_path, "--batch_size", "5", "--overwrite").returncode == 0
    assert "already done" in run(tmp_path, "--batch_size", "5").stdout


@pytest.mark.slow
def test_a_checksum_catches_what_the_zip_does_not(tmp_path):
    """Images rewritten whole (a valid .npz of the right shape) disagree with the record's checksum."""
    assert run(tmp_path, "--batch_size", "5").returncode == 0
    images, labels = load(tmp_path / FINAL)
    np.savez(tmp_path / FINAL, 255 - images, labels)
    result = run(tmp_path, "--batch_size", "5")
    assert result.returncode == cli.BAD_INPUT
    assert "do not match the checksum in its record" in result.stderr


@pytest.mark.slow
def test_an_unreadable_record_is_called_unreadable(tmp_path):
    assert run(tmp_path, "--batch_size", "5").returncode == 0
    (tmp_path / RECORD).write_text("{ not json")
    result = run(tmp_path, "--batch_size", "5")
    assert result.returncode == cli.BAD_INPUT
    assert f"exists with an unreadable record of its settings ({RECORD})" in result.stderr


def test_a_full_disk_before_sampling_is_a_failed_write(tmp_path, monkeypatch, capsys):
    """Exit status 5 as for a full disk during sampling (the README's), not 2, and nothing sampled."""
    def disk_full(path, settings):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    monkeypatch.setattr(sampling_run, "write_settings", disk_full)
    assert image_sample.run(command(tmp_path, "--batch_size", "5")[2:]) == sampling_run.WRITE_FAILED_EXIT_CODE
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: cannot write {tmp_path / SHARDS / 'settings.json'}: No space left on device; nothing was sampled: "
        "rerun the same command once it can write there"]


# --- interrupting -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ctrl_c_while_the_libraries_load_is_one_line(tmp_path):
    proc = subprocess.Popen(command(tmp_path), cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=interruptible)
    maps, deadline = Path(f"/proc/{proc.pid}/maps"), time.time() + 60
    while "libtorch" not in maps.read_text() and time.time() < deadline:  # torch is loading: seconds of imports
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT
    assert err.strip().splitlines() in (["stopped"], ["stopped before sampling began"]), err


def rank_processes(marker):
    """{rank: pid} of the MPI ranks whose command line holds marker (read from /proc)."""
    ranks = {}
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = dict(v.split(b"=", 1) for v in (entry / "environ").read_bytes().split(b"\0") if b"=" in v)
        except (OSError, ValueError):
            continue
        if marker.encode() in cmdline and b"PMI_RANK" in environ and Path(cmdline[0].decode()).name.startswith("python"):
            ranks[int(environ[b"PMI_RANK"])] = int(entry.name)
    return ranks


@pytest.mark.slow
@pytest.mark.parametrize("rank, signum", [(1, signal.SIGTERM), (0, signal.SIGINT)])
def test_a_signal_to_one_rank_ends_the_whole_mpi_job(rank, signum, tmp_path):
    """A real signal to one rank's process (not to mpiexec): every rank ends, with the one line on resuming."""
    out = tmp_path / f"out{rank}"
    flags = ["--num_samples", "200", "--batch_size", "1", "--steps", "100"]
    proc = subprocess.Popen(command(out, *flags, processes=2), cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=interruptible)
    deadline = time.time() + 120
    while not list((out / "shards_200x64x64x3").glob("batch_*.npz")) and time.time() < deadline:
        time.sleep(0.2)
    ranks = rank_processes(str(out))
    assert sorted(ranks) == [0, 1], ranks
    os.kill(ranks[rank], signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err
    ours = [line for line in err.strip().splitlines() if "MPI_Abort" not in line]
    assert len(ours) == 1 and ours[0].startswith("stopped: ") and ours[0].endswith(
        "rerun the same command with --resume to continue"), err
    deadline = time.time() + 30
    while rank_processes(str(out)) and time.time() < deadline:  # the ranks end as mpiexec does, or just after
        time.sleep(0.2)
    assert not rank_processes(str(out))
    saved = len(list((out / "shards_200x64x64x3").glob("batch_*.npz")))
    assert ours[0].startswith(f"stopped: {saved} of 200 batches are saved") or ours[0].startswith(
        f"stopped: {saved - 1} of 200 batches are saved"), (ours, saved)  # the other rank may finish one more
    assert not list(out.rglob("*.tmp"))


def test_a_missing_cin256_checkpoint_comes_with_the_download_command(tmp_path):
    """download_model.py fetches cin256-v2's weights: suggested for that config only (the tiny one: see BAD_INPUTS)."""
    args = sampling_run.parse_args(["--model_path", str(tmp_path / "m.ckpt")])
    with pytest.raises(cli.UsageError, match=r"download it with `python scripts/download_model.py --out .*m\.ckpt`"):
        cli.check_files(args)
    args = sampling_run.parse_args(["--model_path", str(tmp_path / "m.ckpt"), "--config_path", str(TINY_CONFIG)])
    with pytest.raises(cli.UsageError, match="goes with the config") as refused:
        cli.check_files(args)
    assert "download_model" not in str(refused.value)


@pytest.mark.slow
def test_a_checkpoint_of_another_model_names_the_config(tmp_path):
    """The digits checkpoint with the tiny config (as run_image_sample.sh with MODEL_PATH alone would give it)."""
    result = run(tmp_path / "out", "--model_path", str(REPO / "models/digits32/model.safetensors"))
    assert result.returncode == cli.BAD_INPUT
    check_bad_input(result.stderr, ["does not match the model architecture", "missing keys", "does not match the "
                                    "checkpoint: give the config it was made with (--config; CONFIG_PATH for "
                                    "run_image_sample.sh)"], tmp_path / "out")


# --- --save_latents ------------------------------------------------------------------------------------------


def sample_in_process(out, *flags):
    assert image_sample.run(command(out, "--batch_size", "2", *flags)[2:]) == 0
    with np.load(out / FINAL) as npz:
        return {key: npz[key] for key in npz.files}


def test_saved_latents_are_the_ones_the_images_decode_from(tiny_model, tmp_path):
    saved = sample_in_process(tmp_path, "--save_latents")
    assert saved["latents"].shape == (N, 3, 16, 16) and saved["latents"].dtype == np.float32
    record = json.loads((tmp_path / RECORD).read_text())
    assert record["save_latents"] is True and record["latent_shape"] == [3, 16, 16]
    decoded = to_uint8(decode_latents(tiny_model, torch.from_numpy(saved["latents"]))).numpy()
    assert_same_images(decoded, saved["arr_0"])
    plain = sample_in_process(tmp_path / "plain")
    assert sorted(plain) == ["arr_0", "arr_1"]  # without the flag, the ADM file as before
    np.testing.assert_array_equal(plain["arr_0"], saved["arr_0"])


def test_saved_latents_resume_and_are_verified(tmp_path, capsys):
    whole = sample_in_process(tmp_path / "whole", "--save_latents")
    argv = command(tmp_path / "resumed", "--batch_size", "2", "--save_latents")[2:]
    with pytest.raises(SystemExit):
        image_sample.run([*argv, "--stop_after_batches", "1"])
    assert image_sample.run([*argv, "--resume"]) == 0
    with np.load(tmp_path / "resumed" / FINAL) as npz:
        np.testing.assert_array_equal(npz["latents"], whole["latents"])
    capsys.readouterr()
    assert image_sample.run(argv) == 0 and "already done" in capsys.readouterr().out
    data = bytearray((tmp_path / "resumed" / FINAL).read_bytes())
    with zipfile.ZipFile(tmp_path / "resumed" / FINAL) as zf:
        data[zf.start_dir - 100] ^= 1  # inside the latents, the last member before the zip's directory
    (tmp_path / "resumed" / FINAL).write_bytes(bytes(data))
    with pytest.raises(SystemExit) as refused:
        image_sample.run(argv)
    assert refused.value.code == cli.BAD_INPUT and "is damaged" in capsys.readouterr().err
    with pytest.raises(SystemExit) as other:  # the latents are part of the settings: not 'already done' without them
        image_sample.run(command(tmp_path / "whole", "--batch_size", "2")[2:])
    assert other.value.code == cli.BAD_INPUT and "save_latents: True -> None" in capsys.readouterr().err
