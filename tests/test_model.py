"""Model stack: exact key layout of cin256-v2, golden outputs of the tiny model, checkpoint loading."""
import json
import os

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from conftest import FIXTURES, REPO, TINY_CKPT, TINY_CONFIG, rel_err
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.modules.diffusionmodules.util import Embedding
from ldm.sampling import (DECODE_BATCH, decode_latents, generate, image_shape, num_classes, sample_latents,
                          unconditional_class)
from ldm.util import (CheckpointError, build_model, file_sha256, instantiate_from_config, load_model, model_name,
                      read_state_dict)

CIN256_CONFIG = REPO / "configs" / "latent-diffusion" / "cin256-v2.yaml"


def test_cin256_state_dict_matches_upstream_manifest():
    model = instantiate_from_config(OmegaConf.load(CIN256_CONFIG).model)
    manifest = json.loads((FIXTURES / "cin256-v2.state_dict.json").read_text())
    expected = [(k, tuple(shape), dtype) for k, shape, dtype in manifest["tensors"]]
    ours = [(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()]
    assert len(ours) == manifest["num_tensors"] == 906
    assert sorted(ours) == sorted(expected)
    assert sum(v.numel() for v in model.state_dict().values()) == manifest["num_elements"]
    assert sum(p.numel() for p in model.model.diffusion_model.parameters()) == 400_920_579


def test_a_models_structure_draws_no_weights_and_a_model_from_a_config_draws_torchs(monkeypatch):
    """On the meta device nothing is drawn (torch's meta normal_ would import torch._dynamo, 1.4 s a start); a model
    built to train draws its embeddings as nn.Embedding does."""
    torch.manual_seed(0)
    ours = Embedding(1001, 16)
    torch.manual_seed(0)
    torchs = nn.Embedding(1001, 16)
    assert torch.equal(ours.weight, torchs.weight) and ours.weight.std() > 0.9
    drawn = []
    monkeypatch.setattr(torch.nn.init, "normal_", lambda tensor, *a, **k: drawn.append(tensor.shape))
    build_model(str(TINY_CONFIG))
    assert drawn == []
    with torch.device("meta"):
        nn.Embedding(3, 2)
    assert drawn == [(3, 2)]  # what the check above would have seen


def test_schedule_buffers_match_upstream_constants(tiny_model):
    ac = tiny_model.alphas_cumprod.double()
    assert tiny_model.betas[0].item() == pytest.approx(0.0015, rel=1e-6)
    assert tiny_model.betas[-1].item() == pytest.approx(0.0195, rel=1e-6)
    assert ac[0].item() == pytest.approx(0.9985, rel=1e-6)
    assert ac[1].item() == pytest.approx(0.996994, rel=1e-5)
    assert ac[997].item() == pytest.approx(1.48016e-4, rel=1e-4)
    assert ac[999].item() == pytest.approx(1.42304e-4, rel=1e-4)
    assert tiny_model.alphas_cumprod_prev[0].item() == 1.0
    assert tiny_model.scale_factor == 1.0


def test_conditioning_matches_golden(tiny_model, golden):
    labels = torch.from_numpy(golden["labels"])
    cond = tiny_model.get_learned_conditioning({"class_label": labels})
    uncond = tiny_model.get_learned_conditioning({"class_label": torch.full_like(labels, 1000)})
    assert cond.shape == (2, 1, 16)
    np.testing.assert_array_equal(cond.numpy(), golden["cond"])
    np.testing.assert_array_equal(uncond.numpy(), golden["uncond"])


@pytest.mark.parametrize("labels, message", [
    ([1001], "class labels must be in 0..1000 (the last is the unconditional class), not 1001"),
    ([3, -1], "class labels must be in 0..1000 (the last is the unconditional class), not -1"),
    ([1.0], "class labels must be integers, not torch.float32"),
])
def test_labels_outside_the_embedder_are_one_clear_error(tiny_model, labels, message):
    with pytest.raises(ValueError) as caught:
        tiny_model.get_learned_conditioning({"class_label": torch.tensor(labels)})
    assert str(caught.value) == message


def test_unet_matches_golden(tiny_model, golden):
    x, t, cond = (torch.from_numpy(golden[k]) for k in ("x", "t", "cond"))
    with torch.no_grad():
        eps = tiny_model.apply_model(x, t, cond)
        skips, mid = tiny_model.model.diffusion_model.encode(x, t, cond)
        decoded = tiny_model.model.diffusion_model.decode(skips, mid, t, cond)
    assert rel_err(eps, golden["eps"]) < 1e-5
    assert len(skips) == 12
    for i, skip in enumerate(skips):
        assert skip.shape == golden[f"skip_{i}"].shape
        assert rel_err(skip, golden[f"skip_{i}"]) < 1e-5, i
    assert rel_err(mid, golden["mid"]) < 1e-5
    torch.testing.assert_close(decoded, eps, rtol=0, atol=0)


def test_decoder_broadcasts_features_over_timesteps(tiny_model, golden):
    """decode with n timesteps per feature row equals n separate decodes."""
    unet = tiny_model.model.diffusion_model
    x, t, cond = (torch.from_numpy(golden[k]) for k in ("x", "t", "cond"))
    t2 = torch.tensor([500, 17])
    with torch.no_grad():
        skips, mid = unet.encode(x, t, cond)
        both = unet.decode(skips, mid, torch.cat([t, t2]), torch.cat([cond, cond]))
        first = unet.decode(skips, mid, t, cond)
        second = unet.decode(skips, mid, t2, cond)
    torch.testing.assert_close(both, torch.cat([first, second]), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cannot share"):
        unet.decode(skips, mid, torch.tensor([1, 2, 3]), None)


def test_first_stage_decode_matches_golden(tiny_model, golden):
    decoded = tiny_model.decode_first_stage(torch.from_numpy(golden["z"]))
    assert decoded.shape == (2, 3, 64, 64)
    assert rel_err(decoded, golden["decoded"]) < 1e-5


def test_latents_are_decoded_in_chunks_with_the_same_images(tiny_model, monkeypatch):
    torch.manual_seed(0)
    z = torch.randn(2 * DECODE_BATCH + 3, 3, 16, 16)
    whole = tiny_model.decode_first_stage(z)
    sizes = []
    decode = tiny_model.first_stage_model.decode
    monkeypatch.setattr(tiny_model.first_stage_model, "decode", lambda h, **kw: sizes.append(len(h)) or decode(h, **kw))
    # Equal to float rounding: oneDNN may pick other convolution kernels for other batch sizes (on one thread here).
    assert rel_err(decode_latents(tiny_model, z), whole) < 1e-6
    assert sizes == [DECODE_BATCH, DECODE_BATCH, 3]


def test_first_stage_encode_shape(tiny_model):
    z = tiny_model.encode_first_stage(torch.zeros(1, 3, 64, 64))
    assert z.shape == (1, 3, 16, 16)


def test_load_model_returns_eval_model_without_grad(tiny_model):
    assert not tiny_model.training
    assert not any(p.requires_grad for p in tiny_model.parameters())


# --- checkpoint loading: formats, safety, bad input -------------------------------------------

@pytest.fixture(scope="module")
def tiny_state_dict():
    return read_state_dict(str(TINY_CKPT))


def test_safetensors_checkpoint_loads(tmp_path, tiny_state_dict, tiny_model):
    from safetensors.torch import save_file
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_state_dict.items()}, str(path))
    model = load_model(str(TINY_CONFIG), str(path))
    for (k, a), b in zip(model.state_dict().items(), tiny_model.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_checkpoint_of_another_float_dtype_loads_as_float32(dtype, tmp_path, tiny_state_dict, tiny_model, golden):
    """As upstream's load_state_dict into float32 parameters: every float tensor becomes float32, equal to the
    checkpoint's values, and the model samples in fp32 (an fp16 copy of cin256-v2 is a common download)."""
    path = tmp_path / "cast.ckpt"
    torch.save({"state_dict": {k: v.to(dtype) if v.is_floating_point() else v
                               for k, v in tiny_state_dict.items()}}, path)
    model = load_model(str(TINY_CONFIG), str(path))
    loaded = model.state_dict()
    assert {v.dtype for v in loaded.values() if v.is_floating_point()} == {torch.float32}
    assert all(torch.equal(loaded[k], v.to(dtype).float()) for k, v in tiny_state_dict.items() if v.is_floating_point())
    labels = torch.tensor([1, 2])
    x_T = torch.from_numpy(golden["x_T"])[:2]
    latents, _ = sample_latents(model, labels, 5, 2.0, x_T=x_T)
    expected, _ = sample_latents(tiny_model, labels, 5, 2.0, x_T=x_T)
    assert rel_err(latents, expected) < {torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float64: 1e-7}[dtype]


def test_known_harmless_extras_are_ignored(tmp_path, tiny_state_dict):
    extras = {"lvlb_weights": torch.ones(1000), "scale_factor": torch.tensor(0.18),
              "model_ema.decay": torch.tensor(0.999), "model_ema.num_updates": torch.tensor(5)}
    path = tmp_path / "extras.ckpt"
    torch.save({"state_dict": {**tiny_state_dict, **extras}, "global_step": 7}, path)
    model = load_model(str(TINY_CONFIG), str(path))
    assert model.scale_factor == 1.0


def test_pickled_objects_are_refused_unless_allowed(tmp_path, tiny_state_dict):
    path = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": tiny_state_dict, "hyper_parameters": OmegaConf.create({"a": 1})}, path)
    with pytest.raises(CheckpointError, match="allow_pickle"):
        load_model(str(TINY_CONFIG), str(path))
    assert load_model(str(TINY_CONFIG), str(path), allow_pickle=True) is not None


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_model(str(TINY_CONFIG), str(tmp_path / "nope.ckpt"))
    with pytest.raises(FileNotFoundError, match="config not found"):
        load_model(str(tmp_path / "nope.yaml"), str(TINY_CKPT))


def test_directory_is_not_a_file(tmp_path):
    with pytest.raises(IsADirectoryError, match=f"checkpoint {tmp_path} is a directory, not a file"):
        load_model(str(TINY_CONFIG), str(tmp_path))
    with pytest.raises(IsADirectoryError, match="config .* is a directory"):
        load_model(str(tmp_path), str(TINY_CKPT))


def test_x0_parameterization_is_refused(tmp_path):
    config = OmegaConf.load(TINY_CONFIG)
    config.model.params.parameterization = "x0"
    OmegaConf.save(config, tmp_path / "x0.yaml")
    with pytest.raises(ValueError, match="parameterization 'x0' is not supported.*eps"):
        build_model(str(tmp_path / "x0.yaml"))


def test_classes_come_from_the_model(tiny_model, ten_class_files):
    assert (num_classes(tiny_model), unconditional_class(tiny_model)) == (1000, 1000)
    small = build_model(str(ten_class_files[0]))
    assert (num_classes(small), unconditional_class(small)) == (10, 10)
    assert image_shape(small) == image_shape(tiny_model) == (64, 64, 3)


def test_fewer_classes_sample_like_the_same_embeddings(tiny_model, ten_class_files):
    """Guidance uses the model's own last class: the 10-class cut samples exactly as the tiny model."""
    small = load_model(*map(str, ten_class_files))
    labels = torch.tensor([3, 9])
    x_T = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    expected, _ = generate(tiny_model, labels, 10, 3.0, x_T=x_T)
    got, _ = generate(small, labels, 10, 3.0, x_T=x_T)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_unconditional_model_has_no_classes(tiny_model):
    class Unconditional:
        cond_stage_model = None
    with pytest.raises(ValueError, match="not class-conditional"):
        num_classes(Unconditional())


def test_file_sha256_is_cached_beside_the_file_by_size_and_mtime(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"abc")
    expected = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # SHA-256 of b"abc"
    assert file_sha256(path) == expected
    cache = tmp_path / "weights.bin.sha256.json"
    assert not cache.exists()  # small files are not worth a cache
    assert file_sha256(path, cache_from_bytes=3) == expected
    assert json.loads(cache.read_text())["sha256"] == expected
    cache.write_text(cache.read_text().replace(expected, "cached"))
    assert file_sha256(path, cache_from_bytes=3) == "cached"  # size and mtime unchanged: the cache answers
    assert file_sha256(path, cache_from_bytes=None) == expected
    os.utime(path, ns=(1, 1))  # a touch or a copy: computed again, the same content hash
    assert file_sha256(path, cache_from_bytes=3) == expected


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.ckpt"
    path.write_text("these are not weights\n")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_model(str(TINY_CONFIG), str(path))


def test_truncated_checkpoint(tmp_path):
    path = tmp_path / "truncated.ckpt"
    path.write_bytes(TINY_CKPT.read_bytes()[: TINY_CKPT.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(str(TINY_CONFIG), str(path))


def test_truncated_safetensors(tmp_path, tiny_state_dict):
    from safetensors.torch import save_file
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_state_dict.items()}, str(path))
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="safetensors"):
        load_model(str(TINY_CONFIG), str(path))


def _tiny_config_with(tmp_path, **unet_params):
    config = OmegaConf.load(TINY_CONFIG)
    for k, v in unet_params.items():
        config.model.params.unet_config.params[k] = v
    path = tmp_path / "other.yaml"
    OmegaConf.save(config, path)
    return str(path)


def test_checkpoint_of_another_architecture(tmp_path):
    config = _tiny_config_with(tmp_path, num_res_blocks=1)
    with pytest.raises(CheckpointError, match=r"\d+ missing keys .*, \d+ unexpected keys \(model\.diffusion_model\."):
        load_model(config, str(TINY_CKPT))


def test_checkpoint_with_wrong_shapes(tmp_path):
    config = _tiny_config_with(tmp_path, context_dim=32)
    with pytest.raises(CheckpointError, match=r"tensors of the wrong shape .*attn2\.to_k\.weight \(64, 16\) vs \(64, 32\)"):
        load_model(config, str(TINY_CKPT))


def test_state_dict_of_tensors_required(tmp_path):
    path = tmp_path / "list.ckpt"
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="no state_dict"):
        load_model(str(TINY_CONFIG), str(path))


def test_unknown_config_key_is_an_error(tmp_path):
    config = OmegaConf.load(TINY_CONFIG)
    config.model.params.linear_strat = 0.1
    path = tmp_path / "typo.yaml"
    OmegaConf.save(config, path)
    with pytest.raises(TypeError, match="linear_strat"):
        load_model(str(path), str(TINY_CKPT))


def test_allow_pickle_tolerates_classes_of_missing_packages(tmp_path, tiny_state_dict):
    """Lightning checkpoints may pickle callbacks of packages this tool does not install."""
    import sys
    import types
    module = types.ModuleType("training_only_package")

    class Callback:
        def __init__(self):
            self.best = 1.0

    Callback.__module__ = module.__name__
    Callback.__qualname__ = "Callback"
    module.Callback = Callback
    sys.modules[module.__name__] = module
    path = tmp_path / "lightning.ckpt"
    try:
        torch.save({"state_dict": tiny_state_dict, "callbacks": {"cb": Callback()}}, path)
    finally:
        del sys.modules[module.__name__]
    with pytest.raises(CheckpointError, match="allow_pickle"):
        load_model(str(TINY_CONFIG), str(path))
    assert load_model(str(TINY_CONFIG), str(path), allow_pickle=True) is not None


def test_only_two_dimensional_unets_are_built():
    params = OmegaConf.to_container(OmegaConf.load(TINY_CONFIG).model.params.unet_config.params)
    with pytest.raises(NotImplementedError, match="only 2-D UNets"):
        UNetModel(**{**params, "dims": 3})
    assert isinstance(UNetModel(**params).input_blocks[3][0].op, torch.nn.Conv2d)  # the downsampling convolution


@pytest.mark.parametrize("config, name", [
    ("configs/latent-diffusion/cin256-v2.yaml", "cin256-v2"),
    ("models/digits32/config.yaml", "digits32"),
    ("config.yaml", None),              # the working directory's name
    ("models/digits32/config.yml", "digits32"),
    ("models/digits32/model.yaml", "model"),
])
def test_model_name_is_the_config_or_its_folder(config, name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert model_name(config) == (name or tmp_path.name)
