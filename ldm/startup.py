"""The first lines of a front end: Ctrl-C while it still imports its libraries (torch takes seconds) ends it with
one line and exit status 130 instead of a KeyboardInterrupt traceback.

Call `interrupts_end_quietly(__name__)` before the heavy imports; it does nothing when the module is imported
rather than run. `ldm.cli.sigterm_as_interrupt` turns Ctrl-C back into KeyboardInterrupt for the run itself,
which then stops with its own line (saying, for a sampling run, how to resume).
"""
import signal
import sys


def _stop(signum, frame):
    print("stopped", file=sys.stderr, flush=True)
    raise SystemExit(128 + signum)


def interrupts_end_quietly(module_name):
    """When module_name is '__main__': SIGINT and SIGTERM print 'stopped' and exit with 128 + the signal."""
    if module_name == "__main__":
        for signum in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(signum) is not signal.SIG_IGN:  # as Python itself, leave an ignored signal ignored
                signal.signal(signum, _stop)
