"""Worker (under torchrun): an entry point (nlp or cv) that, on its first attempt, stops
itself at a given point, as a preemption or a dying node would.

Usage: interrupt.py ENTRY WHAT RANK PERIODS MARKER [--key value ...]
ENTRY: nlp or cv. WHAT: term or int (SIGTERM or SIGINT to torchrun, which forwards it to
every worker) or kill (SIGKILL to this worker). RANK does it once PERIODS updates are done in this process,
unless MARKER exists (then nothing happens: a relaunch or a restart runs plainly); it
creates MARKER first.
"""
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from wpipe.train import cli, loop  # noqa: E402


def main():
    entry, what, rank, periods, marker, *argv = sys.argv[1:]
    if entry == "nlp":
        from nlp.main import NlpConfig as config_class
        from nlp.main import make_task
    else:
        from cv.main import CvConfig as config_class
        from cv.main import make_task
    marker, done = Path(marker), [0]
    meter_call = loop._Meter.__call__

    def call(self, t, loss):
        meter_call(self, t, loss)
        done[0] += 1
        if done[0] == int(periods) and int(os.environ["RANK"]) == int(rank) and not marker.exists():
            marker.touch()
            if what in ("term", "int"):
                os.kill(os.getppid(), signal.SIGTERM if what == "term" else signal.SIGINT)
            else:
                os.kill(os.getpid(), signal.SIGKILL)
    loop._Meter.__call__ = call
    cli(config_class, make_task, argv)


if __name__ == "__main__":
    main()
