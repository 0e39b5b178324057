"""Key steps from the model: the change curve, the dynamic program, scripts/calibrate.py and the files and
`auto:K` specs that the samplers and front ends read."""
import hashlib
import itertools
import json

import numpy as np
import pytest
import torch

from conftest import TINY_CKPT, TINY_CONFIG, load_script
from ldm import sampling_run
from ldm import calibration
from ldm.calibration import CalibrationError, read_steps
from ldm.models.diffusion.deepcache import DeepCache
from ldm.models.diffusion.faster_diffusion import FasterDiffusion
from ldm.models.diffusion.modes import make_mode
from ldm.sampling import generate, sample_generators, sample_labels, sample_latents, to_uint8, unconditional_class


pytestmark = pytest.mark.usefixtures("one_thread")
calibrate = load_script("scripts/calibrate.py")
image_sample = load_script("scripts/image_sample.py")
MODEL = ["--config", str(TINY_CONFIG), "--ckpt", str(TINY_CKPT), "--device", "cpu"]


# --- the dynamic program --------------------------------------------------------------------------------------


def brute_force(change, k):
    """The best key steps by enumeration: least largest group change, then least total, then earliest."""
    best = None
    for rest in itertools.combinations(range(1, len(change)), k - 1):
        keys = [0, *rest]
        costs = calibration.group_costs(change, keys)
        score = (round(max(costs), 9), round(sum(costs), 9))
        if best is None or score < best[0]:
            best = (score, keys)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_choose_steps_is_optimal(seed):
    rng = np.random.default_rng(seed)
    steps = int(rng.integers(2, 11))
    change = np.concatenate([[0.0], rng.choice([0.5, 1.0, 2.0, 3.0], size=steps - 1) * rng.random() + 0.1])
    for k in range(1, steps + 1):
        keys = calibration.choose_steps(change, k)
        assert keys[0] == 0 and len(keys) == k and keys == sorted(set(keys))
        costs = calibration.group_costs(change, keys)
        (best_max, best_total), _ = brute_force(change, k)
        assert max(costs) == pytest.approx(best_max, abs=1e-9)
        assert sum(costs) == pytest.approx(best_total, abs=1e-9)


def test_choose_steps_follows_the_change():
    """A curve with one jump: a key step sits right after it; all steps chosen: every step a key."""
    change = [0, 1, 1, 1, 9, 1, 1, 1]
    assert calibration.choose_steps(change, 2) == [0, 4]
    assert calibration.choose_steps(change, 8) == list(range(8))
    assert calibration.choose_steps(change, 1) == [0]
    with pytest.raises(calibration.CalibrationError, match="K must be in 1..8"):
        calibration.choose_steps(change, 9)


# --- the change curve ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("feature", ["encoder", "deep"])
def test_feature_changes_match_a_direct_computation(tiny_model, feature):
    """change[i] is the relative change of the feature between the inputs of steps i - 1 and i of the plain run."""
    steps, scale = 5, 2.0
    change = calibration.feature_changes(tiny_model, make_mode(), steps, scale, feature, num_samples=2, seed=3)
    assert len(change) == steps and change[0] == 0 and all(c > 0 for c in change[1:])
    inputs = []
    labels = sample_labels(3, range(2), 1000)
    _, inter = sample_latents(tiny_model, labels, steps, scale, generators=sample_generators(3, range(2)),
                              step_callback=lambda i, t, x, x0: inputs.append((x, t)))
    x1, t1 = inputs[0][0], inputs[1][1]
    x0, t0 = inter["x_inter"][0], inputs[0][1]
    context = tiny_model.get_learned_conditioning({"class_label": labels})
    uncond = tiny_model.get_learned_conditioning({"class_label": torch.full_like(labels, unconditional_class(tiny_model))})
    unet = tiny_model.model.diffusion_model

    def feature_of(x, t):
        rows, ctx, ts = torch.cat([x, x]), torch.cat([uncond, context]), torch.full((4,), t)
        if feature == "encoder":
            skips, mid = unet.encode(rows, ts, ctx)
            return torch.cat([s.flatten(1) for s in skips] + [mid.flatten(1)], 1).double()
        return unet.forward_deep(rows, ts, ctx, branch=0)[1].flatten(1).double()

    with torch.inference_mode():
        a, b = feature_of(x0, t0), feature_of(x1, t1)
    expected = ((b - a).norm(dim=1) / a.norm(dim=1)).mean().item()
    assert change[1] == pytest.approx(expected, rel=1e-5)


# --- the search on the distance from the solver ----------------------------------------------------------------


def test_evenly_spaced_steps():
    assert calibration.evenly_spaced(50, 10) == list(range(0, 50, 5))
    assert calibration.evenly_spaced(10, 4) == [0, 2, 5, 7] and calibration.evenly_spaced(5, 5) == [0, 1, 2, 3, 4]
    with pytest.raises(calibration.CalibrationError, match="K must be in 1..5"):
        calibration.evenly_spaced(5, 6)


def test_search_walks_to_the_least_distance_and_keeps_step_zero():
    target = [0, 3, 9, 12, 19]
    calls = []

    def distance(keys):
        calls.append(tuple(keys))
        return sum((a - b) ** 2 for a, b in zip(keys, target))

    keys, best = calibration.search_steps(distance, [[0, 4, 8, 12, 16], [0, 1, 2, 3, 4]], 20, sweeps=10)
    assert keys == target and best == 0
    assert all(k[0] == 0 and list(k) == sorted(set(k)) and k[-1] < 20 for k in calls)


def test_search_returns_the_best_start_when_no_move_helps():
    starts = [[0, 5], [0, 3]]
    keys, best = calibration.search_steps(lambda keys: abs(keys[1] - 3) + (keys[1] == 4), starts, 6)
    assert keys == [0, 3] and best == 0


def test_distance_matches_a_direct_computation(tiny_model):
    steps, scale = 10, 1.5

    def cached(keys):
        return make_mode("ddim", "fd", key_steps=list(keys), noise_injection=False)

    distance = calibration.deviation_objective(tiny_model, make_mode(), cached, steps, scale, num_samples=2, seed=5)
    labels = sample_labels(5, range(2), 1000)
    plain, _ = sample_latents(tiny_model, labels, steps, scale, generators=sample_generators(5, range(2)))
    fd, _ = sample_latents(tiny_model, labels, steps, scale, generators=sample_generators(5, range(2)),
                           mode=cached([0, 4, 8]))
    plain, fd = plain.flatten(1).double(), fd.flatten(1).double()
    expected = ((fd - plain).norm(dim=1) / plain.norm(dim=1)).mean().item()
    assert distance([0, 4, 8]) == pytest.approx(expected, rel=1e-6) and expected > 1e-3
    assert distance(range(steps)) < 1e-5  # a key step everywhere is the solver itself


# --- scripts/calibrate.py and what reads its files ---------------------------------------------------------------


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """calibrate.py's files for FasterDiffusion and DeepCache at S = 10, K = 4."""
    folder = tmp_path_factory.mktemp("calibration")
    files = {}
    for cache in ("fd", "deepcache"):
        out = folder / f"{cache}.json"
        assert calibrate.main([*MODEL, "--steps", "10", "-K", "4", "--cache", cache, "--num_samples", "2",
                               "--search_samples", "2", "--out", str(out)]) == 0
        files[cache] = out
    return files


@pytest.mark.slow
def test_calibrate_writes_the_steps_the_curve_and_a_plot(calibrated, capsys):
    record = json.loads(calibrated["fd"].read_text())
    assert (record["S"], record["K"], record["guidance"], record["feature"]) == (10, 4, 1.5, "encoder")
    assert record["change_steps"] == calibration.choose_steps(record["change"], 4)
    assert record["uniform_steps"] == [0, 2, 5, 7] and len(record["steps"]) == 4 and record["steps"][0] == 0
    distance = record["distance"]
    assert distance["steps"] <= min(distance["uniform_steps"], distance["change_steps"])
    assert record["model"]["checkpoint_sha256"] == hashlib.sha256(TINY_CKPT.read_bytes()).hexdigest()
    assert len(record["change"]) == 10 and len(record["group_change"]) == 4
    assert json.loads(calibrated["deepcache"].read_text())["feature"] == "deep"
    png = calibrated["fd"].with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_calibration_files_are_read_by_the_caches(calibrated):
    fd_steps = json.loads(calibrated["fd"].read_text())["steps"]
    deep_steps = json.loads(calibrated["deepcache"].read_text())["steps"]
    assert FasterDiffusion(f"@{calibrated['fd']}").key_steps_for(10) == tuple(fd_steps)
    assert DeepCache(full_steps=f"@{calibrated['deepcache']}").full_steps_for(10) == tuple(deep_steps)
    with pytest.raises(ValueError, match="was made for S = 10 steps, not 20"):
        FasterDiffusion(f"@{calibrated['fd']}").key_steps_for(20)
    with pytest.raises(ValueError, match="holds steps for the deep feature"):
        FasterDiffusion(f"@{calibrated['deepcache']}").key_steps_for(10)
    for pending in (FasterDiffusion("auto:4"), DeepCache(full_steps="auto:4")):  # to calibrate once loaded
        assert pending.calibrating() == "auto:4"
        pending.check(10)  # K fits S
        with pytest.raises(ValueError, match="cannot choose 4 of 3 steps"):
            pending.check(3)
        with pytest.raises(ValueError, match="calibrated on the model"):
            pending.steps_for(10)
        assert pending.with_steps([0, 3, 6, 8]).steps_for(10) == (0, 3, 6, 8)


@pytest.fixture(scope="module")
def auto3(tiny_model):
    """The steps of --key_steps auto:3 at S = 10, guidance 1.5, calibrated by the library."""
    return calibration.auto_steps(tiny_model, "auto:3", make_mode(),
                                  lambda steps: make_mode("ddim", "fd", key_steps=list(steps)), 10, 1.5, "encoder")


@pytest.mark.slow
def test_image_sample_reads_files_and_calibrates_auto(calibrated, tiny_model, auto3, tmp_path, capsys):
    """--key_steps @FILE and auto:K sample as the library does with those steps; --full_steps @FILE likewise."""
    labels = sample_labels(0, range(2), 1000)
    common = [*MODEL, "--steps", "10", "--num_samples", "2", "--tqdm_disable"]
    auto = auto3
    cases = [(["--cache", "fd", "--key_steps", f"@{calibrated['fd']}"],
              make_mode("ddim", "fd", key_steps=json.loads(calibrated["fd"].read_text())["steps"])),
             (["--cache", "deepcache", "--full_steps", f"@{calibrated['deepcache']}"],
              make_mode("ddim", "deepcache", full_steps=json.loads(calibrated["deepcache"].read_text())["steps"])),
             (["--cache", "fd", "--key_steps", "auto:3"], make_mode("ddim", "fd", key_steps=auto))]
    for k, (flags, mode) in enumerate(cases):
        out = tmp_path / str(k)
        assert image_sample.run([*common, "--output_dir", str(out), *flags]) == 0
        with np.load(out / "samples_2x64x64x3.npz") as npz:
            images = npz["arr_0"]
        expected, _ = generate(tiny_model, labels, 10, 1.5, mode=mode, generators=sample_generators(0, range(2)))
        diff = np.abs(images.astype(int) - to_uint8(expected).numpy().astype(int))
        assert diff.max() <= 1 and (diff == 0).mean() > 0.99
    record = json.loads((tmp_path / "2" / "samples_2x64x64x3.json").read_text())
    assert record["faster_diffusion"]["key_steps"] == "auto:3" and record["calibrated_steps"] == auto


@pytest.mark.slow
def test_a_run_resolves_its_steps_once(calibrated, tmp_path, monkeypatch):
    """A step file is read once per run (with its checks against S, the feature and the checkpoint) and 'auto:K'
    calibrated once; the record keeps the loop indices."""
    read, calibrated_runs = [], []
    monkeypatch.setattr(sampling_run.cli, "read_steps", lambda *a, **k: read.append(a) or calibration.read_steps(*a, **k))
    monkeypatch.setattr(sampling_run.cli, "auto_steps",
                        lambda *a, **k: calibrated_runs.append(a) or calibration.auto_steps(*a, **k))
    common = [*MODEL, "--steps", "10", "--num_samples", "2", "--tqdm_disable"]
    assert image_sample.run([*common, "--output_dir", str(tmp_path / "file"), "--cache", "fd",
                             "--key_steps", f"@{calibrated['fd']}"]) == 0
    assert len(read) == 1 and not calibrated_runs
    record = json.loads((tmp_path / "file" / "samples_2x64x64x3.json").read_text())
    assert record["faster_diffusion"]["key_steps"] == json.loads(calibrated["fd"].read_text())["steps"]
    assert image_sample.run([*common, "--output_dir", str(tmp_path / "auto"), "--cache", "deepcache",
                             "--full_steps", "auto:3"]) == 0
    assert len(read) == 1 and len(calibrated_runs) == 1
    record = json.loads((tmp_path / "auto" / "samples_2x64x64x3.json").read_text())
    assert record["deepcache"]["full_steps"] == "auto:3" and len(record["calibrated_steps"]) == 3


@pytest.mark.slow
def test_resumed_auto_run_reuses_the_recorded_steps(auto3, tmp_path, monkeypatch):
    """auto:K is calibrated once per run: the shards' record keeps the steps, and --resume samples with them
    (calibrating again could give other steps on other hardware, mixing two step sets in one .npz)."""
    flags = [*MODEL, "--steps", "10", "--num_samples", "2", "--batch_size", "1", "--tqdm_disable",
             "--cache", "fd", "--key_steps", "auto:3", "--output_dir", str(tmp_path)]
    with pytest.raises(SystemExit) as stopped:
        image_sample.run([*flags, "--stop_after_batches", "1"])
    assert stopped.value.code == sampling_run.STOPPED_EXIT_CODE
    shards = json.loads((tmp_path / "shards_2x64x64x3" / "settings.json").read_text())
    assert shards["calibrated_steps"] == auto3 and shards["faster_diffusion"]["key_steps"] == "auto:3"
    shards["calibrated_steps"] = [0, 4, 8]  # other steps than calibration gives: the resumed run must take them
    (tmp_path / "shards_2x64x64x3" / "settings.json").write_text(json.dumps(shards))

    def no_calibration(*args, **kwargs):
        raise AssertionError("auto:K calibrated again on --resume")

    monkeypatch.setattr(sampling_run.cli, "auto_steps", no_calibration)
    assert image_sample.run([*flags, "--resume"]) == 0
    record = json.loads((tmp_path / "samples_2x64x64x3.json").read_text())
    assert record["calibrated_steps"] == [0, 4, 8] and record["faster_diffusion"]["key_steps"] == "auto:3"
    assert image_sample.run(flags) == 0  # finished: the same settings, nothing to calibrate


BAD = {
    "K larger than S": (["--steps", "10", "-K", "11"], "K must be in 1..10"),
    "K of 0": (["--steps", "10", "-K", "0"], "K must be in 1..10"),
    "bad step count": (["--steps", "300", "-K", "3"], "--steps: 300"),
    "not a json name": (["-K", "3", "--out", "{tmp}/x.txt"], "--out {tmp}/x.txt: the file name must end in .json"),
    "branch too deep": (["-K", "3", "--cache", "deepcache", "--branch", "99"], "--branch: DeepCache branch must be"),
    "branch without DeepCache": (["-K", "3", "--branch", "1"], "--branch is a DeepCache option: add --cache deepcache"),
    "a mode without a calibrated cache": (["-K", "3", "--mode", "ddim@10"], "cache 'none' takes no calibrated steps"),
    "a mode of another cache's option": (["-K", "3", "--mode", "ddim+fd,branch=1@10"], "branch is an option of 'deepcache'"),
    "a mode's branch too deep": (["-K", "3", "--mode", "ddim+deepcache,branch=99@10"], "--branch: DeepCache branch must be"),
}


def test_calibrate_mode_names_what_the_flags_name():
    by_mode = calibrate.parse_args([*MODEL, "-K", "3", "--mode", "dpmpp2m+deepcache,branch=1,precision=bf16@20"])
    calibrate.cli.apply_mode_flag(by_mode)
    by_flags = calibrate.parse_args([*MODEL, "-K", "3", "--sampler", "dpmpp2m", "--cache", "deepcache", "--branch", "1",
                                     "--precision", "bf16", "--steps", "20"])
    assert {k: v for k, v in vars(by_mode).items() if k not in ("mode", "given")} == \
        {k: v for k, v in vars(by_flags).items() if k not in ("mode", "given")}


@pytest.mark.parametrize("case", list(BAD))
def test_calibrate_bad_input(case, tmp_path, capsys):
    flags, words = BAD[case]
    flags = [f.format(tmp=tmp_path) for f in flags]
    out = [] if "--out" in flags else ["--out", str(tmp_path / "out" / "c.json")]
    try:
        status = calibrate.main([*MODEL, *out, *flags])
    except SystemExit as e:
        status = e.code
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and words.format(tmp=tmp_path) in err, err
    assert not list(tmp_path.iterdir())


def test_calibrate_out_that_is_a_directory_is_refused(tmp_path, capsys):
    (tmp_path / "c.json").mkdir()
    assert calibrate.main([*MODEL, "-K", "3", "--out", str(tmp_path / "c.json")]) == 2
    assert capsys.readouterr().err == f"error: --out {tmp_path / 'c.json'} is a directory: give a file name\n"
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"] and not list((tmp_path / "c.json").iterdir())


@pytest.mark.parametrize("case", ["other S", "other model", "other feature"])
def test_calibration_file_mismatch_is_refused(case, calibrated, ten_class_files, tmp_path, capsys):
    """A file made for another S, model or feature: one line, exit status 2, nothing written."""
    flags = {"other S": ["--steps", "20", "--cache", "fd", "--key_steps", f"@{calibrated['fd']}"],
             "other model": ["--steps", "10", "--config", str(ten_class_files[0]), "--ckpt", str(ten_class_files[1]),
                             "--cache", "fd", "--key_steps", f"@{calibrated['fd']}"],
             "other feature": ["--steps", "10", "--cache", "deepcache", "--full_steps", f"@{calibrated['fd']}"]}[case]
    words = {"other S": "was made for S = 10 steps, not 20", "other model": "was made for another model",
             "other feature": "holds steps for the encoder feature"}[case]
    try:
        status = image_sample.run([*MODEL, "--output_dir", str(tmp_path / "out"), *flags])
    except SystemExit as e:
        status = e.code
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and words in err, err
    assert not list(tmp_path.iterdir())


GOOD_RECORD = {"S": 10, "steps": [0, 4, 7], "feature": "encoder", "model": {"checkpoint_sha256": "ab"}}


@pytest.mark.parametrize("change, message", [
    ({"S": "10"}, "(S must be a number of steps and model a record, not '10' and dict)"),
    ({"S": None}, "not None and dict"),
    ({"model": []}, "not 10 and list"),
    ({"S": 20}, "was made for S = 20 steps, not 10"),
    ({"feature": "deep"}, "holds steps for the deep feature, not the encoder feature"),
    ({"steps": [0, 4, 4]}, "steps must rise from 0 to at most 9, not [0, 4, 4]"),
    ({"steps": [0, 10]}, "steps must rise from 0 to at most 9"),
    ({"steps": "0,4"}, "steps must be a list of loop indices"),
    ({"model": {"checkpoint_sha256": "cd"}}, "was made for another model"),
])
def test_bad_calibration_files_are_one_line_errors(tmp_path, change, message):
    path = tmp_path / "cal.json"
    path.write_text(json.dumps({**GOOD_RECORD, **change}))
    with pytest.raises(CalibrationError) as caught:
        read_steps(str(path), 10, "encoder", "ab")
    assert message in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("missing", ["S", "steps", "feature", "model"])
def test_calibration_file_without_a_key_names_it(tmp_path, missing):
    path = tmp_path / "cal.json"
    path.write_text(json.dumps({k: v for k, v in GOOD_RECORD.items() if k != missing}))
    with pytest.raises(CalibrationError, match=f"is not a calibration file of scripts/calibrate.py \\(no '{missing}'\\)"):
        read_steps(str(path), 10, "encoder")
    path.write_text(json.dumps(GOOD_RECORD))
    assert read_steps(str(path), 10, "encoder", "ab") == [0, 4, 7]
