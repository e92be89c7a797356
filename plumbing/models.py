"""The models of a run: the device and dtype, the policy and its frozen reference loaded from a Hub id or a folder
(a checkpoint that cannot be read stops in one line), and LoRA: adapters on the policy, the reference being the policy
with its adapters switched off, and the merged weights for final/.
"""

import sys
from contextlib import contextmanager
from pathlib import Path

import torch

from plumbing import parallel


# ---------------------------------------------------------------------------------------------------------- models
def resolve_device(device: str, dtype: str, model: str, data: str) -> tuple:
    """--device and --dtype -> (torch.device, torch.dtype): 'auto' is CUDA with bf16 where there is a GPU, else the
    CPU for the toy (fp32) and a stop with a hint for anything bigger."""
    if device == "auto":
        if torch.cuda.is_available():
            device = "cuda"
        elif any(name.startswith("toy") for name in (model, data)):
            device = "cpu"
        else:
            sys.exit(f"No CUDA GPU found. Training {model} on a CPU would take hours per step; "
                     "pass --device cpu to force it anyway, or try `python apo.py --data toy` (minutes on a CPU).")
    elif device.startswith("cuda") and int(device.partition(":")[2] or 0) >= torch.cuda.device_count():
        sys.exit(f"--device {device}: {torch.cuda.device_count()} CUDA GPU(s) found; pass --device cpu for the CPU")
    dtype = {"auto": torch.bfloat16 if device.startswith("cuda") else torch.float32,
             "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    if device == "cpu" and any(name.startswith("toy") for name in (model, data)):
        torch.set_num_threads(1)  # toy-sized matrices gain nothing from threads, and on a busy CPU lose ~10x
    return torch.device(device), dtype


def load_model(name: str, dtype, device, trust_remote_code: bool = False):
    """A Qwen2.5-VL policy and its processor, from a Hub id or a local folder (safetensors only)."""
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    if name in ("toy", "toy-graded"):
        from plumbing import toy
        name = str(toy.starting_model(name))
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


