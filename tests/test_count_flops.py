"""benchmarks/count_flops.py: FLOPs per image from counted calls, against the counts of sampling runs."""
import sys

import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO, TINY_CONFIG
from ldm.models.diffusion.modes import make_mode
from ldm.sampling import sample_latents
from ldm.util import build_model

sys.path.insert(0, str(REPO / "benchmarks"))
import count_flops  # noqa: E402

KEY_STEPS = [0, 4, 9]  # groups of 4, 5 and 1 steps at S = 10


def sampled_flops_per_image(model, mode, batch_size, scale):
    _, intermediates = sample_latents(model, torch.arange(batch_size) % 3, 10, scale, mode=mode, count_flops=True)
    return intermediates["stats"].flops / batch_size


MODES = {"ddim": make_mode(), "fd": make_mode("ddim", "fd", key_steps=KEY_STEPS),
         "fd 8 rows": make_mode("ddim", "fd", key_steps=KEY_STEPS, max_decoder_batch=8),
         "fd 30 rows": make_mode("ddim", "fd", key_steps=KEY_STEPS, max_decoder_batch=30),
         "deepcache": make_mode("ddim", "deepcache", interval=3),
         "deepcache branch 1": make_mode("ddim", "deepcache", full_steps=[0, 1, 5], branch=1),
         "plms": make_mode("plms"), "dpmpp2m deepcache": make_mode("dpmpp2m", "deepcache", interval=3)}


@pytest.fixture(scope="module")
def meta_model():
    return build_model(str(TINY_CONFIG))  # on the meta device


@pytest.mark.parametrize("name", list(MODES))
@pytest.mark.parametrize("batch_size, scale", [(2, 3.0), (3, 1.0)])
def test_counted_calls_give_the_flops_of_sampling(tiny_model, meta_model, name, batch_size, scale):
    """The count from calls on meta tensors equals a sampling run's at that batch size. A cap of 8 rows holds 2 steps
    a call at 4 rows a step and 2 at 3 (unguided); 30 rows, whole groups at 4 and 6 at 3."""
    counted = count_flops.flops_per_image(meta_model, MODES[name], 10, batch_size, scale != 1)
    assert counted == sampled_flops_per_image(tiny_model, MODES[name], batch_size, scale)
    if name not in ("ddim", "plms"):
        assert counted < count_flops.flops_per_image(meta_model, MODES["ddim"], 10, batch_size, scale != 1)


def test_plms_counts_its_first_step_twice(meta_model):
    assert count_flops.flops_per_image(meta_model, make_mode("plms"), 10, 1, True) == \
        count_flops.flops_per_image(meta_model, make_mode(), 11, 1, True)


def test_table_has_a_row_a_cap_and_more_work_with_smaller_calls(capsys):
    args = count_flops.parse_args(["--config", str(TINY_CONFIG), "--key_steps", "0,4,9", "--steps", "10", "--batch",
                                "2", "--scale", "3", "--caps", "none,8,4"])
    assert count_flops.main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "FasterDiffusion 0,4,9, S=10, batch 2" in lines[0]
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in lines[3:]]
    assert [row[:2] for row in rows] == [["none", "1, 4, 5"], ["8", "1, 2"], ["4", "1"]]
    work = [float(row[2].replace(",", "")) for row in rows]
    assert work[0] < work[1] < work[2]


@pytest.mark.parametrize("argv", [["--caps", "512,big"], ["--caps", "0"], ["--caps", "none,-4"], ["--batch", "0"],
                                  ["--steps", "-1"]])
def test_bad_numbers_are_one_line_errors(argv, capsys):
    with pytest.raises(SystemExit) as raised:
        count_flops.parse_args(argv)
    err = capsys.readouterr().err
    assert raised.value.code == 2 and err.startswith(f"error: argument {argv[0]}") and err.count("\n") == 1


def unknown_unet_parameter(path):
    config = OmegaConf.load(TINY_CONFIG)
    config.model.params.unet_config.params.bogus = 3
    OmegaConf.save(config, path)


BAD_CONFIGS = {"not YAML": lambda path: path.write_text("model: [unclosed\n  a: {"),
               "no model section": lambda path: path.write_text("foo: 1\n"),
               "unknown UNet parameter": unknown_unet_parameter}


@pytest.mark.parametrize("argv, message", [
    (["--key_steps", "bogus"], "error: unknown key_steps preset 'bogus'"),
    (["--key_steps", "auto:3"], "error: --key_steps auto:3: count_flops.py needs explicit steps"),
    (["--key_steps", "0,3,3"], "error: key_steps must be strictly increasing without repeats"),
    (["--steps", "7"], "error: --steps: 7 DDIM steps do not fit the uniform schedule"),
    (["--steps", "1001"], "error: --steps: number of DDIM steps must be in 1..1000"),
    (["--scale", "nan"], "error: --scale must be a finite number that float32 can hold, not nan"),
    (["--config", "missing.yaml"], "error: cannot load the model: config not found"),
    (["--config", "not YAML"], "error: cannot load the model: cannot read config"),
    (["--config", "no model section"], "error: cannot load the model: config {} has no `model` section"),
    (["--config", "unknown UNet parameter"], "error: cannot load the model: UNetModel.__init__() got an unexpected")])
def test_bad_plans_and_configs_are_one_line_errors(argv, message, tmp_path, capsys):
    if argv[1] in BAD_CONFIGS:
        BAD_CONFIGS[argv[1]](tmp_path / "config.yaml")
        argv = ["--config", str(tmp_path / "config.yaml")]
    assert count_flops.main(count_flops.parse_args(argv)) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(message.format(argv[1])) and err.count("\n") == 1
