"""ldm.timing on a scripted clock: runs taken in turn, medians, spreads and the verdict on whether they rank; and
ldm.distributed's CPU threads on a shared machine: passive OpenMP waits, no more threads than usable cores."""
import json
import os
import subprocess
import sys

import pytest
import torch

from ldm import distributed
from ldm.timing import SPREAD_LIMIT, Timings, alternate


class ScriptedClock:
    """A clock for ldm.timing.alternate whose timed calls take the given seconds, in the order they are made."""

    def __init__(self, durations):
        self.durations = list(durations)
        self.now, self.calls = 0.0, 0

    def __call__(self):
        if self.calls % 2:  # the end of a timed call
            self.now += self.durations.pop(0)
        self.calls += 1
        return self.now


def test_runs_are_taken_in_turn_and_timed_each():
    order = []
    runs = {name: (lambda name=name: order.append(name) or name.lower()) for name in "ABC"}
    timings, results = alternate(runs, 3, ScriptedClock([1, 2, 3, 1.5, 2.5, 3.5, 0.5, 1.5, 2.5]))
    assert order == list("ABCABCABC")
    assert results == {"A": "a", "B": "b", "C": "c"}
    assert timings.seconds == {"A": [1, 1.5, 0.5], "B": [2, 2.5, 1.5], "C": [3, 3.5, 2.5]}
    assert (timings.repeats, timings.median("A"), timings.median("C")) == (3, 1, 3)


def test_steady_repeats_rank_the_runs():
    timings = Timings({"DDIM": [2.0, 2.1, 2.05], "DDIM + FD": [0.5, 0.52, 0.51]})
    assert timings.spread("DDIM") == pytest.approx(0.1 / 2.05)
    assert timings.noisy() == [] and timings.unranked() == [] and timings.rankable() is True
    assert timings.verdict() == "median of 3 repeats taken in turn; they spread by at most 5% (DDIM), and rank the runs"


def test_a_wide_spread_that_still_ranks_makes_a_time_uncertain():
    """One slow repeat (another job started) moves the median little; the runs still rank, but not its time."""
    timings = Timings({"DDIM": [2.0, 6.0, 2.1], "DDIM + FD": [0.5, 0.55, 0.5]})
    assert timings.median("DDIM") == 2.1 and timings.noisy() == ["DDIM"] and timings.rankable() is True
    assert timings.verdict() == ("median of 3 repeats taken in turn; they rank the runs, but the repeats of DDIM spread "
                                 f"by 190% of their median (more than {SPREAD_LIMIT:.0%}): its time is uncertain")
    assert Timings({"A": [1.0, 1.3, 1.0]}).noisy(limit=0.5) == []


def test_runs_whose_repeats_overlap_cannot_be_ranked():
    """A's and B's repeats overlap (and swap places); C is slower than both in every repeat; D overlaps A and B."""
    timings = Timings({"A": [1.0, 1.1, 1.0], "B": [1.05, 1.0, 1.08], "C": [3.0, 3.0, 3.1], "D": [1.07, 1.2, 1.15]})
    assert timings.noisy() == [] and timings.unranked() == [("A", "B"), ("A", "D"), ("B", "D")]
    assert timings.rankable() is False
    assert timings.verdict() == ("cannot rank them all (median of 3 repeats taken in turn): the repeats of A and B, A "
                                 "and D, B and D overlap, so their order is within the noise; rerun with the machine "
                                 "to itself")
    many = Timings({name: [1.0 + 0.01 * k, 1.5 - 0.01 * k] for k, name in enumerate("ABCD")})
    assert many.verdict() == ("cannot rank them all (median of 2 repeats taken in turn): the repeats of A and B, A "
                              "and C, A and D and 3 more pairs overlap, so their order is within the noise; the "
                              "repeats of 4 runs spread by more than 20% of their median (widest: A, 40%): their "
                              "times are uncertain; rerun with the machine to itself")


def test_runs_are_ranked_only_within_their_group():
    """frontier.py's modes at two guidances: equal costs across guidances are not a ranking to doubt."""
    seconds = {"ddim g1.5": [1.0, 1.1], "ddim g3": [1.05, 1.0], "fd g1.5": [0.5, 0.55], "fd g3": [0.52, 0.5]}
    assert Timings(seconds).unranked() == [("ddim g1.5", "ddim g3"), ("fd g1.5", "fd g3")]
    assert Timings(seconds, groups={name: name.split()[1] for name in seconds}).rankable() is True


def test_one_repeat_has_no_spread_to_judge_by():
    timings = Timings({"A": [1.0], "B": [2.0]})
    assert timings.spread("A") == 0 and timings.rankable() is None
    assert timings.verdict() == "one timed run of each: no spread between repeats to judge the ranking by"


def test_record_is_json_and_says_the_verdict():
    timings = Timings({"A": [1.0, 1.1, 1.0], "B": [1.05, 1.0, 1.08]})
    record = json.loads(json.dumps(timings.record()))
    assert record["repeats"] == 3 and record["rankable"] is False and record["unranked"] == [["A", "B"]]
    assert record["runs"]["B"] == {"seconds": [1.05, 1.0, 1.08], "median": 1.05,
                                   "spread": pytest.approx(0.08 / 1.05)}
    assert record["verdict"] == timings.verdict() and record["spread_limit"] == SPREAD_LIMIT


@pytest.mark.parametrize("files, cpus", [({"cpu.max": "150000 100000\n"}, 2), ({"cpu.max": "max 100000\n"}, None),
                                         ({"cpu/cpu.cfs_quota_us": "200000", "cpu/cpu.cfs_period_us": "100000"}, 2),
                                         ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None),
                                         ({}, None)])
def test_the_containers_cpu_quota(files, cpus, tmp_path):
    """cgroup v2's cpu.max or v1's quota and period, rounded up to whole CPUs; None without a quota."""
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    assert distributed.cgroup_cpu_limit(str(tmp_path)) == cpus


def test_usable_cpus_are_within_affinity_and_quota(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)), raising=False)
    monkeypatch.setattr(distributed, "cgroup_cpu_limit", lambda: None)
    assert distributed.usable_cpus() == 6
    monkeypatch.setattr(distributed, "cgroup_cpu_limit", lambda: 2)
    assert distributed.usable_cpus() == 2


@pytest.mark.parametrize("usable, before, after", [(1, 2, 1), (8, 2, 2), (2, 1, 1)])
def test_one_process_gets_no_more_threads_than_usable_cores(usable, before, after, monkeypatch):
    """share_cpu_threads() lowers torch's threads to the usable cores, never raises them, and leaves them to
    OMP_NUM_THREADS when it is set."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(distributed, "usable_cpus", lambda: usable)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(before)
        distributed.share_cpu_threads()
        assert torch.get_num_threads() == after
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        torch.set_num_threads(before)
        distributed.share_cpu_threads()
        assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("env, said", [({}, "True PASSIVE"), ({"OMP_WAIT_POLICY": "ACTIVE"}, "False ACTIVE"),
                                       ({"GOMP_SPINCOUNT": "1000"}, "False None")])
@pytest.mark.slow
def test_passive_waits_are_set_before_torch_unless_the_user_chose(env, said):
    code = ("import os, sys; from ldm.distributed import passive_cpu_waits; assert 'torch' not in sys.modules; "
            "print(passive_cpu_waits(), os.environ.get('OMP_WAIT_POLICY'))")
    clean = {k: v for k, v in os.environ.items() if k not in distributed.WAIT_SETTINGS}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            env={**clean, **env})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == said


def test_passive_waits_do_nothing_once_torch_is_loaded(monkeypatch):
    """OpenMP has read its wait policy by then: setting it would only mislead."""
    for name in distributed.WAIT_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    assert distributed.passive_cpu_waits() is False and "OMP_WAIT_POLICY" not in os.environ
