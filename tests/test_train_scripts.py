"""Bad input to the digits scripts (make_digits, train_digits, train_classifier): one `error:` line and exit
status 2 before any long work, nothing left behind; a finished training stage rerun; write_atomic's cleanup."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, load_script, run_main
from ldm.util import write_atomic

CONFIG = REPO / "configs" / "latent-diffusion" / "digits32.yaml"

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # slow: the trainers


def assert_usage_error(result, message):
    """Exit status 2 and a single `error: ...` line on stderr that contains message."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


def write_set(path, count=8):
    """A small ADM-format .npz of blank digits: arr_0 uint8 [count, 32, 32, 3], arr_1 labels 0-9."""
    np.savez(path, arr_0=np.zeros((count, 32, 32, 3), np.uint8), arr_1=np.arange(count) % 10)
    return path


@pytest.fixture
def files(tmp_path):
    """A data set, a file that is no data set, a non-YAML config and a plain file, in tmp_path."""
    (tmp_path / "notes.txt").write_text("not a data set\n")
    np.savez(tmp_path / "big.npz", arr_0=np.zeros((4, 64, 64, 3), np.uint8), arr_1=np.arange(4))
    (tmp_path / "config.yaml").write_text("model: [unclosed\n")
    np.savez(tmp_path / "other.npz", images=np.zeros(3))
    return {"data": write_set(tmp_path / "data.npz"), "text": tmp_path / "notes.txt", "other": tmp_path / "other.npz",
            "config": tmp_path / "config.yaml"}


# --------------------------------------------------------------------------------------------------------------
# make_digits.py


@pytest.mark.parametrize("failure, status, line", [
    (OSError(28, "No space left on device", "d.npz"), 1, "error: No space left on device: d.npz"),
    (KeyboardInterrupt(), 130, "stopped"),
])
def test_make_digits_ends_a_failed_write_or_ctrl_c_in_one_line(tmp_path, monkeypatch, capsys, failure, status, line):
    def fail(*args):
        raise failure

    make_digits = load_script("scripts/make_digits.py")
    monkeypatch.setattr(make_digits, "write_atomic", fail)
    assert make_digits.main(["--num", "3", "--workers", "1", "--out", str(tmp_path / "d.npz")]) == status
    assert capsys.readouterr().err == line + "\n"
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("out, flags, message", [
    ("missing/d.npz", [], "does not exist"),
    ("notes.txt/d.npz", [], "is a file, not a directory"),
    ("folder.npz", [], "is a directory"),
    ("d.npz", ["--seed", -1], "--seed must be at least 0, not -1"),
])
def test_make_digits_refuses_an_unwritable_out_and_a_negative_seed_before_drawing(tmp_path, files, out, flags, message):
    (tmp_path / "folder.npz").mkdir()
    before = sorted(tmp_path.iterdir())
    result = run_main("scripts/make_digits.py", "--num", 3, "--workers", 1, "--out", tmp_path / out, *flags)
    assert_usage_error(result, message)
    assert sorted(tmp_path.iterdir()) == before


def test_write_atomic_cleanup_never_masks_the_error(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("")
    with pytest.raises(NotADirectoryError) as caught:  # opening the temporary file fails, and so would its removal
        write_atomic(tmp_path / "afile" / "d.npz", lambda f: None)
    assert caught.value.filename == str(tmp_path / "afile" / "d.npz")  # the file asked for, not the temporary one
    opening = caught.value.__cause__
    assert isinstance(opening, NotADirectoryError) and opening.__context__ is None  # open's error, not the cleanup's

    def failing_unlink(self, missing_ok=False):
        raise PermissionError(f"cannot remove {self}")

    def failing_write(f):
        raise ValueError("the writer's error")

    monkeypatch.setattr(Path, "unlink", failing_unlink)
    with pytest.raises(ValueError, match="the writer's error"):
        write_atomic(tmp_path / "out.bin", failing_write)
    assert not (tmp_path / "out.bin").exists()


# --------------------------------------------------------------------------------------------------------------
# train_classifier.py


@pytest.mark.parametrize("flags, message", [
    (["--data", "missing.npz"], "--data missing.npz: no such file"),
    (["--data", "other.npz"], "has no arr_0 or arr_1"),
    (["--held_out", "notes.txt"], "--held_out notes.txt is not a .npz file"),
    (["--steps", 0], "--steps must be at least 1, not 0"),
    (["--seed", -1], "--seed must be at least 0, not -1"),
    (["--out", "missing/classifier.pb"], "does not exist"),
    (["--out", "."], "is a directory"),
])
def test_train_classifier_refuses_bad_input_before_training(tmp_path, files, monkeypatch, flags, message):
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.iterdir())
    result = run_main("scripts/train_classifier.py", "--data", "data.npz", "--held_out", "data.npz",
                      "--out", "classifier.pb", "--steps", 1, *flags)
    assert_usage_error(result, message)
    assert sorted(tmp_path.iterdir()) == before


# --------------------------------------------------------------------------------------------------------------
# train_digits.py


def train(tmp_path, *args):
    """scripts/train_digits.py in this process on the tiny data set in tmp_path, 2 steps unless args say otherwise."""
    return run_main("scripts/train_digits.py", "--data", tmp_path / "data.npz", "--config", CONFIG,
                    "--batch_size", 4, "--threads", 1, "--steps", 2, *args)


@pytest.mark.parametrize("args, message", [
    (["first_stage", "--save_every", 0], "--save_every must be at least 1, not 0"),
    (["first_stage", "--batch_size", 0], "--batch_size must be at least 1, not 0"),
    (["first_stage", "--minutes", "nan"], "--minutes must be at least 0, not nan"),
    (["first_stage", "--decoder_only"], "--decoder_only continues a trained first stage, and there is none"),
    (["first_stage", "--data", "{tmp}/missing.npz"], "--data not found"),
    (["first_stage", "--data", "{tmp}/notes.txt"], "is not a .npz file"),
    (["first_stage", "--data", "{tmp}/other.npz"], "has no arr_0 or arr_1"),
    (["first_stage", "--data", "{tmp}/big.npz"], "--data {tmp}/big.npz holds 64x64x3 images; the config's model takes 32x32x3"),
    (["first_stage", "--config", "{tmp}/config.yaml"], "cannot read config"),
    (["first_stage", "--workdir", "{tmp}/notes.txt"], "--workdir {tmp}/notes.txt: cannot create a directory there"),
    (["unet"], "no first stage in {tmp}/work (first_stage.pt): train it first with `python scripts/train_digits.py "
               "first_stage --workdir {tmp}/work`"),
    (["unet", "--init_from", "{tmp}/nowhere"], "--init_from: exported model not found"),
    (["export"], "no first stage in {tmp}/work"),
])
def test_train_digits_refuses_bad_input_before_training(tmp_path, files, args, message):
    before = sorted(tmp_path.iterdir())
    args = [str(a).format(tmp=tmp_path) for a in args]
    result = train(tmp_path, args[0], "--workdir", tmp_path / "work", *args[1:])
    assert_usage_error(result, message.format(tmp=tmp_path))
    assert sorted(tmp_path.iterdir()) == before  # not even --workdir is made


def test_train_digits_export_needs_a_unet_and_a_folder_to_write(tmp_path, files):
    work = tmp_path / "work"
    work.mkdir()
    (work / "first_stage.pt").write_bytes(b"")
    no_unet = train(tmp_path, "export", "--workdir", work, "--out", tmp_path / "model")
    assert_usage_error(no_unet, f"no UNet in {work} (unet.pt): train it first with "
                                f"`python scripts/train_digits.py unet --workdir {work}`")
    (work / "unet.pt").write_bytes(b"")
    out_is_a_file = train(tmp_path, "export", "--workdir", work, "--out", tmp_path / "notes.txt")
    assert_usage_error(out_is_a_file, f"--out {tmp_path}/notes.txt: cannot create a directory there")
    assert not (tmp_path / "model").exists() and (tmp_path / "notes.txt").read_text() == "not a data set\n"


def test_a_finished_stage_rerun_says_so_and_changes_nothing(tmp_path, files):
    work = ["--workdir", tmp_path / "work"]
    for stage, name, label in (("first_stage", "first_stage.pt", "first stage"), ("unet", "unet.pt", "unet")):
        trained = train(tmp_path, stage, *work)
        assert trained.returncode == 0, trained.stderr
        checkpoint = (tmp_path / "work" / name).read_bytes()
        for extra, line in (([], f"{label}: already at step 2 of --steps 2: nothing to train"),
                            (["--steps", 5, "--minutes", 0], f"{label}: --minutes 0 leaves no time to train; "
                                                             "still at step 2")):
            again = train(tmp_path, stage, *work, *extra)
            assert again.returncode == 0, again.stderr
            assert again.stdout.strip().splitlines()[-1].startswith(line) and not again.stderr
            assert (tmp_path / "work" / name).read_bytes() == checkpoint
    assert torch.load(tmp_path / "work" / "unet.pt", weights_only=True)["step"] == 2
