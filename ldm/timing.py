"""Timings that hold on a shared machine: runs taken in turn over repeats (A B C A B C ...), medians of the repeats,
and one line that says when the repeats spread too far for the times to rank the runs.

Another job on the machine slows whatever runs beside it: in turn, every run meets the same load; the median of a
run's repeats drops the odd slow one; and where the load came and went, its repeats spread ((max - min) / median).
Two runs rank when every repeat of one is faster than every repeat of the other; where their repeats overlap (one
repeat may even rank them one way and another the other), their order is within the noise, which
`Timings.verdict` says.
"""
import statistics
import time
from dataclasses import dataclass

import torch

SPREAD_LIMIT = 0.2  # (max - min) / median of a run's repeats above which the verdict calls its time uncertain
LISTED_PAIRS = 3  # the unranked pairs a verdict names; it counts the others


def device_clock(device):
    """A clock for runs on the device: wall-clock seconds after the device has finished its queued work."""
    device = torch.device(device)

    def clock():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()
    return clock


def alternate(runs, repeats, clock=time.perf_counter):
    """Call each of runs ({name: fn}) once a repeat, in turn (A B C A B C ...), each call timed with clock;
    returns (Timings, {name: what fn returned last})."""
    seconds = {name: [] for name in runs}
    results = {}
    for _ in range(repeats):
        for name, run in runs.items():
            start = clock()
            results[name] = run()
            seconds[name].append(clock() - start)
    return Timings(seconds), results


@dataclass
class Timings:
    """Seconds of each named run, one a repeat, in the order the repeats were taken (the runs in turn); groups (name
    -> key), where given, ranks runs only against the others of their group (frontier.py: of their guidance)."""
    seconds: dict
    groups: dict = None

    @property
    def repeats(self):
        return min(len(s) for s in self.seconds.values())

    def median(self, name):
        return statistics.median(self.seconds[name])

    def spread(self, name):
        """(max - min) / median of the run's repeats: 0 with one repeat."""
        s = self.seconds[name]
        return (max(s) - min(s)) / statistics.median(s)

    def noisy(self, limit=SPREAD_LIMIT):
        """The runs whose repeats spread by more than limit, widest first."""
        return sorted((name for name in self.seconds if self.spread(name) > limit), key=self.spread, reverse=True)

    def unranked(self):
        """Pairs of runs (in their order) whose repeats overlap: neither has every repeat faster than all the other's,
        so their order is within the noise (as it is when one repeat ranks them one way and another the other)."""
        names, group = list(self.seconds), (self.groups or {}).get
        return [(a, b) for i, a in enumerate(names) for b in names[i + 1:] if group(a) == group(b)
                and min(self.seconds[a]) <= max(self.seconds[b]) and min(self.seconds[b]) <= max(self.seconds[a])]

    def rankable(self):
        """Whether the medians rank the runs: no two runs' repeats overlap (None with one repeat: nothing to judge
        by)."""
        return None if self.repeats < 2 else not self.unranked()

    def verdict(self, limit=SPREAD_LIMIT):
        """One line: how far the repeats spread and whether they rank the runs, or which runs they cannot rank."""
        if self.repeats < 2:
            return "one timed run of each: no spread between repeats to judge the ranking by"
        head = f"median of {self.repeats} repeats taken in turn"
        widest, noisy, pairs = max(self.seconds, key=self.spread), self.noisy(limit), self.unranked()
        if len(noisy) == 1:
            noise = (f"the repeats of {widest} spread by {self.spread(widest):.0%} of their median (more than "
                     f"{limit:.0%}): its time is uncertain")
        else:
            noise = (f"the repeats of {len(noisy)} runs spread by more than {limit:.0%} of their median (widest: "
                     f"{widest}, {self.spread(widest):.0%}): their times are uncertain")
        if not pairs:
            if not noisy:
                return f"{head}; they spread by at most {self.spread(widest):.0%} ({widest}), and rank the runs"
            return f"{head}; they rank the runs, but {noise}"
        named = ", ".join(f"{a} and {b}" for a, b in pairs[:LISTED_PAIRS])
        more = f" and {len(pairs) - LISTED_PAIRS} more pairs" if len(pairs) > LISTED_PAIRS else ""
        return (f"cannot rank them all ({head}): the repeats of {named}{more} overlap, so their order is within the "
                "noise" + (f"; {noise}" if noisy else "") + "; rerun with the machine to itself")

    def record(self, limit=SPREAD_LIMIT):
        """The timings for a JSON record: seconds of every repeat, medians, spreads and the verdict."""
        return {"repeats": self.repeats, "spread_limit": limit, "rankable": self.rankable(),
                "verdict": self.verdict(limit),
                "runs": {name: {"seconds": s, "median": self.median(name), "spread": self.spread(name)}
                         for name, s in self.seconds.items()},
                "unranked": [list(pair) for pair in self.unranked()]}
