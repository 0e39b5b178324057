"""The first call of a front end, before it imports torch: `start_front_end(__name__)`.

- Ctrl-C while the front end still imports its libraries (torch takes seconds) ends it with one line and exit
  status 130 instead of a KeyboardInterrupt traceback (only when it runs as a script, not when imported);
  `ldm.cli.sigterm_as_interrupt` turns Ctrl-C back into KeyboardInterrupt for the run itself, which then stops
  with its own line (saying, for a sampling run, how to resume).
- OpenMP threads wait passively (`ldm.distributed.passive_cpu_waits`), which OpenMP reads once, as torch loads it.
"""
import signal
import sys

from ldm.distributed import passive_cpu_waits


def _stop(signum, frame):
    print("stopped", file=sys.stderr, flush=True)
    raise SystemExit(128 + signum)


def interrupts_end_quietly(module_name):
    """When module_name is '__main__': SIGINT and SIGTERM print 'stopped' and exit with 128 + the signal."""
    if module_name == "__main__":
        for signum in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(signum) is not signal.SIG_IGN:  # as Python itself, leave an ignored signal ignored
                signal.signal(signum, _stop)


def start_front_end(module_name):
    """Quiet interrupts while the libraries load, and passive OpenMP waits; call it before importing torch."""
    interrupts_end_quietly(module_name)
    passive_cpu_waits()
