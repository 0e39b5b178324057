"""infer_ldm.py on the tiny fixture model, and the checkpoint download helper (against a local server)."""
import copy
import functools
import http.server
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, TINY_CKPT, TINY_CONFIG, load_script
from test_timing import ScriptedClock


infer_ldm = load_script("infer_ldm.py")
download_model = load_script("scripts/download_model.py")

TILE = 64  # decoded image size of the tiny model
CLASSES = ["25", "187", "448"]
SMALL = ["--config", str(TINY_CONFIG), "--ckpt", str(TINY_CKPT), "--classes", *CLASSES, "--steps", "10",
         "--key_steps", "uniform:3", "--scale", "3", "--device", "cpu"]


def expected_size(rows, cols):
    return (infer_ldm.LABEL_WIDTH + cols * (TILE + infer_ldm.PAD) + infer_ldm.PAD,
            rows * (TILE + infer_ldm.PAD) + infer_ldm.PAD)


def tile_row(picture, row):
    """The pixels of the tiles of one row (label area left out)."""
    top = infer_ldm.PAD + row * (TILE + infer_ldm.PAD)
    return picture[top:top + TILE, infer_ldm.LABEL_WIDTH:]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model runs fastest on one thread, and far faster than with two when other jobs share the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(out, *extra, base=SMALL):
    assert infer_ldm.main([*base, "--out", str(out), *extra]) == 0
    with Image.open(out) as im:
        return im.size, np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pictures")
    return {
        "compare": run(folder / "compare.png", "--compare", "--seed", "1", "--repeats", "1"),
        "fd_seed1": run(folder / "fd1.png", "--seed", "1"),
        "fd_seed2": run(folder / "fd2.png", "--seed", "2"),
    }


@pytest.mark.slow
def test_compare_picture_layout(pictures):
    size, picture = pictures["compare"]
    assert size == expected_size(rows=2, cols=len(CLASSES))
    assert (picture[:, :infer_ldm.LABEL_WIDTH] < 128).any(), "label text is drawn"


def test_faster_diffusion_row_differs_from_ddim(pictures):
    _, picture = pictures["compare"]
    ddim, fd = tile_row(picture, 0).astype(int), tile_row(picture, 1).astype(int)
    assert np.abs(ddim - fd).mean() > 1.0


def test_same_seed_same_tiles(pictures):
    size, picture = pictures["fd_seed1"]
    assert size == expected_size(rows=1, cols=len(CLASSES))
    np.testing.assert_array_equal(tile_row(picture, 0), tile_row(pictures["compare"][1], 1))


def test_different_seed_different_tiles(pictures):
    one, two = tile_row(pictures["fd_seed1"][1], 0), tile_row(pictures["fd_seed2"][1], 0)
    assert np.abs(one.astype(int) - two.astype(int)).mean() > 1.0


def test_jpeg_with_several_samples_per_class(tmp_path):
    size, _ = run(tmp_path / "out" / "samples.jpg", "--n_per_class", "2", "--steps", "10", "--classes", "1", "2")
    assert size == expected_size(rows=1, cols=4)
    assert not [p for p in (tmp_path / "out").iterdir() if p.name != "samples.jpg"], "no temporary file left"


def test_defaults_are_the_published_settings():
    args = infer_ldm.parse_args([])
    assert (args.config, args.ckpt) == ("configs/latent-diffusion/cin256-v2.yaml", "models/ldm/cin256-v2/model.ckpt")
    assert args.classes == [25, 187, 448, 992, 123, 11] and args.n_per_class == 1
    assert (args.steps, args.eta, args.scale, args.seed) == (None, 0.0, 6.0, 0)  # steps: 250 on a GPU, see below
    assert (args.sampler, args.cache, args.key_steps, args.context_layout) == ("ddim", "fd", "ldm250-fast", "paired")
    assert args.precision == "fp32" and not args.compare and args.out == "outputs/samples.png"
    cpu = infer_ldm.parse_args(["--device", "cpu", "--ckpt", str(TINY_CKPT), "--out", "x.png"])
    infer_ldm.check_args(cpu)
    assert cpu.steps == infer_ldm.CPU_STEPS == 20


def test_published_flag_names_are_accepted(pictures, tmp_path):
    """The sampling script's spellings of the same settings give the same picture."""
    published = ["--config_path", str(TINY_CONFIG), "--model_path", str(TINY_CKPT), "--classes", *CLASSES,
                 "--ddim_steps", "10", "--ddim_eta", "0", "--classifier_scale", "3", "--use_faster_diffusion", "True",
                 "--key_steps", "uniform:3", "--device", "cpu", "--seed", "1", "--out", str(tmp_path / "p.png")]
    assert infer_ldm.main(published) == 0
    with Image.open(tmp_path / "p.png") as im:
        np.testing.assert_array_equal(tile_row(np.asarray(im.convert("RGB")), 0), tile_row(pictures["fd_seed1"][1], 0))


def test_ddim_only_without_faster_diffusion(tmp_path):
    base = [a for a in SMALL if a not in ("--key_steps", "uniform:3")]  # a FasterDiffusion flag: refused without it
    size, picture = run(tmp_path / "ddim.png", "--use_faster_diffusion", "no", "--seed", "1", base=base)
    assert size == expected_size(rows=1, cols=len(CLASSES))


@pytest.mark.slow
def test_cpu_run_says_how_long_and_labels_its_progress_bars(tmp_path, capsys):
    """Without --steps on the CPU: CPU_STEPS steps, one line with the expected time; bars say what they count."""
    argv = [a for a in SMALL if a not in ("--steps", "10")] + ["--compare", "--classes", "1", "--repeats", "2",
                                                               "--out", str(tmp_path / "cpu.png")]
    assert infer_ldm.main(argv) == 0
    err = capsys.readouterr().err
    notice = [line for line in err.splitlines() if line.startswith("on the CPU:")]
    assert len(notice) == 1 and "expected time up to about" in notice[0]
    assert "with 20 steps instead of the published 250 (pass --steps 250 for those: about" in notice[0]
    assert "DDIM, run 2 of 2: classes" in err and "DDIM + FD uniform:3, run 1 of 2: classes" in err


def test_cpu_notice_estimates_from_the_measured_step():
    args = infer_ldm.parse_args(["--classes", "1", "2", "--steps", "20", "--repeats", "1"])
    line = infer_ldm.cpu_notice(args, True, (0.5, 6.0), rows=2)  # (0.5 * 20 + 6) s x (2 classes + 1) x 2 rows
    assert line.startswith("on the CPU: expected time up to about 1.6 min with 20 steps")
    assert line.endswith("(pass --steps 250 for those: about 13.1 min)")  # (0.5 * 250 + 6) x 6 / 60
    assert infer_ldm.cpu_notice(args, False, (0.5, 6.0), rows=2) == "on the CPU: expected time up to about 1.6 min"
    args.repeats = 3  # (0.5 * 20 + 6) s x (2 classes x 3 repeats + 1) x 2 rows
    assert infer_ldm.cpu_notice(args, False, (0.5, 6.0), rows=2) == "on the CPU: expected time up to about 3.7 min"


def test_compared_rows_are_timed_in_turn_and_ranked_by_their_medians(tmp_path, monkeypatch, capsys):
    """DDIM's repeats take 2, 6 and 2.2 s, FasterDiffusion's 1 s each, taken in turn: medians 2.2 and 1 s for one
    class of one image (a 2.20x speed-up); every repeat of FasterDiffusion is faster than every one of DDIM, whose
    182% spread makes its time uncertain."""
    monkeypatch.setattr(infer_ldm, "device_clock", lambda device: ScriptedClock([2, 1, 6, 1, 2.2, 1]))
    argv = [*SMALL[:SMALL.index("--classes")], "--classes", "1", *SMALL[SMALL.index("--steps"):]]
    assert infer_ldm.main([*argv, "--compare", "--tqdm_disable", "--out", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split()[:5] == ["DDIM", "2.200", "182%", "1.00x", out[1].split()[4]]
    assert out[2].split()[:8] == ["DDIM", "+", "FD", "uniform:3", "1.000", "0%", "2.20x", out[2].split()[7]]
    assert out[4] == ("median of 3 repeats taken in turn; they rank the runs, but the repeats of DDIM spread by 182% "
                      "of their median (more than 20%): its time is uncertain")
    assert infer_ldm.parse_args([]).repeats is None  # 3 with several rows, 1 with one (check_args)
    one = infer_ldm.parse_args([*SMALL, "--out", str(tmp_path / "one.png")])
    infer_ldm.check_args(one)
    assert one.repeats == 1


@pytest.mark.slow
def test_openmp_threads_wait_passively_unless_told():
    """infer_ldm.py sets OMP_WAIT_POLICY=PASSIVE before torch loads OpenMP (libgomp then spins 0 times before it
    sleeps), unless the user chose a wait policy."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")}
    for extra, spins in (({}, "'0'"), ({"OMP_WAIT_POLICY": "ACTIVE"}, "'")):
        result = subprocess.run([sys.executable, str(REPO / "infer_ldm.py"), "--help"], capture_output=True,
                                text=True, timeout=120, env={**env, **extra, "OMP_DISPLAY_ENV": "VERBOSE"})
        assert result.returncode == 0, result.stderr
        if "GOMP_SPINCOUNT" not in result.stderr:
            pytest.skip("torch's OpenMP is not GNU libgomp")
        assert f"GOMP_SPINCOUNT = {spins}" in result.stderr
        assert ("OMP_WAIT_POLICY = 'ACTIVE'" in result.stderr) == bool(extra)


UNET_CALLS = {"forward": 0, "encode": 0, "decode": 2, "decode_deep": 2, "forward_shallow": 2}  # the rows' argument


@pytest.mark.parametrize("mode", ["ddim", "ddim+fd:uniform:3", "dpmpp2m+deepcache:3", "plms"])
def test_rows_meet_their_call_shapes_before_they_are_timed(tiny_model, mode):
    args = infer_ldm.parse_args([*SMALL, *(["--cache", "none"] if "+" not in mode else []), "--n_per_class", "2"])
    args.steps = 10
    row_mode = infer_ldm.cli.make_mode(args, mode)
    model, seen = copy.deepcopy(tiny_model), set()
    for name, at in UNET_CALLS.items():  # record (method, rows) of every UNet call
        method = getattr(model.unet, name)
        setattr(model.unet, name, functools.partial(
            lambda method, name, at, *a, **k: seen.add((name, len(a[at]))) or method(*a, **k), method, name, at))
    x_T = infer_ldm.initial_noise(model, 2, 0)
    infer_ldm.warm_up_calls(model, row_mode, len(x_T), args)
    warmed, seen = seen, set()
    infer_ldm.sample_row(model, [25], x_T, row_mode, args, desc="test")
    assert seen and seen <= warmed


@pytest.mark.parametrize("cap", [None, 8])
def test_flops_per_image_are_those_of_the_rows_batch(tiny_model, cap):
    """A row samples --n_per_class images at a time: with a cap of 8 rows, decoder calls hold 4 steps at one image
    and 2 at two (guided, 4 rows a step), sharing fewer convolutions, so the FLOPs counted on one image are two's."""
    args = infer_ldm.parse_args([*SMALL, "--key_steps", "0,5", "--n_per_class", "2"]
                                + (["--max_decoder_batch", str(cap)] if cap else []))
    mode = infer_ldm.cli.make_mode(args)
    x_T = infer_ldm.initial_noise(tiny_model, 2, 0)
    _, intermediates = infer_ldm.sample_latents(tiny_model, torch.tensor([25, 25]), 10, 3.0, x_T=x_T, mode=mode,
                                                count_flops=True)
    assert infer_ldm.count_flops(tiny_model, x_T, mode, args) == intermediates["stats"].flops / 2
    assert (infer_ldm.count_flops(tiny_model, x_T[:1], mode, args) < intermediates["stats"].flops / 2) == bool(cap)


def test_render_grid_size():
    rows = [np.zeros((5, 64, 64, 3), np.uint8)] * 3
    picture = infer_ldm.render_grid(rows, [["a"], ["b", "c"], ["d"]])
    assert picture.size == (infer_ldm.LABEL_WIDTH + 5 * (64 + infer_ldm.PAD) + infer_ldm.PAD,
                            3 * (64 + infer_ldm.PAD) + infer_ldm.PAD)


def test_render_grid_enlarges_small_tiles_by_a_whole_factor():
    tiles = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    picture = np.asarray(infer_ldm.render_grid([tiles], [["a"]]))
    assert picture.shape == (96 + 2 * infer_ldm.PAD, infer_ldm.LABEL_WIDTH + 2 * (96 + infer_ldm.PAD) + infer_ldm.PAD, 3)
    left = infer_ldm.LABEL_WIDTH + infer_ldm.PAD
    first = picture[infer_ldm.PAD:infer_ldm.PAD + 96, left:left + 96]
    np.testing.assert_array_equal(first, tiles[0].repeat(3, axis=0).repeat(3, axis=1))


BAD_INPUTS = {
    # the tiny model's config: download_model.py fetches only cin256-v2's weights
    "missing checkpoint": (["--ckpt", "{tmp}/nowhere/model.ckpt"],
                           "checkpoint not found: {tmp}/nowhere/model.ckpt; give --ckpt the checkpoint that goes "
                           "with the config"),
    "missing config": (["--config", "{tmp}/none.yaml"], "config not found: {tmp}/none.yaml"),
    "unknown class": (["--classes", "25", "1000"], "unknown class 1000: this model has 1000 classes, 0..999"),
    "negative class": (["--classes", "-3"], "unknown class -3"),
    "class of a 10-class model": (["--config", "{ten}/config.yaml", "--ckpt", "{ten}/model.ckpt", "--classes", "10"],
                                  "unknown class 10: this model has 10 classes, 0..9"),
    "negative seed": (["--seed", "-1"], "--seed must be in 0..9223372036854775807, not -1"),
    "no repeats": (["--compare", "--repeats", "0"], "--repeats must be at least 1, not 0"),
    "mps device": (["--device", "mps"], "--device mps: only cpu and cuda devices are supported"),
    "checkpoint is a directory": (["--ckpt", "{tmp}"], "checkpoint {tmp} is a directory, not a file"),
    "not a config": (["--config", "{tmp}/file.txt"], "cannot load the model: "),
    "key steps not starting at 0": (["--key_steps", "2,5"], "key_steps must start with 0"),
    "unknown key-step preset": (["--key_steps", "fastest"], "unknown key_steps preset 'fastest'"),
    "key steps past the end": (["--key_steps", "0,5,12"], "go past the last loop index 9"),
    "unsupported extension": (["--out", "{tmp}/sub/picture.gif"], "unsupported picture type '.gif'"),
    "output folder under a file": (["--out", "{tmp}/file.txt/picture.png"], "cannot create a directory there"),
    "bad checkpoint": (["--ckpt", "{tmp}/file.txt"], "cannot load the model: "),
    "non-integer class": (["--classes", "cat"], "argument --classes: invalid int value: 'cat'"),
    "compared solver of a higher order than the steps": (
        ["--steps", "2", "--key_steps", "uniform:2", "--compare", "ddim", "dpmpp3m"],
        "mode 'dpmpp3m': --steps: DPM-Solver++ of order 3 needs at least 3 steps, not 2"),
    "compared solver off the uniform schedule": (
        ["--sampler", "dpmpp2m", "--steps", "7", "--compare", "plms"],
        "mode 'plms': --steps: 7 DDIM steps do not fit the uniform schedule"),
}


def bad_input_argv(case, folder, ten_class_folder):
    (folder / "file.txt").write_text("not a checkpoint")
    flags = [f.format(tmp=folder, ten=ten_class_folder) for f in BAD_INPUTS[case][0]]
    out = [] if "--out" in flags else ["--out", str(folder / "sub" / "picture.png")]
    return [*SMALL, *out, *flags]


def check_bad_input(case, folder, returncode, stderr):
    assert returncode == 2
    assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    assert BAD_INPUTS[case][1].format(tmp=folder) in stderr
    assert sorted(p.name for p in folder.iterdir()) == ["file.txt"], "nothing written"


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_message(case, tmp_path, capsys, ten_class_files):
    argv = bad_input_argv(case, tmp_path, ten_class_files[0].parent)
    try:
        returncode = infer_ldm.main(argv)
    except SystemExit as e:  # argparse
        returncode = e.code
    check_bad_input(case, tmp_path, returncode, capsys.readouterr().err)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing checkpoint", "bad checkpoint", "non-integer class"])
def test_bad_input_command_line(case, tmp_path, ten_class_files):
    """The same as a command: one line on stderr, no traceback, exit status 2."""
    argv = bad_input_argv(case, tmp_path, ten_class_files[0].parent)
    result = subprocess.run([sys.executable, "infer_ldm.py", *argv], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    check_bad_input(case, tmp_path, result.returncode, result.stderr)


# --- scripts/download_model.py ---------------------------------------------------------------------------

class _RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves one bytes object at every path, honouring `Range: bytes=N-`; records each start offset."""

    def __init__(self, payload, starts, *args, **kwargs):
        self.payload = payload
        self.starts = starts
        super().__init__(*args, **kwargs)

    def do_GET(self):
        start = 0
        if "Range" in self.headers:
            start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-"))
        self.starts.append(start)
        if start:
            if start >= len(self.payload):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(self.payload)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(self.payload) - 1}/{len(self.payload)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(self.payload) - start))
        self.end_headers()
        self.wfile.write(self.payload[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    payload, starts = b"PK\x03\x04" + np.random.default_rng(0).bytes(3 * download_model.CHUNK + 123), []  # zip-like
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_RangeHandler, payload, starts))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/model.ckpt", payload, starts
    httpd.shutdown()
    httpd.server_close()


def test_download_fresh(server, tmp_path):
    url, payload, starts = server
    out = tmp_path / "models" / "model.ckpt"
    assert download_model.main(["--url", url, "--out", str(out)]) == 0
    assert out.read_bytes() == payload and starts == [0]
    assert not out.with_name("model.ckpt.partial").exists()


@pytest.mark.parametrize("have", [1000, "all"])
def test_download_resumes_partial(server, tmp_path, have):
    url, payload, starts = server
    have = len(payload) if have == "all" else have
    out = tmp_path / "model.ckpt"
    out.with_name("model.ckpt.partial").write_bytes(payload[:have])
    assert download_model.download(url, str(out), progress=False) == len(payload)
    assert out.read_bytes() == payload and starts == [have]
    assert not out.with_name("model.ckpt.partial").exists()


@pytest.mark.slow
def test_download_offline_is_one_line(tmp_path):
    out = tmp_path / "model.ckpt"
    result = subprocess.run([sys.executable, "scripts/download_model.py", "--url", "http://127.0.0.1:9/model.ckpt",
                             "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert result.stderr.startswith("error: cannot download http://127.0.0.1:9/model.ckpt")
    assert result.stderr.count("\n") == 1
    assert not out.exists()
