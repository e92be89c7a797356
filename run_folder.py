"""The run folder of apo.py (--out) and what goes in and out of it: models loaded onto a device and saved as
checkpoints, the trainer state (optimizer, random streams, the loop's counters) and resuming from it, the JSON-lines
logs, the curves, and the signals that stop a run after a checkpoint. Plumbing, not APO: apo.py calls it in a few
named places.

    args.json            the run's arguments
    metrics.jsonl        one line per step              eval.jsonl      one line per held-out evaluation
    samples.jsonl        a few prompts per step, with their G responses and the step's numbers for each
    curves.png           metrics and evaluations, redrawn at each checkpoint
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
                fsdp: bool, dtype, device, trust_remote_code: bool = False, lora=None, seed: int = 0) -> tuple:
    """(policy, reference, processor): the policy from `resume_from` when the run resumes (with --fsdp its
    weights come from the checkpoint's shards later, in `restore`), else from `model`, in training mode, sharded
    with --fsdp; the reference (None without one) always from `model`, frozen.

    With `lora` (a peft LoraConfig, `lora_config`): the policy is `model` with adapters (new ones, or those of
    `resume_from`), and the reference is that same model with its adapters switched off (`AdaptersOff`): the
    base weights, once in memory."""
    if lora is not None and fsdp:
        sys.exit("--lora-rank does not work with --fsdp: with LoRA a whole replica fits one GPU (README, 'Smaller "
                 "GPUs'); run data parallel, torchrun without --fsdp")
    if resume_from and (resume_from / "adapter").exists() != (lora is not None):
        sys.exit(f"{resume_from} was saved {'with' if lora is None else 'without'} --lora-rank: resume the same way")
    policy, processor = load_model(str(resume_from if resume_from and not fsdp and lora is None else model), dtype,
                                   device, trust_remote_code)
    reference = None
    if with_reference and lora is None:
        reference, _ = load_model(model, dtype, device, trust_remote_code)
        reference.eval().requires_grad_(False)
    if gradient_checkpointing:
        policy.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if lora is not None:
        policy = add_adapters(policy, lora, seed, resume_from and resume_from / "adapter")
        reference = AdaptersOff(policy) if with_reference else None
    policy.train()
    if fsdp:
        parallel.shard(policy)
    return policy, reference, processor


# ------------------------------------------------------------------------------------------------------------ LoRA
# Where adapters go: the language model's linear layers named by --lora-targets, and with --lora-vision the vision
# tower's too (its blocks, and the two linear layers of the merger that projects image features into the language
# model: mlp.0 and mlp.2, around a GELU).
LANGUAGE_LAYERS = r"model\.language_model\.layers\.\d+\.(self_attn|mlp)\.({})"
VISION_LAYERS = r"model\.visual\.(blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(gate|up|down)_proj)|merger\.mlp\.[02])"


def lora_config(rank: int, alpha: float, dropout: float, targets: str, vision: bool):
    """The peft LoraConfig of --lora-rank, --lora-alpha (0: twice the rank), --lora-dropout, --lora-targets and
    --lora-vision; None for rank 0 (all parameters are trained)."""
    if not rank:
        return None
    from peft import LoraConfig

    names = "|".join(n.strip() for n in targets.split(",") if n.strip())
    pattern = LANGUAGE_LAYERS.format(names) + (f"|{VISION_LAYERS}" if vision else "")
    return LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=dropout, target_modules=pattern,
                      bias="none")


def add_adapters(model, lora, seed: int, adapter: Path | None = None):
    """`model` with LoRA adapters (peft): new ones (A random from `seed`, B = 0, so the policy starts as the base
    model), or those saved in `adapter` when a run resumes. Only the adapters are trainable, in fp32 whatever the
    base weights' dtype (peft's default); everything else is frozen and gets no gradient."""
    import warnings

    from peft import LoraConfig, PeftModel, get_peft_model

    # Gradient checkpointing here is non-reentrant, which needs no input that requires grad: the hooks that make the
    # embeddings' outputs require it (for the reentrant kind), transformers' and then peft's, would only send the
    # backward through the frozen vision tower, for no gradient. Both are removed.
    model.disable_input_require_grads()
    with warnings.catch_warnings():  # peft reads transformers' deprecated `is_gradient_checkpointing`
        warnings.simplefilter("ignore", FutureWarning)
        if adapter is not None:
            saved = LoraConfig.from_pretrained(adapter)
            settings = lambda c: (c.r, c.lora_alpha, c.lora_dropout, c.target_modules)  # noqa: E731
            if settings(saved) != settings(lora):
                sys.exit(f"{adapter} holds adapters of other LoRA settings {settings(saved)} than asked "
                         f"{settings(lora)}: resume with the run's own flags")
            model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
        else:
            # the same A on every process of a data-parallel run, whatever their own random streams
            with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
                torch.manual_seed(seed)
                model = get_peft_model(model, lora)
    model.get_base_model().disable_input_require_grads()
    return model


def is_lora(model) -> bool:
    return hasattr(model, "peft_config")


class AdaptersOff:
    """The reference of a LoRA policy: the policy itself with its adapters switched off (peft's
    `disable_adapter`), which is exactly the base model, with no second copy of its weights (7 GB for a 3B).
    `rollout.batched_logprobs` calls it as it calls a model (it reads `device` and `lm_head` too); each call runs
    without gradients and in eval mode, so that no LoRA dropout acts, then gives the policy its mode back."""

    def __init__(self, policy):
        self.policy = policy

    @property
    def device(self):
        return self.policy.device

    @property
    def lm_head(self):  # not adapted (only the layers named by LANGUAGE_LAYERS, VISION_LAYERS are)
        return self.policy.lm_head

    def __call__(self, *args, **kwargs):
        was_training = self.policy.training
        self.policy.eval()
        try:
            with torch.no_grad(), self.policy.disable_adapter():
                return self.policy(*args, **kwargs)
        finally:
            self.policy.train(was_training)


def merged_weights(policy) -> dict:
    """The state dict of a plain model with the adapters folded in, W + (α/r)·B·A (peft's `get_delta_weight`),
    computed in fp32 and rounded once to the weights' dtype, on the CPU: for final/, which loads without peft.
    The policy itself stays unmerged: merging in place and back would round the base weights, the reference."""
    from peft.tuners.lora import LoraLayer

    base, weights = policy.get_base_model(), {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            w = module.get_base_layer().weight
            weights[f"{name}.weight"] = (w.float() + module.get_delta_weight("default").float()).to(w.dtype).cpu()
    on_cpu = {}  # tied weights (the embedding and the output projection) stay one tensor
    for name, tensor in base.state_dict().items():
        if "lora_" not in name:
            weights.setdefault(name.replace(".base_layer.", "."), on_cpu.setdefault(tensor.data_ptr(), tensor.cpu()))
    return weights


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


def live_tag(log: str, key: str) -> str:
    """The TensorBoard and W&B name of a field of metrics.jsonl or eval.jsonl: eval/…, apo/… (DADS, STCR), train/…"""
    group = "eval" if log == "eval" else "apo" if key.startswith(("dads_", "stcr_")) else "train"
    return f"{group}/{key}"


class LiveLog:
    """--report-to: what `append` writes to metrics.jsonl, eval.jsonl and samples.jsonl is also sent, by process 0,
    to TensorBoard (out/tensorboard/) and W&B (out/wandb/), each imported only when asked for. The names are grouped
    as TRL groups its own: eval/… for held-out evaluations, apo/… for APO's terms (DADS, STCR), train/… for the rest
    of a step's metrics, each at the step of its JSON line; a step's samples as a text (TensorBoard) or a table (W&B).

    A resumed run goes on in the same TensorBoard folder and W&B run (its id in out/live.json), and redoes the steps
    after its checkpoint, which each backend keeps once:
    - TensorBoard: live.json holds the last step written to disk of each log, and the steps redone are not written
      again; their first values stay, which an exact resume reproduces. (purge_step, which should hide them, hid
      the earlier scalars but not the texts, and TensorBoard's own plugin reader kept both: tried.)
    - W&B: sent again at their steps; W&B ignores a step below a resumed run's last one (online, where the server
      tells the run where it stands), and so keeps the first values too, while a step it lost in a hard kill (its
      client writes its file every 15 s) is sent anew. Offline, W&B cannot know the run's steps: the resumed run's
      folder holds the steps it redid again."""

    def __init__(self, out: Path, report_to: str, config: dict):
        backends = {b.strip() for b in report_to.split(",")} - {"", "none"}
        if backends - {"tensorboard", "wandb"}:
            sys.exit(f"--report-to takes tensorboard, wandb, both (comma-separated) or none, not {report_to!r}")
        self.path, self.tensorboard, self.wandb = out / "live.json", None, None
        self.state = json.loads(self.path.read_text()) if self.path.exists() else {"tensorboard_written": {}}
        if not parallel.is_main() or not backends:
            return
        try:
            if "tensorboard" in backends:
                from torch.utils.tensorboard import SummaryWriter
                self.tensorboard = SummaryWriter(str(out / "tensorboard"))
            if "wandb" in backends:
                import wandb
                self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "apo"), name=out.name, config=config,
                                        id=self.state.get("wandb_id"), resume="allow", dir=str(out))
                self.state["wandb_id"] = self.wandb.id  # a new run's, then the same on every resume
        except ImportError as e:
            sys.exit(f"--report-to {report_to} needs {e.name}: pip install {e.name}")
        self.path.write_text(json.dumps(self.state, indent=1))

    def log(self, name: str, rows: list):
        """Rows of one log ('metrics', 'eval' or 'samples'), step by step."""
        for step in sorted({r["step"] for r in rows}):
            at = [r for r in rows if r["step"] == step]
            # (a field that is None has no value this step: no correct response, say)
            scalars = {} if name == "samples" else {live_tag(name, k): v for k, v in at[0].items()
                                                    if k != "step" and isinstance(v, (int, float))}
            if self.wandb:
                self.wandb.log({"samples": samples_table(at, wandb=True)} if name == "samples" else scalars, step=step)
            written = self.state["tensorboard_written"]
            if self.tensorboard and step > written.get(name, -1):
                for tag, value in scalars.items():
                    self.tensorboard.add_scalar(tag, value, step)
                if name == "samples":
                    self.tensorboard.add_text("samples", samples_table(at), step)
                self.tensorboard.flush()  # on disk before live.json says so (a kill in between: this step twice)
                written[name] = step
                self.path.write_text(json.dumps(self.state, indent=1))

    def close(self):
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb:
            self.wandb.finish()
        self.tensorboard = self.wandb = None


def samples_table(rows: list, wandb: bool = False):
    """A step's logged groups, one line per response (problem, gold, response, reward, advantage): a W&B Table, or
    a Markdown table for TensorBoard's text panel (whose cells may hold no | or line break)."""
    columns = ["problem", "answer", "response", "reward", "advantage"]
    lines = [[r["problem"], r["answer"], text, reward, advantage] for r in rows
             for text, reward, advantage in zip(r["responses"], r["rewards"], r["advantages"])]
    if wandb:
        import wandb as wb
        return wb.Table(columns=columns, data=lines)
    cell = lambda x: str(x).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    table = [columns, ["---"] * len(columns)] + [list(map(cell, line)) for line in lines]
    return "\n".join(" | ".join(row) for row in table)


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
