"""The run folder of apo.py (--out): checkpoints, resuming from one, the JSON-lines logs, and the signals that stop a
run after a checkpoint. Plumbing, not APO: apo.py's driver calls it in a few named places.

    args.json            the run's arguments
    metrics.jsonl        one line per step              eval.jsonl      one line per held-out evaluation
    samples.jsonl        a few prompts per step, with their G responses and the step's numbers for each
    curves.png           metrics and evaluations, redrawn at each checkpoint (pictures.py); curves_terms.png: KL,
                         entropy, DADS and STCR
    checkpoint-NNNNNN/   a plain HF folder + trainer_state.pt (optimizer, RNG streams per process, counters) +
                         trainer_state.json (the counters, readable); with --fsdp the weights and moments in sharded/;
                         with --lora-rank the adapters in adapter/ (peft) instead of the weights
    final/               the trained model (from_pretrained loads it), with its trainer state: a run can go on
                         (with --lora-rank: the adapters merged into it, and adapter/ beside)
"""

import json
import os
import random
import shutil
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from plumbing import parallel, pictures
from plumbing.models import is_lora, merged_weights


# ----------------------------------------------------------------------------------------------------- checkpoints
def open_run(out: Path, resume: bool, fsdp: bool) -> Path | None:
    """The checks before a run starts or continues in `out`: a new run does not overwrite an old one (a folder
    with a logged step or a checkpoint), a resumed one finds what it needs. Returns the folder to resume from
    (None for a new run). Writes nothing: `start_run` makes the folder once the data and the models have loaded,
    so a run that never starts leaves nothing behind."""
    if out.exists() and not out.is_dir():
        sys.exit(f"--out {out}: a file, not a folder")
    if not resume and (logged_steps(out, "metrics") or latest_checkpoint(out)):
        sys.exit(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
    resume_from = latest_checkpoint(out) if resume else None
    if resume and resume_from is None:
        sys.exit(f"--resume: no checkpoint found in {out}")
    if resume_from and (resume_from / "sharded").exists() != fsdp:
        sys.exit(f"{resume_from} was saved {'with' if fsdp else 'without'} --fsdp: resume the same way")
    return resume_from


def start_run(out: Path, args: dict, world: int, resume_from: Path | None):
    """The run starts: its folder and args.json. A new run first drops the logs of one that failed before its
    first step (`open_run` let it in: at most a step-0 evaluation), which would otherwise pass for its own."""
    if parallel.is_main():
        out.mkdir(parents=True, exist_ok=True)
        for name in ("metrics", "samples", "eval") if resume_from is None else ():
            (out / f"{name}.jsonl").unlink(missing_ok=True)
        (out / "args.json").write_text(json.dumps({**args, "world_size": world}, indent=2))


def save_checkpoint(out: Path, name: str, model, processor, trainer_state: dict | None = None, optimizer=None,
                    keep_last: int = 0):
    """Write `out/name` atomically: everything goes to a hidden folder that is renamed into place only when complete,
    so a kill during the save leaves the previous checkpoint whole. Keeps the last `keep_last` checkpoint-* folders.

    Many GPUs: every rank calls it and rank 0 writes, except that under FSDP2 each rank writes its shards of the
    weights and Adam moments (sharded/, torch.distributed.checkpoint), and final/ also gets the whole weights."""
    tmp, final, main, sharded = out / f".tmp-{name}", out / name, parallel.is_main(), parallel.is_sharded(model)
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    parallel.barrier()
    weights = None
    if sharded:
        parallel.save_sharded(model, optimizer, tmp / "sharded")
        weights = parallel.full_state_dict(model) if name == "final" else None  # on rank 0
    if main:
        if is_lora(model):  # the adapters alone (peft), whose base is the run's --model; final/ a plain model too
            model.save_pretrained(tmp / "adapter")
            if name == "final":
                model.get_base_model().save_pretrained(tmp, state_dict=merged_weights(model), safe_serialization=True)
        elif not sharded or weights is not None:
            model.save_pretrained(tmp, state_dict=weights, safe_serialization=True)
        else:
            model.config.save_pretrained(tmp)  # the weights are in sharded/
        processor.save_pretrained(tmp)
        if trainer_state is not None:
            if optimizer is not None and not sharded:
                trainer_state = {**trainer_state, "optimizer": optimizer.state_dict()}
            torch.save(trainer_state, tmp / "trainer_state.pt")
            # the loop's counters, readable without loading the optimizer: which folder is latest, and for people
            (tmp / "trainer_state.json").write_text(json.dumps(trainer_state["state"], indent=1))
        if final.exists():  # only final/ is ever rewritten: move the old one aside, drop it once the new one is in
            os.replace(final, out / f".old-{name}")
        os.replace(tmp, final)
        shutil.rmtree(out / f".old-{name}", ignore_errors=True)
        if keep_last:
            for old in sorted(out.glob("checkpoint-*"))[:-keep_last]:
                shutil.rmtree(old)
    parallel.barrier()


def checkpoint(out: Path, name: str, model, processor, optimizer, state: dict, args: dict, keep_last: int = 0):
    """A checkpoint of the run (`save_checkpoint`) with every process's random streams and the loop's counters,
    then the curves redrawn."""
    trainer_state = {"rng": parallel.gather_objects(rng_state(optimizer)), "state": dict(state), "args": args}
    save_checkpoint(out, name, model, processor, trainer_state, optimizer, keep_last)
    if parallel.is_main():
        pictures.plot_curves([out], out / "curves.png")


def latest_checkpoint(out: Path) -> Path | None:
    """The folder to resume `out` from: the checkpoint-NNNNNN or final/ (a finished run, which can be extended
    with a larger --steps) with the most steps done; None if there is none."""
    found = [p for p in [*out.glob("checkpoint-*"), out / "final"] if (p / "trainer_state.json").exists()]
    return max(found, key=lambda p: json.loads((p / "trainer_state.json").read_text())["step"], default=None)


def rng_state(optimizer) -> dict:
    """This process's random streams: sampling (python, torch, CUDA) and the optimizer's rounding."""
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "rounding": optimizer.generator.get_state()}


def set_rng_state(state: dict, optimizer):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "rounding" in state:
        optimizer.generator.set_state(state["rounding"])


def restore(resume_from: Path, model, optimizer, fsdp: bool, steps: int) -> dict:
    """Back to the checkpoint `resume_from`, whose weights `model` already holds (with --fsdp, they and the Adam
    moments come from its shards here): the optimizer, this process's random streams, and the loop's counters,
    which are returned, planned for `steps` steps (more than before: the run goes on, on the schedule of a run of
    `steps` steps). What was logged after the checkpoint is dropped: it is done again."""
    # weights_only: the state holds tensors and plain data, so no pickled code can run on loading
    saved = torch.load(resume_from / "trainer_state.pt", weights_only=True)
    rngs = saved["rng"] if isinstance(saved["rng"], list) else [saved["rng"]]  # one per process
    if len(rngs) != parallel.world():
        sys.exit(f"{resume_from} was saved by {len(rngs)} process(es): resume with as many")
    if fsdp:
        parallel.load_sharded(model, optimizer, resume_from / "sharded")
    else:
        optimizer.load_state_dict(saved["optimizer"])
    set_rng_state(rngs[parallel.rank()], optimizer)
    state = saved["state"]
    # A step's metrics and samples are logged during the step, an evaluation at step s after s steps (0: before any)
    out, say = resume_from.parent, print if parallel.is_main() else lambda *_: None
    for name, kept in (("metrics", range(state["step"])), ("samples", range(state["step"])),
                       ("eval", range(state["step"] + 1))):
        path = out / f"{name}.jsonl"
        if parallel.is_main() and path.exists():
            lines = [line for line in path.read_text().splitlines() if json.loads(line)["step"] in kept]
            path.write_text("".join(line + "\n" for line in lines))
    parallel.barrier()
    say(f"resumed from {resume_from} at step {state['step']}")
    if state["step"] >= steps:
        say(f"{out} has done {state['step']} steps already: nothing to do (a larger --steps extends it)")
    elif state.get("steps", steps) != steps:  # extended: the learning rate is now that of a longer run
        say(f"the run was planned for {state['steps']} steps, now {steps}: the learning rate follows the "
            f"{steps}-step schedule from here on (its value at each step is in metrics.jsonl)")
    state["steps"] = steps
    return state


# ------------------------------------------------------------------------------------------------------------ logs
class Stopwatch:
    """Seconds per named phase of a step: `with stopwatch("rollout"): ...`, summed over a phase's visits
    (tools/bench.py's Meter adds each phase's peak memory)."""

    def __init__(self):
        self.seconds = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def append(out: Path, name: str, rows: list, live=None):
    """Rows appended to out/name.jsonl, one JSON line each (process 0 alone writes), and sent to `live` (LiveLog)."""
    if parallel.is_main():
        with open(out / f"{name}.jsonl", "a") as f:
            f.write("".join(json.dumps(row) + "\n" for row in rows))
    if live is not None:
        live.log(name, rows)


def logged_steps(out: Path, name: str) -> set:
    path = out / f"{name}.jsonl"
    return {json.loads(line)["step"] for line in path.read_text().splitlines()} if path.exists() else set()


# --------------------------------------------------------------------------------------------------------- signals
STOP = []  # signals received, checked after every step


def request_stop(signum, frame):
    """SIGINT / SIGTERM: the step under way finishes, a checkpoint is saved, the run exits (a second SIGINT: at
    once)."""
    if STOP and signum == signal.SIGINT:
        raise KeyboardInterrupt
    STOP.append(signum)


def stop_on_signals():
    """Installed by `python apo.py` alone (a library or test use of apo.train leaves the process's handlers)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, request_stop)
