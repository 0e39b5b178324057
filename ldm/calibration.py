"""Key steps chosen from the model: how much the cached features change per step, and K steps that keep a cached
sampler closest to its solver.

A cache reuses features computed at a key (full) step for the steps after it, so the error of a group grows
with how much those features change across it. `feature_changes` runs the whole UNet at every step of a few
samples and measures, at each step i >= 1, the relative change of the cached feature from step i - 1:

    change[i] = mean over samples of ||f_i - f_(i-1)|| / ||f_(i-1)||   (change[0] = 0)

where f is the encoder output (every skip tensor and the middle block, flattened together) for FasterDiffusion
and the deep decoder feature for DeepCache. `choose_steps` picks K key steps, step 0 among them, that minimise
the largest change accumulated inside a group (the changes at the group's own key step are refreshed, not
accumulated), with an exact dynamic program; among the partitions that reach that minimum it takes the
smallest total, then the earliest steps.

Spreading the change evenly is not the same as spreading the error: on the shipped model it puts long groups
at the noisy start and scores a worse FID than evenly spaced steps. So `calibrate` measures what the cache
costs directly: the distance of the final latents sampled with the cache at given key steps from those of the
solver alone (same labels and noise; `deviation_objective`). Starting from the better of the change rule's
steps and evenly spaced ones, `search_steps` moves one key step at a time while that distance falls.

A calibration file (JSON) records the model, S, guidance, K, the steps, the change curve and the distances;
`--key_steps @FILE.json` and `--full_steps @FILE.json` read it, and `auto:K` computes the steps on the fly
with `auto_steps`.
"""
import numpy as np
import torch

from ldm.models.diffusion.caches import CACHES
from ldm.models.diffusion.modes import Mode, make_mode
from ldm.models.diffusion.steps import (AUTO, CalibrationError, auto_count,  # noqa: F401
                                        check_count, check_loop_indices, evenly_spaced, is_calibrated, read_steps)
from ldm.sampling import num_classes, sample_generators, sample_labels, sample_latents, unconditional_class
from ldm.util import autocast

CALIBRATION_SAMPLES = 4  # samples of the change curve (scripts/calibrate.py: --num_samples)
SEARCH_SAMPLES = 8  # samples of the distance that the search minimises (--search_samples)
CALIBRATION_SEED = 0
SEARCH_MOVES = (-1, 1, -2, 2)  # how far one key step may move in one try
SEARCH_SWEEPS = 3  # passes over the key steps


def calibrated_caches():
    """{cache name: the feature it reuses} of the caches that take calibrated steps."""
    return {name: cls.feature for name, cls in CACHES.items() if cls.steps_option is not None}


def choose_steps(change, k):
    """K loop indices, 0 first, minimising the largest accumulated change of a group (ties: smaller total).

    change[i] is the change from step i - 1 to step i (change[0] is ignored). Group [a, b) accumulates
    change[a + 1] + ... + change[b - 1].
    """
    change = np.asarray(change, dtype=np.float64)
    steps = len(change)
    check_count(k, steps)
    prefix = np.concatenate([[0.0], np.cumsum(change[1:])])  # prefix[i] = change[1] + ... + change[i]
    starts, ends = np.arange(steps)[:, None], np.arange(1, steps + 1)[None, :]
    cost = np.where(starts < ends, prefix[np.maximum(ends - 1, 0)] - prefix[starts], np.inf)  # cost[a, b - 1]
    # worst[g][b]: the least largest group cost covering steps 0..b-1 with g groups; then, within that bound,
    # total[g][b]: the least sum of group costs, and where its last group starts.
    worst = np.full(steps + 1, np.inf)
    worst[1:] = cost[0]
    for _ in range(k - 1):
        worst = np.concatenate([[np.inf], np.min(np.maximum(worst[:steps, None], cost), axis=0)])
    bound = worst[steps] * (1 + 1e-9) + 1e-12
    allowed = np.where(cost <= bound, cost, np.inf)
    total = np.full(steps + 1, np.inf)
    total[1:] = allowed[0]
    origins = []
    for _ in range(k - 1):
        candidates = total[:steps, None] + allowed
        origins.append(np.argmin(candidates, axis=0))  # the earliest start among equal sums
        total = np.concatenate([[np.inf], np.min(candidates, axis=0)])
    keys, end = [], steps
    for origin in reversed(origins):
        end = int(origin[end - 1])
        keys.append(end)
    return [0] + sorted(keys)


def group_costs(change, keys):
    """The accumulated change of each group of the key steps."""
    change = np.asarray(change, dtype=np.float64)
    bounds = list(keys) + [len(change)]
    return [float(change[a + 1:b].sum()) for a, b in zip(bounds, bounds[1:])]


def _relative_change(new, old):
    """Mean over rows of ||new - old|| / ||old|| (rows flattened)."""
    new, old = new.flatten(1).double(), old.flatten(1).double()
    return ((new - old).norm(dim=1) / old.norm(dim=1).clamp_min(1e-30)).mean().item()


def _feature(unet, feature, x, t, context, branch):
    """The feature a cache reuses, flattened per row."""
    if feature == "encoder":
        skips, mid = unet.encode(x, t, context)
        return torch.cat([s.flatten(1) for s in skips] + [mid.flatten(1)], dim=1)
    return unet.forward_deep(x, t, context, branch=branch)[1].flatten(1)


@torch.inference_mode()
def feature_changes(model, mode, steps, scale, feature, num_samples=CALIBRATION_SAMPLES, seed=CALIBRATION_SEED,
                    branch=0, precision="fp32"):
    """The change curve (one value per step) along the plain trajectories of the mode's solver.

    The samples have the labels and noise of sample indices 0..num_samples-1 of `seed` (ldm.sampling); with
    guidance the feature covers both branches, as the cache holds them.
    """
    features = set(calibrated_caches().values())
    if feature not in features:
        raise ValueError(f"feature must be one of {', '.join(sorted(features))}, not {feature!r}")
    plain = Mode(mode.sampler, None, mode.eta, mode.skip_type, mode.lower_order_final)
    indices = range(num_samples)
    labels = sample_labels(seed, indices, num_classes(model)).to(model.device)
    after = []  # (x after the step, the step's timestep), step by step

    def record(step, timestep, x, pred_x0):
        after.append((x, timestep))

    _, intermediates = sample_latents(model, labels, steps, scale, generators=sample_generators(seed, indices),
                                      precision=precision, mode=plain, step_callback=record)
    xs = [intermediates["x_inter"][0]] + [x for x, _ in after[:-1]]  # the input of every step, x_T first
    ts = [t for _, t in after]
    context = model.get_learned_conditioning({model.cond_stage_key: labels})
    if scale != 1.0:
        uncond = model.get_learned_conditioning(
            {model.cond_stage_key: torch.full_like(labels, unconditional_class(model))})
        context = torch.cat([uncond, context])
    unet = model.model.diffusion_model
    change, previous = [0.0], None
    for x, t in zip(xs, ts):
        rows = torch.cat([x, x]) if scale != 1.0 else x
        t_rows = torch.full((len(rows),), t, device=model.device)  # long for DDIM/PLMS, float for DPM-Solver++
        with autocast(precision, model.device):
            current = _feature(unet, feature, rows, t_rows, context, branch).float()
        if previous is not None:
            change.append(_relative_change(current, previous))
        previous = current
    return change


@torch.inference_mode()
def deviation_objective(model, mode, cached, steps, scale, num_samples=SEARCH_SAMPLES, seed=CALIBRATION_SEED,
                        precision="fp32"):
    """distance(keys): the mean over samples of ||x - x_solver|| / ||x_solver||, where x are the final latents
    sampled with cached(keys) (a Mode: the solver with its cache at those steps) and x_solver those of the
    solver `mode` alone, for the labels and noise of sample indices 0..num_samples-1 of `seed`. Memoised."""
    indices = range(num_samples)
    labels = sample_labels(seed, indices, num_classes(model))

    def final_latents(sampling_mode):
        x, _ = sample_latents(model, labels, steps, scale, generators=sample_generators(seed, indices),
                              precision=precision, mode=sampling_mode)
        return x.flatten(1).double()

    reference = final_latents(Mode(mode.sampler, None, mode.eta, mode.skip_type, mode.lower_order_final))
    known = {}

    def distance(keys):
        keys = tuple(int(i) for i in keys)
        if keys not in known:
            x = final_latents(cached(keys))
            known[keys] = ((x - reference).norm(dim=1) / reference.norm(dim=1).clamp_min(1e-30)).mean().item()
        return known[keys]

    return distance


def search_steps(distance, starts, steps, moves=SEARCH_MOVES, sweeps=SEARCH_SWEEPS):
    """From the start with the least distance, move one key step (never step 0) at a time by one of `moves`,
    keeping a move that lowers the distance, for up to `sweeps` passes; returns (steps, distance)."""
    keys = list(min(starts, key=distance))
    best = distance(keys)
    for _ in range(sweeps):
        improved = False
        for i in range(1, len(keys)):
            low, high = keys[i - 1], keys[i + 1] if i + 1 < len(keys) else steps
            for move in moves:
                candidate = keys[:i] + [keys[i] + move] + keys[i + 1:]
                if not low < candidate[i] < high:
                    continue
                value = distance(candidate)
                if value < best:
                    keys, best, improved = candidate, value, True
                    break
        if not improved:
            break
    return keys, best


def cached_at(mode, cache, **options):
    """cached(steps): the Mode of the solver `mode` with the cache (a calibrated_caches name) and its options, its key or
    full steps at `steps`."""
    def cached(steps):
        return make_mode(mode.sampler, cache, mode.eta, mode.skip_type, mode.lower_order_final, **options,
                         **{CACHES[cache].steps_option: list(steps)})

    return cached


def calibrate(model, mode, cached, steps, scale, feature, k, branch=0, precision="fp32",
              num_samples=CALIBRATION_SAMPLES, search_samples=SEARCH_SAMPLES, seed=CALIBRATION_SEED):
    """K steps for the cache: the change curve, the change rule's steps and evenly spaced ones, and the steps the
    search finds from the better of them, with the distance of each (see the module docstring)."""
    check_count(k, steps)
    change = feature_changes(model, mode, steps, scale, feature, num_samples, seed, branch, precision)
    distance = deviation_objective(model, mode, cached, steps, scale, search_samples, seed, precision)
    change_steps, even = choose_steps(change, k), evenly_spaced(steps, k)
    chosen, _ = search_steps(distance, [even, change_steps], steps)
    return {"steps": chosen, "change": change, "change_steps": change_steps, "uniform_steps": even,
            "distance": {"steps": distance(chosen), "change_steps": distance(change_steps),
                         "uniform_steps": distance(even)}}


def auto_steps(model, spec, mode, cached, steps, scale, feature, branch=0, precision="fp32"):
    """The steps of 'auto:K', calibrated now on the model (`calibrate`); cached(keys) is the solver `mode` with
    its cache at those steps."""
    k = auto_count(spec, steps)
    return calibrate(model, mode, cached, steps, scale, feature, k, branch, precision)["steps"]


