"""The run folder of apo.py (--out) and what goes in and out of it: models loaded onto a device and saved as
checkpoints, the trainer state (optimizer, random streams, the loop's counters) and resuming from it, the JSON-lines
logs, the curves, and the signals that stop a run after a checkpoint. Plumbing, not APO: apo.py calls it in a few
named places.

    args.json            the run's arguments
    metrics.jsonl        one line per step              eval.jsonl      one line per held-out evaluation
    samples.jsonl        a few prompts per step, with their G responses and the step's numbers for each
    curves.png           metrics and evaluations, redrawn at each checkpoint
    checkpoint-NNNNNN/   a plain HF folder + trainer_state.pt (optimizer, RNG streams per process, counters) +
                         trainer_state.json (the counters, readable); with --fsdp the weights and moments in sharded/
    final/               the trained model (from_pretrained loads it), with its trainer state: a run can go on
"""

import json
import os
import random
import shutil
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

import parallel


# ---------------------------------------------------------------------------------------------------------- models
def resolve_device(device: str, dtype: str, model: str, data: str) -> tuple:
    """--device and --dtype -> (torch.device, torch.dtype): 'auto' is CUDA with bf16 where there is a GPU, else the
    CPU for the toy (fp32) and a stop with a hint for anything bigger."""
    if device == "auto":
        if torch.cuda.is_available():
            device = "cuda"
        elif "toy" in (model, data):
            device = "cpu"
        else:
            sys.exit(f"No CUDA GPU found. Training {model} on a CPU would take hours per step; "
                     "pass --device cpu to force it anyway, or try `python apo.py --data toy` (minutes on a CPU).")
    elif device.startswith("cuda") and int(device.partition(":")[2] or 0) >= torch.cuda.device_count():
        sys.exit(f"--device {device}: {torch.cuda.device_count()} CUDA GPU(s) found; pass --device cpu for the CPU")
    dtype = {"auto": torch.bfloat16 if device.startswith("cuda") else torch.float32,
             "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    if device == "cpu" and "toy" in (model, data):
        torch.set_num_threads(1)  # toy-sized matrices gain nothing from threads, and on a busy CPU lose ~10x
    return torch.device(device), dtype


def load_model(name: str, dtype, device, trust_remote_code: bool = False):
    """A Qwen2.5-VL policy and its processor, from a Hub id or a local folder (safetensors only)."""
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    if name == "toy":
        import toy
        name = str(toy.starting_model())
    model_config(name, trust_remote_code)
    with checkpoint_errors(name):
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            name, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code).to(device)
        processor = AutoProcessor.from_pretrained(name, trust_remote_code=trust_remote_code)
    return model, processor


def model_config(name: str, trust_remote_code: bool = False):
    """The config of checkpoint `name` (a folder or a Hub id), checked to be a Qwen2.5-VL's: a cheap look, before
    anything heavy loads, that stops where `load_model` would (`checkpoint_errors`)."""
    from transformers import AutoConfig

    with checkpoint_errors(name):
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    if config.model_type != "qwen2_5_vl":
        sys.exit(f"model {name}: a {config.model_type!r} checkpoint; this project trains Qwen2.5-VL ones "
                 "(model_type 'qwen2_5_vl')")
    return config


@contextmanager
def checkpoint_errors(name: str):
    """A checkpoint that cannot be found or read, as one line that says what to do (SystemExit: no traceback):
    a path that does not exist, a folder without config.json or with files missing, a Hub id while the Hub cannot
    be reached (HF_HUB_OFFLINE, or no network) or that it does not know. Any other error goes through."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    folder = Path(name)  # (transformers looks for a folder first, then on the Hub; so do these checks)
    if not folder.exists():
        try:
            validate_repo_id(name)
        except HFValidationError:  # '/x/y', 'a/b/c', './x': a path, not a Hub id
            sys.exit(f"model {name}: no such folder")
    elif not (folder / "config.json").is_file():
        sys.exit(f"model {name}: not a checkpoint folder (no config.json in it)")
    try:
        yield
    except OSError as err:  # transformers raises OSError for what it cannot find, the Hub's error as its cause
        if folder.exists():  # a folder with config.json, but weights or processor files missing or broken
            raise SystemExit(f"model {name}: {str(err).strip().splitlines()[0]}") from None
        if caused_by(err, LocalEntryNotFoundError):  # not in the local cache, and the Hub unreachable
            why = "HF_HUB_OFFLINE is set" if huggingface_hub.constants.HF_HUB_OFFLINE else "no network?"
            raise SystemExit(f"model {name}: no such folder, and the Hub cannot be reached to download it ({why}): "
                             "pass a local folder with --model PATH, or connect to the Hub") from None
        if caused_by(err, RepositoryNotFoundError):  # (also a gated or private one, without a login that may)
            raise SystemExit(f"model {name}: no such folder, nor a model on the Hub that this login may read "
                             "(a private or gated one needs `hf auth login`)") from None
        raise


def caused_by(err: BaseException, kind) -> bool:
    """Whether `err`, or an exception it was raised from or while handling, is a `kind`."""
    while err is not None and not isinstance(err, kind):
        err = err.__cause__ or err.__context__
    return err is not None


def load_models(model: str, resume_from: Path | None, with_reference: bool, gradient_checkpointing: bool,
                fsdp: bool, dtype, device, trust_remote_code: bool = False) -> tuple:
    """(policy, reference, processor): the policy from `resume_from` when the run resumes (with --fsdp its
    weights come from the checkpoint's shards later, in `restore`), else from `model`, in training mode, sharded
    with --fsdp; the reference (None without one) always from `model`, frozen."""
    policy, processor = load_model(str(resume_from if resume_from and not fsdp else model), dtype, device,
                                   trust_remote_code)
    reference = None
    if with_reference:
        reference, _ = load_model(model, dtype, device, trust_remote_code)
        reference.eval().requires_grad_(False)
    if gradient_checkpointing:
        policy.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    policy.train()
    if fsdp:
        parallel.shard(policy)
    return policy, reference, processor


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
        if not sharded or weights is not None:
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
        plot_curves([out], out / "curves.png")


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
def append(out: Path, name: str, rows: list):
    """Rows appended to out/name.jsonl, one JSON line each (process 0 alone writes)."""
    if parallel.is_main():
        with open(out / f"{name}.jsonl", "a") as f:
            f.write("".join(json.dumps(row) + "\n" for row in rows))


def logged_steps(out: Path, name: str) -> set:
    path = out / f"{name}.jsonl"
    return {json.loads(line)["step"] for line in path.read_text().splitlines()} if path.exists() else set()


CURVES = [  # panel title, then (log, key, label) drawn in it: log 'metrics' is per step, 'eval' per evaluation
    ("reward", [("metrics", "reward", "")]),
    ("accuracy", [("metrics", "accuracy", "sampled"), ("eval", "accuracy", "held-out, greedy")]),
    ("format rate", [("metrics", "format_rate", "sampled"), ("eval", "format_rate", "held-out, greedy")]),
    ("response length (tokens)", [("metrics", "response_length_correct", "correct"),
                                  ("metrics", "response_length_wrong", "wrong")]),
    ("KL to the reference", [("metrics", "kl", "")]), ("entropy", [("metrics", "entropy", "")]),
    ("DADS: mean KL weight of positives", [("metrics", "dads_weight_pos_mean", "")]),
    ("STCR: advantage multiplier of negatives", [("metrics", "stcr_mult_neg_mean", "mean"),
                                                 ("metrics", "stcr_mult_neg_max", "max")]),
]


def plot_curves(run_dirs: list, path: Path, smooth: int = 10) -> Path:
    """The curves of one or more run folders in one PNG: per-step metrics (metrics.jsonl) raw and faint, with a
    moving average over `smooth` steps on top; held-out evaluations (eval.jsonl) as dots joined by dashes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(16, 6.5))
    for colour, run in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 9, map(Path, run_dirs)):
        logs = {log: [json.loads(line) for line in (run / f"{log}.jsonl").read_text().splitlines() if line]
                if (run / f"{log}.jsonl").exists() else [] for log in ("metrics", "eval")}
        for ax, (title, curves) in zip(axes.flat, CURVES):
            for (log, key, label), style in zip(curves, ("-", "--")):
                points = [(r["step"], r[key]) for r in logs[log] if r.get(key) is not None]
                if not points:
                    continue
                steps, values = zip(*points)
                label = f"{run.name} {label}".strip()
                if log == "eval":
                    ax.plot(steps, values, "o--", color=colour, markersize=3, label=label)
                    continue
                window = [values[max(0, i - smooth + 1):i + 1] for i in range(len(values))]
                ax.plot(steps, values, style, color=colour, alpha=0.2, linewidth=0.8)
                ax.plot(steps, [sum(w) / len(w) for w in window], style, color=colour, label=label)
            ax.set_title(title, fontsize=9)
    for ax in axes.flat:
        if ax.lines:
            ax.legend(fontsize=7)
        ax.ticklabel_format(axis="y", useOffset=False)  # STCR's multipliers are 1.00001-ish: show them whole
        ax.set_xlabel("step", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=60, pil_kwargs={"optimize": True})
    plt.close(fig)
    return Path(path)


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
