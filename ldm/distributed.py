"""The MPI world of a sampling run (or a one-process stand-in), the few collective steps the script needs, and the
CPU threads of each process.

This module does not import torch when it is imported: `passive_cpu_waits()` must run before torch loads its
OpenMP runtime, which reads the wait policy once, as it loads.
"""
import math
import os
import sys
import time


class Comm:
    """The MPI world, or a stand-in when there is one process or mpi4py is missing."""

    def __init__(self):
        try:
            from mpi4py import MPI
            world = MPI.COMM_WORLD if MPI.COMM_WORLD.Get_size() > 1 else None
        except (ImportError, RuntimeError):
            world = None
        self.world = world
        self.rank = world.Get_rank() if world else 0
        self.size = world.Get_size() if world else 1

    def bcast(self, obj):
        return self.world.bcast(obj, root=0) if self.world else obj

    def gather(self, obj):
        return self.world.gather(obj, root=0) if self.world else [obj]

    def allgather(self, obj):
        return self.world.allgather(obj) if self.world else [obj]

    def wait_all(self, poll=None, interval=0.2):
        """Barrier that sleeps instead of spinning (ranks may wait long); calls poll() while waiting."""
        if not self.world:
            return
        request = self.world.Ibarrier()
        while not request.Test():
            if poll:
                poll()
            time.sleep(interval)

    def local_size(self):
        """Number of processes on this node."""
        if not self.world:
            return 1
        from mpi4py import MPI
        return self.world.Split_type(MPI.COMM_TYPE_SHARED).Get_size()

    def abort(self, code):
        """End every process now with this exit status (one process: just exit)."""
        sys.stdout.flush()
        sys.stderr.flush()
        if self.world:
            self.world.Abort(code)
        sys.exit(code)


def first_error(comm, errors):
    """Called by all ranks together with their errors (None for none): the first one, the same on every rank."""
    return next((e for e in comm.allgather(errors) if e), None)


# Environment variables with which the user chose how OpenMP threads wait (GNU's libgomp, LLVM's and Intel's libomp)
WAIT_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def _read_fields(path):
    """The whitespace-separated fields of a small text file; [] where it cannot be read."""
    try:
        with open(path) as f:
            return f.read().split()
    except OSError:
        return []


def cgroup_cpu_limit(root="/sys/fs/cgroup"):
    """The CPUs that this container's CPU quota allows, rounded up (cgroup v2 cpu.max "QUOTA PERIOD", or v1
    cpu.cfs_quota_us and cpu.cfs_period_us); None where there is no quota or no file says."""
    v2 = _read_fields(os.path.join(root, "cpu.max"))
    v1 = _read_fields(os.path.join(root, "cpu", "cpu.cfs_quota_us")) + \
        _read_fields(os.path.join(root, "cpu", "cpu.cfs_period_us"))
    fields = v2 if len(v2) == 2 else v1
    try:
        quota, period = int(fields[0]), int(fields[1])
    except (IndexError, ValueError):  # no file, or "max": no quota
        return None
    return max(1, math.ceil(quota / period)) if quota > 0 and period > 0 else None


def usable_cpus():
    """The CPU cores this process may run on (all of the machine's where the OS cannot say, as on macOS), no more
    than its container's CPU quota allows."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(cpus, cgroup_cpu_limit() or cpus)


def passive_cpu_waits():
    """OpenMP threads that sleep, not spin, between parallel regions, unless the user chose (OMP_WAIT_POLICY,
    GOMP_SPINCOUNT, KMP_BLOCKTIME): spinning threads take the cores that other jobs, and this process's own threads,
    need, and sampling beside another job ran many times slower. Call it before torch is imported: OpenMP reads
    the setting once, as torch loads it; afterwards it does nothing. Returns whether it set the policy."""
    if "torch" in sys.modules or any(name in os.environ for name in WAIT_SETTINGS):
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


def share_cpu_threads(comm=None):
    """Torch's threads: this node's usable CPU cores split between its processes (comm: the MPI world; None, one
    process), and for one process never more than the cores it may use; unless OMP_NUM_THREADS says otherwise."""
    import torch

    if "OMP_NUM_THREADS" in os.environ:
        return
    processes = comm.local_size() if comm is not None and comm.size > 1 else 1
    threads = max(1, usable_cpus() // processes)
    if processes > 1 or threads < torch.get_num_threads():
        torch.set_num_threads(threads)
