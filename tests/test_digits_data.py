"""The digits data set, the trainer of the small model and the classifier's export as an evaluator graph."""
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from fontTools.ttLib import TTFont

from conftest import REPO, run_main
from evaluations.digit_classifier import DigitClassifier, export_graph, graph_logits
from ldm.data.digits import DIGIT_NAMES, REFERENCE_SEED, digit_fonts, make_digits
from ldm.util import load_model

CONFIG = REPO / "configs" / "latent-diffusion" / "digits32.yaml"


def run_script(name, *args, cwd=REPO):
    return subprocess.run([sys.executable, str(REPO / "scripts" / name), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True)


def train(*args):
    """scripts/train_digits.py in this process (a dozen runs: no interpreter start each)."""
    return run_main("scripts/train_digits.py", *args)


def test_fonts_are_the_matplotlib_faces_with_digit_glyphs():
    fonts = digit_fonts()
    names = {f.rsplit("/", 1)[-1] for f in fonts}
    assert {"DejaVuSans.ttf", "STIXGeneral.ttf", "cmr10.ttf"} <= names
    # symbol fonts map '0'-'9' to other glyphs, LastResort to one placeholder: both are left out
    assert not names & {"cmsy10.ttf", "cmex10.ttf", "LastResortHE-Regular.ttf", "DejaVuSansDisplay.ttf"}
    for font in fonts:
        cmap = TTFont(font, lazy=True).getBestCmap()
        assert [cmap[ord(str(d))].lower()[:len(n)] for d, n in enumerate(DIGIT_NAMES)] == list(DIGIT_NAMES)


def test_images_depend_only_on_seed_and_index():
    images, labels = make_digits(3, range(12))
    again, again_labels = make_digits(3, [11, 4])
    np.testing.assert_array_equal(again, images[[11, 4]])
    np.testing.assert_array_equal(again_labels, labels[[11, 4]])
    other, _ = make_digits(4, range(12))
    assert images.shape == (12, 32, 32, 3) and images.dtype == np.uint8
    assert not np.array_equal(images, other)
    assert len({im.tobytes() for im in images}) == 12


def test_images_vary_in_every_channel_and_cover_all_classes():
    images, labels = make_digits(0, range(300))
    assert set(labels.tolist()) == set(range(10))
    channel_means = images.reshape(-1, 3).astype(float).mean(0)
    per_image = images.reshape(len(images), -1, 3).astype(float).mean(1)
    assert per_image.std(0).min() > 20  # colours differ between images in each channel
    assert not np.allclose(per_image[:, 0], per_image[:, 1]) and 40 < channel_means.mean() < 215


@pytest.mark.slow
def test_make_digits_script_writes_adm_npz_and_refuses_the_reference_seed(tmp_path):
    out = tmp_path / "train.npz"
    result = run_script("make_digits.py", "--num", 25, "--seed", 7, "--out", out, "--workers", 2)
    assert result.returncode == 0 and result.stderr == "", result.stderr  # pool workers end quietly
    with np.load(out) as data:
        assert sorted(data.files) == ["arr_0", "arr_1"]
        images, labels = make_digits(7, range(25))
        np.testing.assert_array_equal(data["arr_0"], images)
        np.testing.assert_array_equal(data["arr_1"], labels)
    bad = run_script("make_digits.py", "--num", 5, "--seed", REFERENCE_SEED, "--out", tmp_path / "x.npz")
    assert bad.returncode == 2 and "reference batch's seed" in bad.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "x.npz").exists()
    assert list(tmp_path.iterdir()) == [out]


@pytest.mark.slow
def test_trainer_runs_each_stage_resumes_and_exports_a_strictly_loadable_model(tmp_path):
    data = tmp_path / "train.npz"
    assert run_script("make_digits.py", "--num", 64, "--seed", 1, "--out", data, "--workers", 1).returncode == 0
    common = ["--data", data, "--workdir", tmp_path / "work", "--batch_size", 8, "--threads", 1, "--config", CONFIG]
    first = train("first_stage", "--steps", 1, *common)
    assert first.returncode == 0, first.stderr
    lower = train("first_stage", "--steps", 2, "--lr", 1e-5, *common)
    assert lower.returncode == 0 and "resumed first stage at step 1" in lower.stdout
    state = torch.load(tmp_path / "work" / "first_stage.pt", weights_only=True)
    assert state["step"] == 2 and state["opt"]["param_groups"][0]["lr"] == 1e-5  # --lr holds on resuming
    unet = train("unet", "--steps", 2, *common)
    assert unet.returncode == 0, unet.stderr
    resumed = train("unet", "--steps", 3, *common)
    assert "resumed UNet at step 2" in resumed.stdout and "unet: 3 steps" in resumed.stdout
    before = torch.load(tmp_path / "work" / "first_stage.pt", weights_only=True)["model"]
    decoder = train("first_stage", "--decoder_only", "--steps", 4, *common)
    assert decoder.returncode == 0, decoder.stderr
    after = torch.load(tmp_path / "work" / "first_stage.pt", weights_only=True)["model"]
    frozen = [k for k in before if not k.startswith(("decoder.", "post_quant_conv."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert not torch.equal(before["decoder.conv_out.weight"], after["decoder.conv_out.weight"])
    out = tmp_path / "model"
    exported = train("export", "--out", out, *common)
    assert exported.returncode == 0, exported.stderr
    model = load_model(str(out / "config.yaml"), str(out / "model.safetensors"))
    state = torch.load(tmp_path / "work" / "unet.pt", weights_only=True)
    assert model.scale_factor == pytest.approx(state["scale_factor"])
    decoder_ema = torch.load(tmp_path / "work" / "first_stage.pt", weights_only=True)["decoder_ema"]
    exported_stage = model.first_stage_model
    for key in frozen:  # the first stage the UNet trained on, with the EMA weights of its latest decoder
        torch.testing.assert_close(exported_stage.state_dict()[key], after[key], rtol=0, atol=0)
    decoder = list(exported_stage.post_quant_conv.parameters()) + list(exported_stage.decoder.parameters())
    assert len(decoder) == len(decoder_ema)
    for p, ema in zip(decoder, decoder_ema):
        torch.testing.assert_close(p, ema, rtol=0, atol=0)
    assert not torch.equal(exported_stage.decoder.conv_out.weight, after["decoder.conv_out.weight"])
    unet_params = list(model.model.parameters()) + list(model.cond_stage_model.parameters())
    for p, ema in zip(unet_params, state["ema"]):  # the export holds the EMA weights
        torch.testing.assert_close(p, ema, rtol=0, atol=0)
    z = torch.randn(2, 3, 8, 8)
    assert model.decode_first_stage(z).shape == (2, 3, 32, 32)

    # a new workdir starts from the exported model: its EMA weights and first stage, at its step
    other = [*common[:2], "--workdir", tmp_path / "work2", *common[4:]]
    warm = train("unet", "--init_from", out, "--steps", 4, *other)
    assert warm.returncode == 0, warm.stderr
    assert "started UNet from" in warm.stdout and "(step 3," in warm.stdout and "unet: 4 steps" in warm.stdout
    assert torch.load(tmp_path / "work2" / "first_stage.pt", weights_only=True)["model"].keys() == after.keys()
    warm_state = torch.load(tmp_path / "work2" / "unet.pt", weights_only=True)
    assert warm_state["step"] == 4 and warm_state["opt"]["state"][0]["step"] == 1  # a fresh optimizer: one step
    assert warm_state["opt"]["param_groups"][0]["lr"] == pytest.approx(2e-4 / 500)

    first = train("first_stage", "--steps", 6, *common)  # retrains the encoder too
    refused = run_script("train_digits.py", "export", "--out", tmp_path / "other", *common)
    assert refused.returncode != 0 and "encoder changed" in refused.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "other").exists()

    # a workdir with a first stage of its own keeps it: the exported UNet then trains on that stage's latents
    (tmp_path / "work3").mkdir()
    shutil.copy(tmp_path / "work" / "first_stage.pt", tmp_path / "work3")
    retrained = torch.load(tmp_path / "work3" / "first_stage.pt", weights_only=True)["model"]
    other = [*common[:2], "--workdir", tmp_path / "work3", *common[4:]]
    adapted = train("unet", "--init_from", out, "--steps", 4, *other)
    assert adapted.returncode == 0, adapted.stderr
    assert "keeping the first stage" in adapted.stdout and "(step 3," in adapted.stdout
    kept = torch.load(tmp_path / "work3" / "first_stage.pt", weights_only=True)["model"]
    assert all(torch.equal(kept[k], v) for k, v in retrained.items())
    exported = train("export", "--out", tmp_path / "adapted", *other)
    assert exported.returncode == 0, exported.stderr
    model = load_model(str(tmp_path / "adapted" / "config.yaml"), str(tmp_path / "adapted" / "model.safetensors"))
    torch.testing.assert_close(model.first_stage_model.encoder.conv_in.weight, retrained["encoder.conv_in.weight"])


@pytest.mark.slow
def test_exported_classifier_graph_computes_the_same_logits():
    torch.manual_seed(0)
    classifier = DigitClassifier().eval()
    images, _ = make_digits(11, range(6))
    expected = classifier(torch.from_numpy(images).permute(0, 3, 1, 2).float()).detach().numpy()
    np.testing.assert_allclose(graph_logits(export_graph(classifier), images), expected, rtol=1e-4, atol=1e-4)
