"""The MPI world of a sampling run (or a one-process stand-in) and the few collective steps the script needs."""
import os
import sys
import time

import torch


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


def usable_cpus():
    """The CPU cores this process may run on (all of the machine's where the OS cannot say, as on macOS)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def share_cpu_threads(comm):
    """Split this node's CPU cores between its processes, unless OMP_NUM_THREADS says otherwise."""
    if comm.size > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, usable_cpus() // comm.local_size()))
