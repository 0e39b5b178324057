"""--sampler/--cache and their options in scripts/image_sample.py and infer_ldm.py, on the tiny model: each
flag end to end against the library call with the same mode, the run records, and bad combinations."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_CKPT, TINY_CONFIG, load_script
from ldm import cli
from ldm.models.diffusion.modes import make_mode
from ldm.sampling import generate, sample_generators, sample_labels, to_uint8


pytestmark = pytest.mark.usefixtures("one_thread")
image_sample = load_script("scripts/image_sample.py")
infer_ldm = load_script("infer_ldm.py")

N, STEPS = 3, 10
FINAL, RECORD = f"samples_{N}x64x64x3.npz", f"samples_{N}x64x64x3.json"
MODEL = ["--config", str(TINY_CONFIG), "--ckpt", str(TINY_CKPT), "--device", "cpu", "--tqdm_disable"]

# flags -> the library mode they must sample with
MODES = {
    "plms deepcache": (["--sampler", "plms", "--cache", "deepcache", "--cache_interval", "3"],
                       make_mode("plms", "deepcache", interval=3)),
    "dpmpp2m fd": (["--sampler", "dpmpp2m", "--skip_type", "logSNR", "--lower_order_final", "false", "--cache", "fd",
                    "--key_steps", "0,2,3,7", "--context_layout", "reference", "--noise_injection", "false",
                    "--max_decoder_batch", "2"],
                   make_mode("dpmpp2m", "fd", skip_type="logSNR", lower_order_final=False, key_steps=[0, 2, 3, 7],
                             context_layout="reference", noise_injection=False, max_decoder_batch=2)),
    "ddim fd injection": (["--cache", "fd", "--key_steps", "0,5", "--injection_scale", "0.01",
                           "--injection_threshold", "50"],
                          make_mode("ddim", "fd", key_steps=[0, 5], injection_scale=0.01, injection_threshold=50.0)),
    "dpmpp3m deepcache full steps": (["--sampler", "dpmpp3m", "--cache", "deepcache", "--full_steps", "0,2,5",
                                      "--branch", "1"],
                                     make_mode("dpmpp3m", "deepcache", full_steps=[0, 2, 5], branch=1)),
    "ddim deepcache nonuniform": (["--cache", "deepcache", "--cache_interval", "4", "--nonuniform", "--pow", "2",
                                   "--eta", "0.5"],
                                  make_mode("ddim", "deepcache", eta=0.5, interval=4, nonuniform=True, pow=2.0)),
}


def sample(out, *flags):
    """image_sample.py in this process: N samples of STEPS steps into out; returns (exit status, images, labels)."""
    try:
        status = image_sample.run([*MODEL, "--num_samples", str(N), "--batch_size", "2", "--steps", str(STEPS),
                                   *(["--output_dir", str(out)] if out else []), *flags])
    except SystemExit as e:  # bad input found by the MPI-aware checks
        status = e.code
    if status or out is None:
        return status, None, None
    with np.load(out / FINAL) as npz:
        return status, npz["arr_0"], npz["arr_1"]


def assert_same_images(a, b):
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99


@pytest.mark.parametrize("case", list(MODES))
def test_image_sample_flags_sample_the_library_mode(case, tiny_model, tmp_path, capsys):
    flags, mode = MODES[case]
    status, images, labels = sample(tmp_path, *flags)
    assert status == 0, capsys.readouterr().err
    expected, _ = generate(tiny_model, sample_labels(0, range(N), 1000), STEPS, 1.5, mode=mode,
                           generators=sample_generators(0, range(N)))
    np.testing.assert_array_equal(labels, sample_labels(0, range(N), 1000).numpy())
    assert_same_images(images, to_uint8(expected).numpy())
    record = json.loads((tmp_path / RECORD).read_text())
    assert record.get("sampler", "ddim") == mode.sampler
    if mode.cache is not None and not hasattr(mode.cache, "key_steps"):
        assert record["deepcache"] == {"full_steps": list(mode.cache.full_steps_for(STEPS)),
                                       "branch": mode.cache.branch}
    if "--injection_scale" in flags:  # recorded where not the published 0.003 and 150
        assert (record["faster_diffusion"]["injection_scale"], record["faster_diffusion"]["injection_threshold"]) == (
            0.01, 50.0)
    capsys.readouterr()
    again, _, _ = sample(tmp_path, *flags)  # the same mode: nothing to do
    assert again == 0 and capsys.readouterr().out.startswith("already done")


def test_modes_have_their_own_folders_and_records(tmp_path, capsys, monkeypatch):
    """Default folders differ per mode; DDIM and FasterDiffusion records keep their old keys; a mode into a
    folder of another mode is refused naming the difference; the same full steps spelled two ways are one run."""
    monkeypatch.chdir(tmp_path)
    runs = {"ddim": [], "fd": ["--use_faster_diffusion", "True", "--key_steps", "uniform:3"],
            "plms": ["--sampler", "plms"], "dpmpp2m-deepcache": ["--sampler", "dpmpp2m", "--cache", "deepcache",
                                                                 "--cache_interval", "3"]}
    for name, flags in runs.items():
        assert sample(None, *flags, "--steps", "4")[0] == 0
    folders = sorted(p.name for p in (tmp_path / "outputs" / "samples").iterdir())
    assert sorted(f.split("_")[1].rstrip("0123456789") for f in folders) == sorted(runs)
    old_keys = {"config_sha256", "checkpoint_sha256", "image_shape", "num_samples", "seed", "steps", "eta", "scale",
                "precision", "faster_diffusion", "batch_size"}
    for folder in folders:  # (FasterDiffusion at the published injection: no injection keys)
        record = json.loads((tmp_path / "outputs" / "samples" / folder / RECORD).read_text())
        mode = folder.split("_")[1].rstrip("0123456789")
        assert set(record) == old_keys | {"samples_sha256"} | {"plms": {"sampler"}, "dpmpp2m-deepcache": {
            "sampler", "skip_type", "lower_order_final", "deepcache"}}.get(mode, set())  # and the .npz's checksum

    out = tmp_path / "one"
    assert sample(out, "--cache", "deepcache", "--cache_interval", "5")[0] == 0
    capsys.readouterr()
    assert sample(out, "--cache", "deepcache", "--full_steps", "0,5")[0] == 0
    assert capsys.readouterr().out.startswith("already done")
    assert sample(out, "--sampler", "plms", "--cache", "deepcache", "--cache_interval", "5")[0] == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {out / FINAL} was made with other settings (sampler: None -> plms); "
        "pass --overwrite to replace it, or choose another --output_dir"]
    assert sample(out)[0] == 2  # DDIM into the DeepCache run's folder: the record's extra key counts
    assert "(deepcache: {'full_steps': [0, 5], 'branch': 0} -> None)" in capsys.readouterr().err


# --- infer_ldm.py --compare with a list of modes ----------------------------------------------------------------

BARE_PICTURE = [*MODEL, "--classes", "25", "187", "--steps", str(STEPS), "--scale", "3"]
PICTURE = [*BARE_PICTURE, "--key_steps", "uniform:3", "--repeats", "1"]  # timing in rounds: test_infer_ldm.py


def tile_rows(path, count):
    with Image.open(path) as im:
        picture = np.asarray(im.convert("RGB"))
    row_height = (picture.shape[0] - infer_ldm.PAD) // count
    label_width = picture.shape[1] - 2 * (64 + infer_ldm.PAD) - infer_ldm.PAD
    return [picture[infer_ldm.PAD + r * row_height:][:64, label_width + infer_ldm.PAD:] for r in range(count)]


@pytest.mark.slow
def test_compare_takes_a_list_of_modes(tiny_model, tmp_path, capsys):
    out = tmp_path / "compare.png"
    names = ["ddim", "dpmpp2m+deepcache:3", "plms+fd:uniform:4"]
    assert infer_ldm.main([*PICTURE, "--compare", *names, "--context_layout", "reference", "--out", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["mode", "s/img", "spread", "speed-up", "GFLOP/img", "encoder", "passes", "decoder",
                                "rows", "shallow", "passes"]
    expected = [("DDIM", make_mode()), ("DPM-Solver++ 2M + DeepCache N=3", make_mode("dpmpp2m", "deepcache", interval=3)),
                ("PLMS + FD-ref uniform:4", make_mode("plms", "fd", key_steps="uniform:4", context_layout="reference")),
                ("DDIM + FD-ref uniform:3", make_mode("ddim", "fd", key_steps="uniform:3", context_layout="reference"))]
    rows = tile_rows(out, len(expected))
    x_T = infer_ldm.initial_noise(tiny_model, 1, 0)
    for line, row, (label, mode) in zip(table[1:], rows, expected):
        assert line.startswith(label + "  ")
        cells = line[len(label):].split()
        assert float(cells[3]) > 0  # GFLOP/img
        images, intermediates = generate(tiny_model, torch.tensor([25]), STEPS, 3.0, x_T=x_T, mode=mode)
        assert int(cells[4]) == intermediates["stats"].encoder_passes
        assert_same_images(row[:, :64], to_uint8(images)[0].numpy())
    assert table[1].split()[3] == "1.00x"


@pytest.mark.slow
def test_bare_compare_and_compare_reference_rows(tmp_path, capsys):
    """A bare --compare adds plain DDIM; --compare_reference adds it and the reference layout; repeats are dropped."""
    for flags, labels in ((["--compare"], ["DDIM", "DDIM + FD uniform:3"]),
                          (["--compare_reference"], ["DDIM", "DDIM + FD uniform:3", "DDIM + FD-ref uniform:3"]),
                          (["--compare", "ddim+fd:uniform:3", "--cache", "fd"], ["DDIM + FD uniform:3"])):
        assert infer_ldm.main([*PICTURE, "--classes", "1", "--steps", "4", *flags, "--out", str(tmp_path / "p.png")]) == 0
        table = capsys.readouterr().out.splitlines()
        assert [line.split("  ")[0] for line in table[1:1 + len(labels)]] == labels
        assert table[1 + len(labels)].startswith("(s/img: median")


def test_parser_records_the_flags_given():
    """args.given: what the command line set, under any alias, a value equal to the default included; appending
    and counting flags work as in plain argparse."""
    parser = cli.Parser()
    cli.add_sampling_args(parser)
    cli.add_mode_args(parser)
    parser.add_argument("--tag", action="append", default=[])
    parser.add_argument("-v", action="count", default=0)
    args = parser.parse_args(["--ddim_steps", "250", "--use_faster_diffusion", "--tag", "a", "--tag", "b", "-vv"])
    assert args.given == {"steps", "cache", "tag", "v"}
    assert (args.steps, args.cache, args.tag, args.v, args.key_steps) == (250, "fd", ["a", "b"], 2, "ldm250")
    assert parser.parse_args([]).given == frozenset() and parser.parse_args([]).tag == []


def test_cache_flags_serve_compare_rows(tmp_path, capsys):
    """A cache's or a solver's flags are accepted when a --compare row takes them, and that row uses them."""
    for flags, labels in ((["--cache", "none", "--compare", "ddim+fd", "--key_steps", "0,2"], ["DDIM + FD 0,2", "DDIM"]),
                          (["--compare", "plms+deepcache", "--cache_interval", "2", "--branch", "1"],
                           ["PLMS + DeepCache N=2 branch 1", "DDIM + FD uniform:3"])):
        assert infer_ldm.main([*PICTURE, "--classes", "1", "--steps", "4", *flags, "--out", str(tmp_path / "p.png")]) == 0
        table = capsys.readouterr().out.splitlines()
        assert [line.split("  ")[0] for line in table[1:1 + len(labels)]] == labels
        assert table[1 + len(labels)].startswith("(s/img: median")


# --- bad combinations: one line, exit status 2, before any model work -----------------------------------------

BAD = {
    "DeepCache flag without DeepCache": (["--cache_interval", "3"], "--cache_interval is a DeepCache option"),
    "DeepCache flag with fd": (["--cache", "fd", "--nonuniform"], "--nonuniform is a DeepCache option"),
    "fd flag without fd": (["--cache", "none", "--key_steps", "0,3"], "--key_steps is a FasterDiffusion option"),
    "fd flag at its default with DeepCache": (["--cache", "deepcache", "--cache_interval", "2", "--noise_injection"],
                                              "--noise_injection is a FasterDiffusion option"),
    "fd flag, fd off by the published flag": (["--faster_diffusion", "False", "--max_decoder_batch", "8"],
                                              "--max_decoder_batch is a FasterDiffusion option"),
    "injection flag without fd": (["--cache", "none", "--injection_scale", "0.001"],
                                  "--injection_scale is a FasterDiffusion option"),
    "negative injection scale": (["--cache", "fd", "--injection_scale", "-0.1"], "expected a number of at least 0"),
    "threshold not a number": (["--cache", "fd", "--injection_threshold", "nan"], "expected a number of at least 0"),
    "DPM flag with DDIM": (["--skip_type", "logSNR"], "--skip_type is a DPM-Solver++ option"),
    "lower_order_final with PLMS": (["--sampler", "plms", "--lower_order_final", "no"],
                                    "--lower_order_final is a DPM-Solver++ option"),
    "eta with PLMS": (["--sampler", "plms", "--eta", "0.5"], "--eta 0.5 needs --sampler ddim"),
    "DeepCache without steps": (["--cache", "deepcache"], "needs an interval"),
    "interval and full steps": (["--cache", "deepcache", "--cache_interval", "2", "--full_steps", "0,4"],
                                "an interval or full_steps, not both"),
    "full steps not from 0": (["--cache", "deepcache", "--full_steps", "1,4"], "must start with 0"),
    "full steps past the end": (["--cache", "deepcache", "--full_steps", "0,12"], "go past the last loop index 9"),
    "interval 0": (["--cache", "deepcache", "--cache_interval", "0"], "positive number of steps"),
    "branch too deep": (["--cache", "deepcache", "--cache_interval", "2", "--branch", "99"], "branch must be in 0.."),
    "too few steps for 3M": (["--sampler", "dpmpp3m", "--steps", "2"], "order 3 needs at least 3 steps"),
    "unknown sampler": (["--sampler", "heun"], "invalid choice: 'heun'"),
    "unknown skip type": (["--sampler", "dpmpp2m", "--skip_type", "cubic"], "invalid choice: 'cubic'"),
    "bad full steps": (["--cache", "deepcache", "--full_steps", "0,x"], "expected loop indices"),
    "more key steps than steps": (["--cache", "fd", "--key_steps", "auto:11"], "K must be in 1..10"),
    "missing calibration file": (["--cache", "fd", "--key_steps", "@{tmp}/none.json"], "cannot read calibration file"),
}


def run_bad(script, flags, tmp_path, capsys):
    try:
        if script is image_sample:
            status = image_sample.run([*MODEL, "--steps", str(STEPS), "--output_dir", str(tmp_path / "out"), *flags])
        else:
            status = infer_ldm.main([*BARE_PICTURE, "--out", str(tmp_path / "out" / "p.png"), *flags])
    except SystemExit as e:
        status = e.code
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert not os.listdir(tmp_path), "nothing written"
    return err


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.parametrize("script", ["image_sample", "infer_ldm"])
def test_bad_combinations(case, script, tmp_path, capsys, monkeypatch):
    flags, words = BAD[case]
    monkeypatch.setattr(cli, "load", None)  # any model work fails the test
    err = run_bad({"image_sample": image_sample, "infer_ldm": infer_ldm}[script],
                  [f.format(tmp=tmp_path) for f in flags], tmp_path, capsys)
    assert words in err


@pytest.mark.parametrize("flags, words", [
    (["--compare", "ddim", "bogus+fd"], "mode 'bogus+fd': unknown sampler 'bogus'"),
    (["--compare", "ddim+cache"], "unknown cache 'cache'"),
    (["--compare", "plms+deepcache"], "mode 'plms+deepcache': cache 'deepcache' needs an interval"),
    (["--compare_reference", "--cache", "none"], "--compare_reference adds a row with the published fork's context layout"),
])
def test_bad_compare_lists(flags, words, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "load", None)
    assert words in run_bad(infer_ldm, flags, tmp_path, capsys)


def test_mode_flag_builds_what_the_flags_build():
    """--mode MODE is the flags it names, given one by one; a flag given again with another value is refused."""
    from ldm import sampling_run
    for mode, flags in (("dpmpp2m+deepcache:3,branch=1,precision=bf16@20",
                         ["--sampler", "dpmpp2m", "--cache", "deepcache", "--cache_interval", "3", "--branch", "1",
                          "--precision", "bf16", "--steps", "20"]),
                        ("ddim+fd:0,5,10,noise_injection=false@50",
                         ["--cache", "fd", "--key_steps", "0,5,10", "--noise_injection", "false", "--steps", "50"])):
        by_mode, by_flags = sampling_run.parse_args(["--mode", mode]), sampling_run.parse_args(flags)
        cli.apply_mode_flag(by_mode)
        assert (by_mode.steps, by_mode.precision) == (by_flags.steps, by_flags.precision)
        assert cli.make_mode(by_mode) == cli.make_mode(by_flags)
    twice = sampling_run.parse_args(["--mode", "ddim@50", "--steps", "20"])
    with pytest.raises(cli.UsageError, match="--mode ddim@50 sets steps to 50, and --steps to 20: give it once"):
        cli.apply_mode_flag(twice)
