"""Sample a class-conditional LDM (a solver and a cache: DDIM, PLMS, DPM-Solver++; FasterDiffusion, DeepCache) into an
ADM-format .npz.

    python scripts/image_sample.py [flags]                  # one process
    mpiexec -n R python scripts/image_sample.py [flags]     # R processes (one GPU each)

Sample i gets its label and noise from (--seed, i) alone, so the images depend only on the settings, not on
--batch_size or the number of processes (up to float rounding). Batch k holds samples [k*B, (k+1)*B); process r
does the batches r, r+R, r+2R, ... and writes each finished batch as a shard; process 0 merges them into
<output_dir>/samples_<N>x<H>x<W>x<C>.npz (arr_0: uint8 NHWC images, arr_1: int64 labels) and records the
settings beside it (ldm/shards.py has the layout). The default output_dir is named after the settings.

Rerunning a finished command says "already done"; a run with other settings into the same folder is refused,
naming the difference, unless --overwrite. An interrupted run (Ctrl-C, SIGTERM, a crash) continues from its
shards with --resume. The last line on stdout is `samples: <path of the .npz>`. With several processes,
output_dir must be on a file system that all of them see. A run holds its folder (`ldm.shards.FolderLock`): a second
run into the same folder is refused while the first is alive.
"""
from ldm.startup import start_front_end

start_front_end(__name__)  # before torch loads: Ctrl-C meanwhile is one line; OpenMP threads wait passively

import sys  # noqa: E402
import traceback  # noqa: E402

from ldm import cli  # noqa: E402
from ldm.autobatch import use_expandable_segments  # noqa: E402
from ldm.distributed import Comm, share_cpu_threads  # noqa: E402
from ldm.sampling_run import parse_args, sample, stop  # noqa: E402


def run(argv=None):
    """Sample the flags' run; returns the exit status. SIGTERM is handled like Ctrl-C and, under MPI, one rank's
    crash ends all ranks."""
    args = parse_args(argv, description=__doc__.split("\n\n")[0])
    use_expandable_segments()
    comm = Comm()
    share_cpu_threads(comm)
    with cli.sigterm_as_interrupt():
        try:
            return sample(args, comm)[0]
        except KeyboardInterrupt as interrupt:  # before the output folder is known
            return stop(comm, "stopped before sampling began", cli.interrupt_exit_status(interrupt))
        except Exception:
            if comm.size > 1:  # one rank failing alone would leave the others waiting forever
                traceback.print_exc()
                comm.abort(1)
            raise


if __name__ == "__main__":
    sys.exit(run())
