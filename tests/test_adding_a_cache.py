"""The README's "Adding a cache" example, run as written: a cache defined outside the library (here, in the README) and
listed among the caches is sampled by every front end, counted, compiled and refused like the built-in ones."""
import copy
import json
import re
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, TINY_CKPT, TINY_CONFIG, load_script
from ldm import cli
from ldm.compile import compile_unet, warm_up
from ldm.models.diffusion import caches
from ldm.models.diffusion.modes import format_mode, make_mode, parse_mode
from ldm.sampling import sample_generators, sample_latents
from ldm.util import build_model
from test_compile import two_level_model  # noqa: F401 (a fixture)

sys.path.insert(0, str(REPO / "benchmarks"))
import count_flops  # noqa: E402

image_sample = load_script("scripts/image_sample.py")
infer_ldm = load_script("infer_ldm.py")
frontier = load_script("scripts/frontier.py")


def readme_example():
    """The Python block of the README's "Adding a cache" section, executed; returns its names."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Adding a cache"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    names = {}
    exec(compile(code, "README.md (Adding a cache)", "exec"), names)
    return names


REUSE = readme_example()["Reuse"]
TINY = ["--config", str(TINY_CONFIG), "--ckpt", str(TINY_CKPT), "--steps", "10", "--tqdm_disable"]


@pytest.fixture(autouse=True)
def listed(monkeypatch):
    """The one line that adds a cache: its entry among the caches (here for this test only)."""
    monkeypatch.setitem(caches.CACHES, "reuse", REUSE)


def test_mode_strings_name_it_and_round_trip():
    mode = parse_mode("dpmpp2m+reuse:3,precision=bf16@20")
    assert isinstance(mode.cache, REUSE) and mode.cache.every == 3 and (mode.steps, mode.precision) == (20, "bf16")
    assert mode.label == "DPM-Solver++ 2M + Reuse every 3"
    assert format_mode(mode) == "dpmpp2m+reuse:3,precision=bf16@20" and parse_mode(format_mode(mode)) == mode
    assert make_mode(**frontier.parse_spec("ddim+reuse:2@10")) == make_mode("ddim", "reuse", every=2, steps=10)
    for spec, message in (("ddim+reuse:0", "Reuse every must be at least 1, not 0"),
                          ("ddim+reuse:2,branch=1", "branch is an option of 'deepcache', not of ddim+reuse"),
                          ("ddim+reuse:x", "every: expected a whole number, not 'x'")):
        with pytest.raises(ValueError, match=re.escape(message)):
            parse_mode(spec)


def run_image_sample(out, *flags):
    assert image_sample.run([*TINY, "--num_samples", "4", "--batch_size", "2", "--output_dir", str(out), *flags]) == 0
    with np.load(out / "samples_4x64x64x3.npz") as npz:
        return npz["arr_0"], json.loads((out / "samples_4x64x64x3.json").read_text())


def test_image_sample_takes_its_flags_and_records_it(tmp_path, capsys):
    plain, _ = run_image_sample(tmp_path / "plain")
    every_step, record = run_image_sample(tmp_path / "every1", "--cache", "reuse", "--every", "1")
    np.testing.assert_array_equal(every_step, plain)  # a UNet call every step: plain DDIM
    assert record["reuse"] == {"every": 1}
    reused, record = run_image_sample(tmp_path / "every2", "--mode", "ddim+reuse:2")
    assert record["reuse"] == {"every": 2} and not np.array_equal(reused, plain)
    np.testing.assert_array_equal(run_image_sample(tmp_path / "flags", "--cache", "reuse", "--every", "2")[0], reused)
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:
        image_sample.run([*TINY, "--output_dir", str(tmp_path / "bad"), "--every", "2"])
    assert refused.value.code == cli.BAD_INPUT
    assert capsys.readouterr().err.strip() == "error: --every is a Reuse option: add --cache reuse (the cache is none)"


def test_infer_ldm_compares_it(tmp_path, capsys):
    out = tmp_path / "compare.png"
    assert infer_ldm.main([*TINY, "--classes", "1", "2", "--scale", "3", "--device", "cpu", "--cache", "none",
                           "--compare", "ddim", "ddim+reuse:2", "--repeats", "1", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "DDIM + Reuse every 2" in table and out.is_file()


def test_flops_are_counted_from_its_calls(tiny_model):
    mode = make_mode("ddim", "reuse", every=2)
    labels = torch.tensor([0, 1])
    _, intermediates = sample_latents(tiny_model, labels, 10, 3.0, mode=mode, count_flops=True)
    meta = build_model(str(TINY_CONFIG))
    counted = count_flops.flops_per_image(meta, mode, 10, 2, True)
    assert counted == intermediates["stats"].flops / 2
    assert counted == count_flops.flops_per_image(meta, make_mode(), 5, 2, True)  # 5 of 10 steps call the UNet


@pytest.mark.slow
def test_compile_meets_its_shapes_before_sampling(two_level_model):  # noqa: F811
    """The shapes that its declared calls name are compiled before sampling, none during it. What a cache decides
    is which graphs sampling meets (torch.compile's tracing and guards), so the graphs run as traced (aot_eager);
    inductor's code for the same whole-UNet graph is checked in test_compile.py."""
    from torch._dynamo.utils import counters

    mode = parse_mode("ddim+reuse:2")
    model = compile_unet(copy.deepcopy(two_level_model), buckets=(), backend="aot_eager")
    shapes, _ = warm_up(model, [mode], 10, 2, True, "fp32")
    assert shapes == 1  # the whole UNet
    graphs = counters["stats"]["unique_graphs"]
    labels = torch.tensor([0, 1])
    compiled, _ = sample_latents(model, labels, 10, 3.0, mode=mode, generators=sample_generators(0, range(2)))
    assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled while sampling
    eager, _ = sample_latents(two_level_model, labels, 10, 3.0, mode=mode, generators=sample_generators(0, range(2)))
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
