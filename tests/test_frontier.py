"""scripts/frontier.py in small: the 10-class tiny model, a few samples, a fake feature graph whose logits are
the model's 10 classes; the table, JSON and plot agree; the modes are timed in rounds that take them in turn;
finished modes are not redone; an interrupted run says how to continue; bad input."""
import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, load_script
from ldm import sampling_run
from test_timing import ScriptedClock
from ldm.models.diffusion.modes import make_mode
from ldm.sampling import sample_latents
from ldm.util import load_model



pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # slow: sampling runs scored end to end
frontier = load_script("scripts/frontier.py")
MODES = ["ddim@2", "ddim+fd:uniform:2@4", "ddim+fd:auto:2@4", "dpmpp2m+deepcache:2@4"]


def build_graph(path, classes):
    """A small feature graph with the evaluator's tensor names: from 12 pixel values (2x2 places, 3 channels)
    7 'spatial' features (mixed_6/conv, 1x1 spatially), 4 pooled ones (pool_3) and `classes` logits, so that
    a dozen images give covariances of full rank."""
    tf = pytest.importorskip("tensorflow").compat.v1
    rng = np.random.default_rng(0)
    graph = tf.Graph()
    with graph.as_default():
        images = tf.placeholder(tf.float32, [None, None, None, 3], name="input")
        expanded = tf.identity(images, name="ExpandDims")
        pixels = tf.reshape(tf.image.resize(expanded, [2, 2], method="nearest"), [-1, 12]) / 255.0
        hidden = tf.tanh(tf.matmul(pixels, rng.normal(size=(12, 11)).astype(np.float32)))
        tf.reshape(hidden[:, :7], [-1, 1, 1, 7], name="mixed_6/conv")
        pool = tf.reshape(hidden[:, 7:], [-1, 1, 1, 4], name="pool_3")
        tf.matmul(tf.reshape(pool, [-1, 4]), rng.normal(size=(4, classes)).astype(np.float32),
                  name="softmax/logits/MatMul")
    path.write_bytes(graph.as_graph_def().SerializeToString())
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, ten_class_files):
    """Model, reference and held-out batches of random 64x64 images, and a feature graph with 10 logits."""
    folder = tmp_path_factory.mktemp("inputs")
    graph = build_graph(folder / "graph.pb", 10)
    rng = np.random.default_rng(0)
    for name, size in (("ref", 64), ("real", 64), ("small", 32)):
        np.savez(folder / f"{name}.npz", rng.integers(0, 256, (12, size, size, 3), dtype=np.uint8),
                 rng.integers(0, 10, 12))
    config, ckpt = ten_class_files
    return {"config": config, "ckpt": ckpt, "graph": graph, "folder": folder}


def argv(inputs, out, *extra, modes=MODES):
    return ["--config", str(inputs["config"]), "--ckpt", str(inputs["ckpt"]), "--ref", str(inputs["folder"] / "ref.npz"),
            "--inception_path", str(inputs["graph"]), "--num_samples", "12", "--batch_size", "6", "--device", "cpu",
            "--out", str(out), "--modes", *modes, *extra]


def run(args):
    try:
        return frontier.run(args)
    except SystemExit as e:
        return e.code


@pytest.fixture(scope="module")
def finished(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("frontier")
    assert run(argv(inputs, out, "--real", str(inputs["folder"] / "real.npz"), "--guidance", "1.5", "3")) == 0
    return out


def table_rows(markdown):
    """The cells of the main table's rows (after its header)."""
    lines = markdown.split("\n\n")[2].splitlines()[2:]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_table_json_and_plot_agree(finished):
    data = json.loads((finished / "frontier.json").read_text())
    rows = data["rows"]
    assert [(r["spec"], r["guidance"]) for r in rows] == [(m, g) for m in MODES for g in (1.5, 3.0)]
    assert data["classifier_accuracy"] is True  # the graph's 10 logits are the model's 10 classes
    table = table_rows((finished / "frontier.md").read_text())
    assert table[0][1] == "real (held-out)" and table[0][7] == f"{data['real']['fid']:.4g}"
    assert table[1][1] == "first stage (held-out, reconstructed)"
    assert table[1][7:14] == [f"{data['reconstructed'][k]:.4g}" for k in
                              ("fid", "fid_recon", "sfid", "inception_score", "precision", "recall", "accuracy")]
    for cells, r in zip(table[2:], rows, strict=True):
        assert cells[1] == f"`{r['spec']}`" and cells[0] == f"{r['guidance']:g}" and cells[2] == str(r["S"])
        assert cells[3] == f"{r['s_per_img']:.4g}" and cells[5] == f"{r['gflops_per_img']:.4g}"
        assert cells[6] == str(r["encoder_passes"])
        assert cells[7:13] == [f"{r[k]:.4g}" for k in ("fid", "fid_recon", "sfid", "inception_score", "precision",
                                                         "recall")]
        assert cells[13] == f"{r['accuracy']:.4g}" and 0 <= r["accuracy"] <= 1
        assert r["fidelity"]["base"] == "ddim@2" == data["settings"]["base"]  # the only plain mode
        if r["spec"] == "ddim@2":
            assert cells[14:17] == ["base"] * 3
        else:
            psnr = r["fidelity"]["psnr"]
            assert cells[14] == f"{psnr['mean']:.4g} ({psnr['interval'][0]:.4g}-{psnr['interval'][1]:.4g})"
        assert ("time" in cells[17]) == r["front_time"] and ("FLOPs" in cells[17]) == r["front_flops"]
    for key, front in (("s_per_img", "front_time"), ("gflops_per_img", "front_flops")):
        for g in (1.5, 3.0):  # each guidance has its own front
            same = [r for r in rows if r["guidance"] == g]
            on = [r for r in same if r[front]]
            assert on and all(not any(o[key] < r[key] and o["fid"] < r["fid"] for o in same) for r in on)
            assert all(any(o[key] <= r[key] and o["fid"] <= r["fid"] and o is not r for o in same)
                       for r in same if not r[front])
    ddim = {r["guidance"]: r for r in rows if r["spec"] == "ddim@2"}
    for cells, r in zip(table[2:], rows):
        assert cells[4] == f"{ddim[r['guidance']]['s_per_img'] / r['s_per_img']:.2f}x"
    timing = data["timing"]
    assert timing["repeats"] == 3 and data["settings"]["timing_batch"] == 6  # --batch_size 6 < TIMING_BATCH
    for r in rows:  # s/img: the median of the rounds; the sampling run's own time kept beside it
        assert len(r["s_per_img_rounds"]) == 3 and r["s_per_img"] == sorted(r["s_per_img_rounds"])[1]
        assert r["run_s_per_img"] > 0 and r["s_per_img_spread"] >= 0
    assert f"Times: median of 3 rounds that took the modes in turn, a sampling call of 6 images each; " \
           f"{timing['verdict']}." in (finished / "frontier.md").read_text()
    assert "| 1.5 | 4 | 2 | `ddim+fd:uniform:2@4` |" in (finished / "frontier.md").read_text()  # equal K
    with Image.open(finished / "frontier.png") as im:
        assert im.format == "PNG" and im.size[0] > im.size[1] > 300


def test_the_reconstructed_row_is_the_real_images_through_the_first_stage(finished, inputs):
    result = json.loads((finished / "reconstructed" / "n12" / "result.json").read_text())
    model = load_model(str(inputs["config"]), str(inputs["ckpt"]))
    with np.load(inputs["folder"] / "real.npz") as real, np.load(result["samples"]) as made:
        x = torch.from_numpy(real["arr_0"][:12]).permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.no_grad():  # VQModelInterface.decode quantizes the encoder's output
            images = model.first_stage_model.decode(model.first_stage_model.encode(x))
        expected = ((images + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        np.testing.assert_array_equal(made["arr_0"], expected)
        np.testing.assert_array_equal(made["arr_1"], real["arr_1"][:12])
    assert result["images"] == 12 and result["fid"] > 0


def test_fid_recon_is_against_the_reference_through_the_first_stage(finished, inputs):
    """The reconstructed reference is --ref through the model's first stage; each row's fid_recon is the FID of its
    samples against it, computed here with the evaluator directly."""
    evaluator, model = frontier.evaluator, load_model(str(inputs["config"]), str(inputs["ckpt"]))
    reconstructed = finished / "reference" / "reconstructed.npz"
    with np.load(inputs["folder"] / "ref.npz") as ref, np.load(reconstructed) as made:
        np.testing.assert_array_equal(made["arr_0"], frontier.reconstruct(model, torch.from_numpy(ref["arr_0"])).numpy())
    network = evaluator.InceptionNetwork(str(inputs["graph"]))
    try:
        against = evaluator.FIDStatistics.from_activations(network.read_activations(str(reconstructed))[0])
        for r in json.loads((finished / "frontier.json").read_text())["rows"]:
            ours = evaluator.FIDStatistics.from_activations(network.read_activations(r["samples"])[0])
            assert r["fid_recon"] == pytest.approx(ours.frechet_distance(against), rel=1e-6)
    finally:
        network.close()


def test_fidelity_is_that_of_fidelity_py_against_the_base(finished, inputs, tmp_path):
    rows = json.loads((finished / "frontier.json").read_text())["rows"]
    fidelity = load_script("evaluations/fidelity.py")
    for r in rows:
        base = next(o for o in rows if o["spec"] == "ddim@2" and o["guidance"] == r["guidance"])
        report = tmp_path / "report.json"
        assert fidelity.main([base["samples"], r["samples"], "--inception_path", str(inputs["graph"]),
                              "--json", str(report)]) == 0
        expected = json.loads(report.read_text())["samples_vs_base"]
        for key in ("ssim", "feature_distance", "same_class"):
            assert r["fidelity"][key]["mean"] == pytest.approx(expected[key]["mean"], rel=1e-9)
            assert r["fidelity"][key]["interval"] == pytest.approx(expected[key]["interval"], rel=1e-9)


def test_samples_are_image_sample_runs_with_the_same_seeds(finished):
    rows = json.loads((finished / "frontier.json").read_text())["rows"]
    labels = []
    for r in rows:
        with np.load(r["samples"]) as npz:
            assert npz["arr_0"].shape == (12, 64, 64, 3)
            labels.append(npz["arr_1"])
        record = json.loads(Path(r["samples"]).with_suffix(".json").read_text())
        assert record["scale"] == r["guidance"] and record["steps"] == r["S"]
    assert all(np.array_equal(labels[0], other) for other in labels)


def test_finished_modes_are_not_redone(finished, inputs, capsys):
    """Nor are their timing rounds, while the modes and settings are the same."""
    results = sorted(finished.glob("samples/*/*/result.json")) + sorted(finished.glob("*/n12/result.json"))
    assert len(results) == len(MODES) * 2 + 2
    results.append(finished / "timing.json")
    before = {p: p.stat().st_mtime_ns for p in results}
    table = (finished / "frontier.md").read_text()
    capsys.readouterr()
    assert run(argv(inputs, finished, "--real", str(inputs["folder"] / "real.npz"), "--guidance", "1.5", "3")) == 0
    assert "made " not in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in results} == before
    assert (finished / "frontier.md").read_text() == table


def test_the_real_row_follows_the_real_batch(finished, inputs, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(finished, out)
    other = tmp_path / "other_real.npz"
    images = np.random.default_rng(1).integers(0, 256, (20, 64, 64, 3), dtype=np.uint8)
    np.savez(other, images, np.arange(20) % 10)
    assert run(argv(inputs, out, "--real", str(other), "--guidance", "1.5", "3")) == 0
    before, after = (json.loads((f / "frontier.json").read_text()) for f in (finished, out))
    assert after["real"]["samples"] == str(other) and after["real"]["images"] == 12
    assert after["real"]["fid"] != before["real"]["fid"]
    assert after["reconstructed"]["fid"] != before["reconstructed"]["fid"]
    with np.load(out / "real" / "n12" / "real.npz") as cut:  # scored on as many images as each mode
        np.testing.assert_array_equal(cut["arr_0"], images[:12])
        np.testing.assert_array_equal(cut["arr_1"], np.arange(12) % 10)
    cut = out / "real" / "n12" / "real.npz"
    written = cut.stat().st_mtime_ns
    assert run(argv(inputs, out, "--real", str(other), "--guidance", "1.5", "3")) == 0
    assert cut.stat().st_mtime_ns == written  # both floor rows are current: the batch is not cut again
    assert [r["fid"] for r in json.loads((out / "frontier.json").read_text())["rows"]] == \
        [r["fid"] for r in json.loads((finished / "frontier.json").read_text())["rows"]]  # modes not redone


def test_each_row_records_the_precision_it_computed_in(finished, inputs, tmp_path, monkeypatch):
    """A mode's precision=... overrides --precision; the rows, the table's header and the plot (half precision
    hollow) say which was used. The model is loaded once in each precision, for sampling, counting and timing."""
    out = tmp_path / "copy"
    shutil.copytree(finished, out)  # ddim@2 is finished there, in fp32
    figures, loads = [], []
    monkeypatch.setattr(frontier.plt, "close", figures.append)
    load = frontier.cli.load
    monkeypatch.setattr(frontier.cli, "load", lambda args, device: loads.append(args.precision) or load(args, device))
    assert run(argv(inputs, out, "--guidance", "1.5", modes=["ddim@2", "ddim,precision=bf16@2"])) == 0
    assert loads == ["fp32", "bf16"]
    rows = json.loads((out / "frontier.json").read_text())["rows"]
    assert [(r["spec"], r["dtype"]) for r in rows] == [("ddim@2", "fp32"), ("ddim,precision=bf16@2", "bf16")]
    assert json.loads((out / "frontier.json").read_text())["settings"]["precision"] == "fp32"
    assert "Modes compute in fp32 unless they say `precision=...`" in (out / "frontier.md").read_text()
    ax = figures[0].axes[0]
    fp32, bf16 = (collection.get_facecolors()[0] for collection in ax.collections[:2])
    assert fp32[:3].tolist() == list(frontier.plt.cm.tab10.colors[0]) and bf16.tolist() == [1, 1, 1, 1]
    assert [t.get_text() for t in ax.get_legend().get_texts()][-2:] == ["fp32 (filled)", "bf16 (hollow)"]
    with np.load(rows[0]["samples"]) as a, np.load(rows[1]["samples"]) as b:  # same labels, other rounding
        np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
        assert not np.array_equal(a["arr_0"], b["arr_0"])


def test_an_interrupted_mode_resumes(inputs, tmp_path, capsys):
    """A mode stopped after its first batch is finished from its shards; its time is that of the images made."""
    flags = argv(inputs, tmp_path / "out", modes=["ddim@2"])
    (job,), _ = frontier.check(frontier.parse_args(flags))
    job.args.stop_after_batches = 1
    with pytest.raises(SystemExit):
        frontier.sampling_run.sample(job.args, frontier.Comm())
    capsys.readouterr()
    assert run(flags) == 0
    assert "made 6 of 12 images" in capsys.readouterr().out
    assert json.loads(job.result.read_text())["timed_images"] == 6


def test_an_interrupted_run_says_to_rerun_the_same_command(inputs, tmp_path, monkeypatch, capsys):
    """frontier.py has no --resume: the sampling run's advice to rerun with it becomes frontier's own."""
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(sampling_run, "sample_batch", interrupted)
    assert run(argv(inputs, tmp_path / "out", modes=["ddim@2"])) == 130
    err = capsys.readouterr().err
    assert "rerun the same frontier.py command to continue" in err and "--resume" not in err


def test_modes_are_timed_in_turn_and_ranked_by_their_medians(inputs, tmp_path, monkeypatch, capsys):
    """Rounds take the modes in turn (A B A B ...): ddim@2's calls take 1, 3 and 2 s, ddim@4's 2 s each, so s/img
    is 2/6 for both, and their repeats overlap: they cannot be ranked; a rerun keeps the rounds."""
    monkeypatch.setattr(frontier, "device_clock", lambda device: ScriptedClock([1, 2, 3, 2, 2, 2]))
    flags = argv(inputs, tmp_path / "out", "--guidance", "1.5", modes=["ddim@2", "ddim@4"])
    assert run(flags) == 0
    out = capsys.readouterr().out
    data = json.loads((tmp_path / "out" / "frontier.json").read_text())
    assert [r["s_per_img_rounds"] for r in data["rows"]] == [[1 / 6, 3 / 6, 2 / 6], [2 / 6] * 3]
    assert [r["s_per_img"] for r in data["rows"]] == [2 / 6, 2 / 6]
    assert data["timing"]["rankable"] is False and data["timing"]["unranked"] == [["ddim@2 g1.5", "ddim@4 g1.5"]]
    assert data["timing"]["verdict"] == (
        "cannot rank them all (median of 3 repeats taken in turn): the repeats of ddim@2 g1.5 and ddim@4 g1.5 overlap, "
        "so their order is within the noise; the repeats of ddim@2 g1.5 spread by 100% of their median (more than "
        "20%): its time is uncertain; rerun with the machine to itself")
    assert f"times: median of 3 rounds that took the modes in turn, a sampling call of 6 images each; " \
           f"{data['timing']['verdict']}" in out
    monkeypatch.setattr(frontier, "device_clock", lambda device: pytest.fail("timed again"))
    assert run(flags) == 0
    assert json.loads((tmp_path / "out" / "frontier.json").read_text())["rows"] == data["rows"]


def test_openmp_threads_wait_passively():
    """frontier.py sets OMP_WAIT_POLICY=PASSIVE before torch loads OpenMP (libgomp then spins 0 times)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")}
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "frontier.py"), "--help"], capture_output=True,
                            text=True, timeout=300, env={**env, "OMP_DISPLAY_ENV": "VERBOSE"})
    assert result.returncode == 0, result.stderr
    if "GOMP_SPINCOUNT" not in result.stderr:
        pytest.skip("torch's OpenMP is not GNU libgomp")
    assert "GOMP_SPINCOUNT = '0'" in result.stderr


def test_under_mpiexec_the_same_samples(finished, inputs, tmp_path):
    """Launched under mpiexec, the modes are sampled by both processes into the same images as one process."""
    mpiexec = Path(sys.executable).parent / "mpiexec"
    result = subprocess.run([str(mpiexec), "-n", "2", sys.executable, str(REPO / "scripts" / "frontier.py"),
                             *argv(inputs, tmp_path, modes=["ddim+fd:uniform:2@4"])], cwd=REPO, capture_output=True,
                            text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "with 2 process(es)" in result.stdout
    (row,) = json.loads((tmp_path / "frontier.json").read_text())["rows"]
    (one,) = [r for r in json.loads((finished / "frontier.json").read_text())["rows"]
              if (r["spec"], r["guidance"]) == ("ddim+fd:uniform:2@4", 1.5)]
    with np.load(row["samples"]) as a, np.load(one["samples"]) as b:
        np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
        assert np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int)).max() <= 1


BAD = {
    "unknown sampler": (["--modes", "euler@10"], "mode 'euler@10': unknown sampler 'euler'"),
    "no steps": (["--modes", "ddim"], "mode 'ddim': expected SOLVER[+CACHE[:VALUE]][,OPTION=VALUE...]@S"),
    "unknown option": (["--modes", "ddim,colour=red@2"], "unknown option 'colour'"),
    "bad option value": (["--modes", "ddim+fd:uniform:2,context_layout=diagonal@4"], "context_layout must be one of paired, reference, not 'diagonal'"),
    "K larger than S": (["--modes", "ddim+fd:auto:9@4"], "K must be in 1..4"),
    "steps off the schedule": (["--modes", "ddim@4", "ddim@7"], "mode 'ddim@7': --steps: 7 DDIM steps do not fit"),
    "reference of another size": (["--ref", "{folder}/small.npz"], "holds 32x32 images; the model makes 64x64"),
    "graph without the tensors": (["--inception_path", "{folder}/plain.pb"], "not an Inception graph"),
    "missing graph": (["--inception_path", "{folder}/none.pb"], "no such file"),
    "accuracy of a graph of other classes": (["--inception_path", "{folder}/wide.pb", "--classifier_accuracy"],
                                             "the graph has 1008 logits, the model 10 classes"),
    "calibration file of another S": (["--modes", "ddim+fd:@{folder}/cal.json@4"], "was made for S = 10 steps, not 4"),
    "no samples": (["--num_samples", "0"], "--num_samples must be at least 4"),
    "too few samples to score": (["--num_samples", "3"], "--num_samples must be at least 4 (precision and recall"),
    "a set and modes": (["--set", "quick"], "--modes replaces --set and --quick: give one of them"),
    "quick and modes": (["--quick"], "--modes replaces --set and --quick"),
    "negative threads": (["--tf_threads", "-1"], "error: --tf_threads must be at least 0"),
    "no timing rounds": (["--repeats", "0"], "--repeats must be at least 1, not 0"),
    "empty timed call": (["--timing_batch", "0"], "--timing_batch must be at least 1, not 0"),
    "a base that is not a mode": (["--base", "ddim@10"], "--base ddim@10 is not one of the modes (ddim@2, "),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(case, inputs, tmp_path, capsys):
    folder = inputs["folder"]
    if not (folder / "plain.pb").exists():
        tf = pytest.importorskip("tensorflow").compat.v1
        graph = tf.Graph()
        with graph.as_default():
            tf.identity(tf.placeholder(tf.float32, [None, None, None, 3]), name="ExpandDims")
        (folder / "plain.pb").write_bytes(graph.as_graph_def().SerializeToString())
        build_graph(folder / "wide.pb", 1008)
        (folder / "cal.json").write_text(json.dumps({"S": 10, "steps": [0, 5], "feature": "encoder", "model": {}}))
    flags, words = BAD[case]
    status = run([*argv(inputs, tmp_path / "out"), *[f.format(folder=folder) for f in flags]])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and err[0].startswith("error: ") and words in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("values, scale", [([0.40, 0.52], "linear"), ([19.0, 29.5], "linear"),
                                           ([0.05, 0.9], "log"), ([113.1, 1184.0], "log"), ([0.0, 5.0], "linear")])
def test_axes_are_log_over_a_decade_or_more(values, scale):
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots()
    ax.scatter(values, values)
    frontier._set_scale(ax, "x", values)
    frontier._set_scale(ax, "y", values)
    assert ax.get_xscale() == ax.get_yscale() == scale
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_xticklabels() + ax.get_xticklabels(minor=True)
              if t.get_text() and values[0] <= t.get_position()[0] <= values[1]]
    assert len(labels) >= 2  # readable: more than one labelled tick inside the data's range
    plt.close(fig)


def test_plot_legend_names_only_the_caches_plotted(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(frontier.plt, "close", figures.append)
    rows = [{"spec": f"ddim{extra}@50", "guidance": g, "cache": cache, "s_per_img": t, "gflops_per_img": t * 10,
             "fid": fid, "front_time": True, "front_flops": True}
            for extra, cache, t, fid, g in (("", "none", 0.1, 120.0, 2.5),
                                            ("+deepcache:3", "deepcache", 0.05, 150.0, 2.5),
                                            ("", "none", 0.1, 300.0, 1.5))]
    frontier.plot(rows, None, tmp_path / "frontier.png")
    assert (tmp_path / "frontier.png").stat().st_size > 0
    for ax in figures[0].axes[:2]:
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert labels == ["Pareto front (per guidance)", "guidance 2.5", "guidance 1.5", "cache none",
                          "cache deepcache"]
        fronts = [line for line in ax.get_lines() if line.get_linestyle() == "--" and len(line.get_xdata())]
        assert [line.get_color() for line in fronts] == list(frontier.plt.cm.tab10.colors[:2])  # one per guidance


def test_each_guidance_has_its_own_front():
    rows = [{"guidance": g, "s_per_img": t, "fid": fid} for g, t, fid in (
        (2.5, 0.1, 100.0), (2.5, 0.2, 90.0), (2.5, 0.3, 95.0),  # the last: slower and worse than the second
        (1.5, 0.3, 300.0), (1.5, 0.4, 200.0))]  # both beaten by guidance 2.5, neither by its own guidance
    assert frontier.pareto(rows, "s_per_img") == [True, True, False, True, True]


@pytest.mark.parametrize("cap", [None, 8])
def test_flops_per_image_are_those_of_the_batch_sampled(tiny_model, cap):
    """Counted on one image, FLOPs per image are those of --batch_size images: with a cap of 8 rows, decoder calls
    hold 4 steps at one image and 2 at two (guided), sharing fewer convolutions over their skip features."""
    mode = make_mode("ddim", "fd", key_steps=[0, 5], max_decoder_batch=cap)
    args = argparse.Namespace(seed=0, steps=10, scale=3.0, precision="fp32", batch_size=2)
    at_two = sample_latents(tiny_model, torch.tensor([1, 2]), 10, 3.0, mode=mode, count_flops=True)[1]
    counted = frontier.count(tiny_model, mode, args)
    assert counted["gflops_per_img"] == at_two["stats"].flops / 2 / 1e9
    args.batch_size = 1
    assert (frontier.count(tiny_model, mode, args)["gflops_per_img"] < counted["gflops_per_img"]) == bool(cap)


def test_label_groups_join_chains_of_near_points_in_order():
    pixels = [(0, 0), (100, 0), (5, 5), (10, 10), (100, 30), (16, 4)]
    assert frontier.label_groups(pixels, radius=6) == [[0, 2, 3, 5], [1], [4]]
    assert frontier.label_groups(pixels, radius=0) == [[0], [1], [2], [3], [4], [5]]
    assert frontier.label_groups([(1, 1), (1, 1)], radius=0) == [[0, 1]]  # the same place: one label


def test_plot_numbers_every_point_once_and_no_labels_overlap(tmp_path, monkeypatch):
    """Clustered modes (as FasterDiffusion's key-step variants are) get one label listing their numbers, and
    labels near each other are moved apart, so that every number can be read."""
    figures = []
    monkeypatch.setattr(frontier.plt, "close", figures.append)
    rng = np.random.default_rng(0)
    rows = [{"spec": f"ddim+fd:uniform:{k}@50", "guidance": g, "cache": "fd", "s_per_img": 0.06 + 0.01 * rng.random(),
             "gflops_per_img": 4 + rng.random(), "fid": f, "front_time": False, "front_flops": False}
            for k, (g, f) in enumerate([(2.5, 130 + 10 * rng.random()) for _ in range(14)]
                                       + [(1.5, 330 + 30 * rng.random()) for _ in range(14)])]
    rows += [{"spec": "ddim@10", "guidance": 2.5, "cache": "none", "s_per_img": 0.01, "gflops_per_img": 1.2,
              "fid": 200.0, "front_time": True, "front_flops": True}]
    frontier.plot(rows, None, tmp_path / "frontier.png")
    fig = figures[0]
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes[:2]:
        labels = [t for t in ax.texts if t.get_text()]
        numbers = sorted(int(n) for t in labels for n in t.get_text().replace("\n", ",").split(","))
        assert numbers == list(range(1, len(rows) + 1))
        assert len(labels) < len(rows)  # the clusters share labels
        boxes = [t.get_window_extent(renderer) for t in labels]
        assert not [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:] if a.overlaps(b)]


@pytest.mark.parametrize("name", sorted(frontier.SETS))
def test_every_named_set_passes_the_checks(name, inputs, tmp_path):
    """Each --set is a list of modes that frontier.py accepts (checked as before sampling, on the tiny model)."""
    flags = argv(inputs, tmp_path, modes=[])
    flags[flags.index("--modes"):] = ["--set", name, "--guidance", "1.5", "2.5"]
    jobs, _ = frontier.check(frontier.parse_args(flags))
    assert [(job.spec, job.guidance) for job in jobs] == [(m, g) for m in frontier.SETS[name] for g in (1.5, 2.5)]
    assert len({job.folder for job in jobs}) == len(jobs)


def test_too_few_samples_for_the_features_is_one_warning(inputs, tmp_path, capsys):
    """5 samples a mode, fewer than the test graph's 7 spatial features: one warning line for the whole frontier."""
    flags = argv(inputs, tmp_path / "out", "--guidance", "1.5", "--num_samples", "5", modes=["ddim@2", "ddim@4"])
    assert run(flags) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "holds 5 images, fewer than the 7 features of sFID" in warnings[0], warnings
