"""Runs apo.py as `python apo.py ...` does, except that one process waits, at the rollout of one step, until it has
received a signal: a test can then send SIGINT or SIGTERM at a point the run cannot pass first.

    python tests/paused_run.py STEP RANK MARKER apo.py [apo.py's arguments]

The process of rank RANK (torchrun's RANK, 0 without it) creates the file MARKER when it starts to wait, before the
rollout of step STEP, and goes on once apo.py's own handler has recorded a signal. apo.py runs as __main__, so its
handlers are the ones a user's run installs.
"""
import os
import runpy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rollout  # noqa: E402
from plumbing import run_folder  # noqa: E402

step, rank, marker = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
sys.argv = sys.argv[4:]
sample_responses = rollout.sample_responses


def waiting_sample_responses(*args, seed=(0,), **kwargs):
    # training's rollouts are keyed by (seed, step); held-out evaluation's greedy answers by (seed,) alone
    if len(seed) == 2 and seed[1] == step and int(os.environ.get("RANK", 0)) == rank:
        marker.touch()
        deadline = time.monotonic() + 600
        while not run_folder.STOP:  # the signals apo.py's handler (run_folder.request_stop) received
            if time.monotonic() > deadline:
                sys.exit("paused_run: no signal came within 600 s")
            time.sleep(0.01)
    return sample_responses(*args, seed=seed, **kwargs)


rollout.sample_responses = waiting_sample_responses
runpy.run_path(sys.argv[0], run_name="__main__")
