"""--batch_size auto: the search, and the probe of the calls that need the most memory, with a fake memory budget
(the probes run for real on the tiny model on the CPU; their memory is a function of the rows they ran)."""
import os

import pytest
import torch

from ldm.autobatch import auto_batch_size, largest_batch, largest_calls, use_expandable_segments
from ldm.models.diffusion.modes import parse_mode


class Fits:
    """fits(b) = b <= top, counting the calls."""

    def __init__(self, top):
        self.top, self.calls = top, []

    def __call__(self, batch_size):
        self.calls.append(batch_size)
        return batch_size <= self.top


@pytest.mark.parametrize("top", [1, 2, 3, 7, 8, 9, 100, 255, 256, 1000])
def test_largest_batch_finds_the_boundary_in_few_probes(top):
    fits = Fits(top)
    assert largest_batch(fits, limit=256) == min(top, 256)
    assert len(fits.calls) <= 2 * 8 + 1  # doubling to 256, then bisection
    assert max(fits.calls) <= 256


def test_largest_batch_when_nothing_fits_or_no_room():
    assert largest_batch(Fits(0), limit=64) == 0
    assert largest_batch(Fits(10), limit=0) == 0
    assert largest_batch(Fits(10), limit=5) == 5


def test_an_error_out_of_memory_counts_as_not_fitting(tiny_model):
    def peak(batch_size):
        return None if batch_size > 6 else 10 * batch_size
    mode = parse_mode("ddim")
    assert auto_batch_size(tiny_model, mode, 10, True, "fp32", 64, peak_bytes=peak, budget_bytes=1e9) == 6
    assert auto_batch_size(tiny_model, mode, 10, True, "fp32", 64, peak_bytes=peak, budget_bytes=35) == 3


def probed_batch(model, spec, budget_rows, steps=20, guided=True, precision="fp32", limit=16):
    """auto_batch_size with memory = the rows of the largest UNet call that the probe ran on the tiny model."""
    mode = parse_mode(spec)

    def peak(batch_size):
        return largest_calls(model, mode, steps, batch_size, guided, precision)

    return auto_batch_size(model, mode, steps, guided, precision, limit, peak_bytes=peak, budget_bytes=budget_rows)


@torch.inference_mode()
def test_fasterdiffusion_largest_group_decides(tiny_model):
    # 20 steps, key steps every 5: groups of 5 steps, 2 rows per sample with guidance -> 10 rows per sample
    assert probed_batch(tiny_model, "ddim", budget_rows=24) == 12
    assert probed_batch(tiny_model, "ddim+fd:uniform:5", budget_rows=24) == 2
    assert probed_batch(tiny_model, "ddim+fd:uniform:5", budget_rows=24, guided=False) == 4
    assert probed_batch(tiny_model, "ddim+fd:0,1,2,10", budget_rows=24) == 1  # the group of 10 steps
    assert probed_batch(tiny_model, "ddim+deepcache:3", budget_rows=24) == 12
    assert probed_batch(tiny_model, "dpmpp2m+fd:uniform:5", budget_rows=24, precision="bf16") == 2


@torch.inference_mode()
def test_max_decoder_batch_bounds_the_largest_call(tiny_model):
    mode = parse_mode("ddim+fd:0,1,2,10", max_decoder_batch=8)
    assert largest_calls(tiny_model, mode, 20, 1, True, "fp32") == 8  # 4 steps of 2 rows per call
    assert largest_calls(tiny_model, mode, 20, 3, True, "fp32") == 6  # one step of 6 rows: no fewer


def test_expandable_segments_are_the_default_and_a_user_setting_wins(monkeypatch):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    use_expandable_segments()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    use_expandable_segments()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"
