"""Adaptive DeepCache: each sample decides at each step whether to run the whole UNet or only its shallow branch,
from how far the output of the UNet's first block has moved since the sample's last full step (as
AdaptiveDiffusion, TeaCache and FirstBlockCache decide online instead of on a fixed schedule).

At step i after a sample's last full step a, with p the probe (by default the output of input block 0, which the
shallow branch computes anyway) on the step's input, both guidance rows of the sample:

    d = mean |p(i) - p(a)| / mean |p(a)|,

and the sample takes the whole UNet when d > adaptive (delta) or i - a >= max_interval, else the shallow branch
against its own deep features of step a. Step 0 runs the whole UNet. Both passes begin with input block 0, so they take
the probe's output instead of computing it again. The decisions are per sample, so a sample's
result does not depend on the batch it is sampled in, nor on the number of processes.

An `AdaptiveDeepCache` object is a cache plan handed to a sampler (`cache=`); it holds no tensors.
"""
from collections import Counter

import torch

from ldm.models.diffusion.cache import Cache, Strategy, UNetCall
from ldm.models.diffusion.options import Option, OptionError, fits_float32, non_negative_float, whole_number

PROBES = ("first_block", "input")  # the output of input block 0, or the step's input itself


class AdaptiveDeepCache(Cache):
    """DeepCache whose full steps each sample chooses while sampling.

    adaptive: delta, the relative change of the probe above which a sample runs the whole UNet (0: every step).
    max_interval: at most this many steps between a sample's full steps (None: no limit).
    branch: the shallow branch's depth, as DeepCache's.
    probe: what is compared: "first_block" (the output of input block 0) or "input" (the step's input x).
    """
    name = "adaptive"
    title = "Adaptive DeepCache"
    options = (
        Option("adaptive", non_negative_float,
               help="run a sample's whole UNet when its first block's output has changed by more than this "
                    "(mean |p(i) - p(a)| / mean |p(a)|) since its last full step",
               owner_reason="adaptive refresh decides at each step while sampling, and FasterDiffusion must know "
                            "its key steps before it decodes a group's steps together"),
        Option("max_interval", whole_number, help="at most this many steps between a sample's full steps"),
        Option("branch", whole_number, help="shallow branch depth (0 = DeepCache's LDM setting)"),
        Option("probe", str, choices=PROBES, help="what the change is measured on (default first_block)"),
    )
    main_option = "adaptive"

    def __init__(self, adaptive, max_interval=None, branch=0, probe="first_block"):
        if isinstance(adaptive, bool) or not isinstance(adaptive, (int, float)) or not fits_float32(adaptive) \
                or adaptive < 0:
            raise ValueError(f"adaptive must be a finite number of at least 0, not {adaptive!r}")
        if max_interval is not None and (isinstance(max_interval, bool) or not isinstance(max_interval, int)
                                         or max_interval < 1):
            raise ValueError(f"max_interval must be a number of steps of at least 1, not {max_interval!r}")
        if isinstance(branch, bool) or not isinstance(branch, int) or branch < 0:
            raise ValueError(f"branch must be a non-negative integer, not {branch!r}")
        if probe not in PROBES:
            raise ValueError(f"probe must be one of {', '.join(PROBES)}, not {probe!r}")
        self.adaptive, self.max_interval, self.branch, self.probe = float(adaptive), max_interval, branch, probe

    def label(self):
        limit = f" max {self.max_interval}" if self.max_interval is not None else ""
        probe = f" probe {self.probe}" if self.probe != "first_block" else ""
        return f"DeepCache adaptive {self.adaptive:g}{limit}{probe}" + (f" branch {self.branch}" if self.branch else "")

    def check_unet(self, unet):
        try:
            unet.check_branch(self.branch)
        except ValueError as e:
            raise OptionError("branch", str(e)) from None

    def unet_calls(self, num_steps, rows):
        """At most: the decisions are made while sampling (the stats count what ran), so this is the costliest
        schedule, a full pass at every step, and the shallow branch that any step may take instead."""
        return Counter({UNetCall("forward_deep", branch=self.branch): num_steps,
                        UNetCall("forward_shallow", branch=self.branch): 0})

    def bind(self, calls, guidance, timesteps, x_T):
        calls.check_splittable(guidance, "Adaptive DeepCache")
        calls.unet.check_branch(self.branch)
        return _AdaptiveRun(self, calls, guidance, timesteps, len(x_T))


class _AdaptiveRun(Strategy):
    """Per sample: the probe and the deep features of its last full step, and the loop index of that step."""

    def __init__(self, plan, calls, guidance, timesteps, batch):
        self.plan, self.calls, self.guidance, self.timesteps, self.batch = plan, calls, guidance, timesteps, batch
        self.copies = 2 if guidance.guided else 1  # the UNet rows of a sample: row b, and b + batch with guidance
        self.reference = self.deep = self.last_full = None
        calls.stats.sample_full_steps = [0] * batch
        calls.stats.sample_shallow_steps = [0] * batch

    def __call__(self, x, i):
        g, plan = self.guidance, self.plan
        x_in = g.rows(x)
        t = self.timesteps[i].expand(len(x_in))
        first = self.calls.first_block(x_in, t, g.context) if plan.probe == "first_block" else None
        probe = x_in if first is None else first
        full = self.refresh(probe, i)
        rows, shallow = self.rows_of(full), self.rows_of(~full)
        if not len(shallow):  # every sample takes the same pass: no rows to gather or scatter
            out = self.full_pass(full, rows, x_in, t, first, probe, i)
        elif not len(rows):
            out = self.calls.forward_shallow(x_in, self.deep, t, g.context, plan.branch, first)
        else:  # both passes begin with the probe's block: they take its output
            out = torch.empty_like(x_in, dtype=torch.float32)
            out[rows] = self.full_pass(full, rows, *_take((x_in, t, first), rows), probe, i)
            x_s, t_s, first_s, deep_s = _take((x_in, t, first, self.deep), shallow)
            out[shallow] = self.calls.forward_shallow(x_s, deep_s, t_s, _take((g.context,), shallow)[0], plan.branch,
                                                      first_s)
        stats = self.calls.stats
        for b, is_full in enumerate(full.tolist()):
            (stats.sample_full_steps if is_full else stats.sample_shallow_steps)[b] += 1
        return g.combine(out)

    def full_pass(self, full, rows, x, t, first, probe, i):
        """The whole UNet on the rows of the samples marked in `full`, keeping what their later steps compare with."""
        context = _take((self.guidance.context,), rows)[0]
        out, deep = self.calls.forward_deep(x, t, context, self.plan.branch, first)
        self.keep(full, rows, probe, deep, i)
        return out

    def refresh(self, probe, i):
        """Which samples take the whole UNet at step i (a bool per sample)."""
        if self.reference is None:
            return torch.ones(self.batch, dtype=torch.bool, device=probe.device)
        change = (probe.float() - self.reference).abs_().flatten(1).mean(1)
        scale = self.reference.abs().flatten(1).mean(1)
        moved = self.per_sample(change) > self.plan.adaptive * self.per_sample(scale)
        if self.plan.max_interval is not None:
            moved |= (i - self.last_full) >= self.plan.max_interval
        return moved

    def per_sample(self, row_values):
        """Row values summed over each sample's rows (both guidance rows)."""
        return row_values.view(self.copies, self.batch).sum(0)

    def keep(self, full, rows, probe, deep, i):
        """Store the probe and deep features of the samples that just ran the whole UNet."""
        if len(rows) == len(probe):  # every sample: keep the tensors themselves
            self.reference, self.deep = probe.float(), deep
            self.last_full = torch.full((self.batch,), i, dtype=torch.long, device=probe.device)
            return
        self.reference[rows] = probe[rows].float()
        self.deep[rows] = deep
        self.last_full[full] = i

    def rows_of(self, samples):
        """The UNet rows (both guidance rows) of the samples marked in a bool per sample."""
        index = samples.nonzero().flatten()
        return torch.cat([index + k * self.batch for k in range(self.copies)])


def _take(tensors, rows):
    """The rows of each tensor (None stays None); all of them: the tensors themselves, uncopied."""
    if all(t is None or len(rows) == len(t) for t in tensors):
        return tensors
    return tuple(None if t is None else t[rows] for t in tensors)
