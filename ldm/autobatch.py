"""`--batch_size auto`: the largest batch whose sampling fits the GPU's free memory, found by a short probe.

A probe at batch b runs once each kind of UNet call of the sampling mode (`Mode.unet_calls`; of decoder calls the
one of most steps), then the VQ decoding of b latents (`largest_calls`), which runs in chunks of
`ldm.sampling.DECODE_BATCH` images, so that the UNet's calls decide. `largest_batch` searches b by doubling, then
bisection, so a few probes suffice. The probe measures allocated memory; `use_expandable_segments`
keeps the allocator's fragmentation from eating the difference (on an H100, FasterDiffusion at the probed batch
ran out of memory with 20 GiB reserved but unallocated before it).
"""
import os

import torch

from ldm.compile import decoder_call_steps, run_each_call
from ldm.models.diffusion.guidance import unet_rows
from ldm.sampling import decode_latents

AUTO_BATCH = "auto"
MEMORY_FRACTION = 0.9  # of the free memory: the rest is headroom for the allocator's fragmentation
ALLOCATOR_SETTINGS = "expandable_segments:True"


def use_expandable_segments():
    """CUDA's caching allocator with segments that grow in place (PyTorch's remedy for fragmentation), unless
    PYTORCH_CUDA_ALLOC_CONF is set; takes effect only before the first CUDA allocation."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", ALLOCATOR_SETTINGS)


def largest_batch(fits, limit):
    """The largest b in 1..limit with fits(b), for fits true up to some b and false above; 0 if fits(1) fails."""
    if limit < 1 or not fits(1):
        return 0
    low, high = 1, 2  # fits(low); high is untried
    while high <= limit and fits(high):
        low, high = high, 2 * high
    high = min(high, limit + 1)  # fits(high) failed, or high is past the limit
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def largest_calls(model, mode, num_steps, batch_size, guided, precision):
    """Run the mode's most memory-hungry UNet calls and the VQ decoding at this batch size; returns the rows of
    the largest UNet call."""
    rows = unet_rows(batch_size, guided)
    decoder = decoder_call_steps(mode, num_steps, rows)
    steps = (max(decoder),) if decoder else ()
    run_each_call(model, [mode], num_steps, rows, precision, steps)
    latents = torch.zeros(batch_size, model.channels, model.image_size, model.image_size, device=model.device)
    decode_latents(model, latents, precision)
    return rows * max(steps, default=1)


def cuda_peak_bytes(model, mode, num_steps, guided, precision):
    """peak(b): the memory that largest_calls needs at batch b beyond what is allocated before (CUDA's allocator
    statistics); None if the GPU ran out of memory."""
    device = model.device

    def peak(batch_size):
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        try:
            largest_calls(model, mode, num_steps, batch_size, guided, precision)
            torch.cuda.synchronize(device)
        except torch.OutOfMemoryError:
            return None
        finally:
            torch.cuda.empty_cache()
        return torch.cuda.max_memory_allocated(device) - before

    return peak


def fits_within(peak_bytes, budget_bytes):
    """fits(b): peak_bytes(b) is known (no out-of-memory error) and at most budget_bytes."""
    def fits(batch_size):
        peak = peak_bytes(batch_size)
        return peak is not None and peak <= budget_bytes
    return fits


def auto_batch_size(model, mode, num_steps, guided, precision, limit, peak_bytes=None, budget_bytes=None):
    """The largest batch size up to limit whose probe fits: by default the CUDA peak within MEMORY_FRACTION of the
    GPU's free memory. peak_bytes and budget_bytes replace them (e.g. to test the search on the CPU)."""
    if peak_bytes is None:
        peak_bytes = cuda_peak_bytes(model, mode, num_steps, guided, precision)
    if budget_bytes is None:  # memory cached by earlier work counts as free: the probe's empty_cache frees it
        torch.cuda.synchronize(model.device)
        torch.cuda.empty_cache()
        budget_bytes = MEMORY_FRACTION * torch.cuda.mem_get_info(model.device)[0]
    return largest_batch(fits_within(peak_bytes, budget_bytes), limit)
