"""APO: Asymmetric Policy Optimization for Qwen2.5-VL, in one file (arXiv 2506.21655).

APO is GRPO with two asymmetric terms. For each prompt, G responses are sampled and scored; each response's
advantage is its reward relative to its group (GRPO). Then:
  - STCR (negatives): a wrong response longer than the group's correct ones gets a more negative advantage;
  - DADS (positives): the KL penalty of a positive response is scaled down on hard prompts, so a rare success may
    move the policy further from the reference.
`docs/APO_SPEC.md` gives the exact math; each function below cites its section (§).

Read this file top to bottom: arguments, data, group advantage, STCR, DADS, loss, update, models and checkpoints,
logging (held-out evaluation, curves), then the training loop that runs them in that order. `rollout.py` samples
responses and computes log-probs, `reward.py` scores them, `parallel.py` is what many GPUs add (in the loop it shows
as a few calls, each a no-op in a single process).

Where this code departs from the paper and the authors' code (each one has its reason in the README):
  - loss aggregation: mean over all response tokens of the optimizer mini-batch (independent of micro-batching),
    not the authors' mean per micro-batch of 2 sequences; `--loss-agg sequence` gives the GRPO paper's form;
  - rewards: unparseable golds are skipped rows (not reward 1.0), letter golds compare as letters, a \\boxed
    answer outside <answer> tags still earns accuracy, and answers are read whole (reward.py: never a number picked
    out of what LaTeX cannot read; golds that are not one value compare as text);
  - one GPU instead of eight: HF `generate` instead of vLLM, bf16 weights with fp32 Adam moments and stochastic
    rounding instead of ZeRO-2 fp32 master weights, and a smaller default rollout (16 prompts instead of 128);
    many GPUs through torchrun (data parallel, or FSDP2 with --fsdp) instead of DeepSpeed;
  - the data is shuffled each pass (the authors' script does not shuffle; `--no-shuffle` restores that).
"""

import argparse
import ast
import dataclasses
import functools
import inspect
import io
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

import parallel
import reward
import rollout


# ----------------------------------------------------------------------------------------------------- arguments
@dataclass
class Args:
    model: str = "Qwen/Qwen2.5-VL-3B-Instruct"
    """policy to train and frozen reference: any Qwen2.5-VL checkpoint, a Hub id or a local folder ('toy': the toy
    task's small model)"""
    data: str = "geo3k"
    """'geo3k' (hiyouga/geometry3k), 'toy', a Hub dataset id, a local folder in the Hub layout, a .parquet or
    .jsonl/.json file with the geo3k columns, or a .json/.jsonl file in the authors' format ('message' + 'answer')"""
    split: str = "train"
    """dataset split to train on (Hub ids and folders)"""
    image_column: str = "images"
    """column holding the image (a list of images: the first is used; or one image, a path, bytes)"""
    problem_column: str = "problem"
    """column holding the problem text (an '<image>' placeholder in it is removed: the chat template places it)"""
    answer_column: str = "answer"
    """column holding the gold answer"""
    out: str = "runs/apo"
    """run folder: metrics.jsonl, samples.jsonl, checkpoints, final/"""
    resume: bool = False
    """continue the run found in --out from its latest checkpoint"""
    steps: int = 0
    """rollout steps to run (0: `epochs` passes over the data)"""
    epochs: int = 2
    """passes over the data when --steps is 0 (authors: 2)"""
    seed: int = 0
    """seed of data order, sampling and initialization of everything random"""
    shuffle: bool = True
    """shuffle the data at each pass (the authors' script does not: --no-shuffle)"""
    device: str = "auto"
    """'auto' (CUDA, else stop unless the model is 'toy'), 'cuda' or 'cpu' (forces the CPU)"""
    dtype: str = "auto"
    """'auto' (bfloat16 on CUDA, float32 on CPU), 'bfloat16' or 'float32'"""
    gradient_checkpointing: bool = True
    """recompute activations in backward: trades ~30% compute for most of the activation memory"""
    trust_remote_code: bool = False
    """allow code shipped with a checkpoint to run (off unless you trust its source)"""
    # rollout (APO_SPEC §8)
    prompts_per_step: int = 16
    """B, prompts per rollout (authors: 128 on 8 GPUs)"""
    group_size: int = 8
    """G, responses sampled per prompt (authors: 8)"""
    max_new_tokens: int = 1024
    """response length limit (authors: 4096)"""
    max_prompt_tokens: int = 1024
    """longer prompts are skipped and counted (authors: 9216; a geometry3k prompt is ~450 tokens)"""
    temperature: float = 1.0
    """sampling temperature; log-probs are computed at the same temperature (authors: 1.0)"""
    top_p: float = 1.0
    """nucleus sampling (authors: 1.0)"""
    min_pixels: int = 3136
    """images are resized to at least this many pixels (Qwen's default, 4 × 28²)"""
    max_pixels: int = 401408
    """and at most this many (512 × 28², at most 512 image tokens; authors: 2,560,000). With the defaults every
    admissible prompt then fits one 80 GB GPU (docs/PERF.md); geometry3k diagrams are far smaller"""
    generation_batch_size: int = 0
    """sequences per `generate` call (0: all B·G at once)"""
    # update (APO_SPEC §5-§8)
    lr: float = 1e-6
    """peak learning rate (authors: 1e-6)"""
    min_lr: float = 1e-7
    """the cosine schedule ends here (authors: 1e-7)"""
    warmup_ratio: float = 0.03
    """share of optimizer steps spent warming up linearly (authors: 3%)"""
    adam_betas: tuple = (0.9, 0.95)
    """Adam betas (authors: 0.9, 0.95)"""
    weight_decay: float = 0.0
    """decoupled weight decay (authors: 0)"""
    grad_clip: float = 1.0
    """gradient-norm clip (authors: 1.0)"""
    clip_eps: float = 0.2
    """PPO clip range ε (authors: 0.2)"""
    kl_beta: float = 1e-3
    """β, weight of the k3 KL loss toward the reference (authors: 1e-3); 0 drops the reference model"""
    dads: bool = True
    """DADS: difficulty-weighted KL for positive samples (--no-dads switches it off)"""
    stcr: bool = True
    """STCR: longer wrong responses get more negative advantages (--no-stcr switches it off)"""
    stcr_base: float = 1.00001
    """base of STCR's weight 1 - base^(-Δ) (authors: 1.00001)"""
    loss_agg: str = "token"
    """policy-loss mean: 'token' (over all response tokens of the mini-batch) or 'sequence' (per response first)"""
    mini_batch_size: int = 64
    """responses per optimizer step (authors: 64); B·G / mini_batch_size optimizer steps per rollout"""
    micro_batch_size: int = 4
    """responses per forward/backward (gradients accumulate over a mini-batch: the result does not depend on it)"""
    logprob_chunk: int = 1024
    """positions per vocabulary-projection chunk in log-prob computations (bounds the fp32 logits' memory)"""
    max_bad_updates: int = 3
    """stop (after a checkpoint) when this many updates in a row have a non-finite loss or gradient"""
    # held-out evaluation during training
    eval_every: int = 50
    """greedy accuracy and format rate on held-out problems at step 0, every N steps and at the end, into eval.jsonl
    and curves.png (0: never)"""
    eval_data: str = ""
    """data to evaluate on, as --data ('': the training data's own --eval-split; a single file has none)"""
    eval_split: str = "test"
    """split of the held-out problems (geometry3k: 601 test problems)"""
    eval_limit: int = 0
    """evaluate the first N usable held-out problems only (0: all)"""
    # logging and checkpoints
    save_every: int = 50
    """rollout steps between checkpoints"""
    keep_last: int = 2
    """checkpoints kept (the oldest are deleted)"""
    log_samples: int = 2
    """prompts per step whose responses go to samples.jsonl"""
    preset: str = ""
    """'authors': the authors' schedule where one GPU allows (APO_SPEC §8); explicit flags still win"""
    fsdp: bool = False
    """under torchrun: shard weights, gradients and Adam moments over the processes (FSDP2), for models that do not
    fit one GPU (a 7B with its Adam moments: ~83 GB); without it, each process holds a whole replica"""


PRESETS = {
    # APO_SPEC §8 on one GPU: same rollout and update sizes, generation split in batches of 64 sequences (memory).
    "authors": dict(prompts_per_step=128, max_new_tokens=4096, max_prompt_tokens=9216, max_pixels=2_560_000,
                    mini_batch_size=64, shuffle=False, epochs=2, generation_batch_size=64),
    # The toy task of toy.py: a tiny model, small images, short answers, minutes on a laptop CPU.
    "toy": dict(model="toy", prompts_per_step=8, group_size=8, max_new_tokens=32, lr=1e-3, min_lr=1e-4,
                mini_batch_size=64, micro_batch_size=64, max_pixels=168 * 168, min_pixels=28 * 28, kl_beta=0.02,
                gradient_checkpointing=False, steps=300, save_every=50, adam_betas=(0.9, 0.99), eval_every=25),
}


def parse_args(argv=None) -> Args:
    """Command line from the Args dataclass: one flag per field, its help being the field's docstring."""
    source = ast.parse(inspect.getsource(Args)).body[0].body
    docs = {a.target.id: b.value.value for a, b in zip(source, source[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr)}
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in dataclasses.fields(Args):
        # argparse %-formats help strings (for %(default)s): a literal % in a docstring must be written %%
        flag, help_ = "--" + f.name.replace("_", "-"), " ".join(docs[f.name].split()).replace("%", "%%")
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_)
        elif f.type is tuple:
            parser.add_argument(flag, type=float, nargs=len(f.default), default=f.default, help=help_)
        else:
            parser.add_argument(flag, type=f.type, default=f.default, help=help_)
    # A preset (or --data toy) changes the defaults; flags given explicitly still win.
    known, _ = parser.parse_known_args(argv)
    preset = known.preset or ("toy" if known.data == "toy" else "")
    if preset not in ("", *PRESETS):
        parser.error(f"--preset must be one of {sorted(PRESETS)}")
    parser.set_defaults(**PRESETS.get(preset, {}))
    args = Args(**vars(parser.parse_args(argv)))
    args.adam_betas = tuple(args.adam_betas)
    for flag, value, allowed in (("--loss-agg", args.loss_agg, ("token", "sequence")),
                                 ("--dtype", args.dtype, ("auto", "bfloat16", "float32"))):
        if value not in allowed:
            parser.error(f"{flag} must be one of {', '.join(allowed)}")
    if args.device not in ("auto", "cpu") and not args.device.startswith("cuda"):
        parser.error("--device must be 'auto', 'cpu' or 'cuda' (or 'cuda:N')")
    if args.group_size < 2:
        parser.error("--group-size must be at least 2: advantages are relative to the group")
    return args


# ---------------------------------------------------------------------------------------------------------- data
HUB_ALIASES = {"geo3k": "hiyouga/geometry3k"}


class BadRow(ValueError):
    """A row that cannot be trained on (missing image, empty problem, unparseable gold): skipped and counted."""


def load_table(args: Args):
    """The training rows as an indexable table, and the folder that relative image paths are resolved against.

    Every source goes through `datasets`, so a local folder in the Hub layout and the Hub id take the same path."""
    import datasets

    if args.data == "toy":
        import toy
        return toy.toy_dataset(args.split), None  # the same images whatever --seed: runs compare on one test split
    name = HUB_ALIASES.get(args.data, args.data)
    path = Path(name)
    if path.suffix in (".json", ".jsonl"):
        table = datasets.load_dataset("json", data_files=str(path), split="train")
        if "message" in table.column_names:  # the authors' format: a chat list (often JSON-encoded) + answer
            table = table.map(from_authors_format, remove_columns=table.column_names,
                              fn_kwargs={"answer_column": args.answer_column})
            args.image_column, args.problem_column, args.answer_column = "images", "problem", "answer"
        base = path.resolve().parent
    elif path.suffix == ".parquet":
        table, base = datasets.load_dataset("parquet", data_files=str(path), split="train"), path.resolve().parent
    else:  # a Hub dataset id, or a local folder laid out like one (data/train-*.parquet, ...)
        table = datasets.load_dataset(name, split=args.split)  # (datasets 5 never runs a dataset's own code)
        base = path.resolve() if path.is_dir() else None
    missing = [c for c in (args.image_column, args.problem_column, args.answer_column) if c not in table.column_names]
    if missing:
        raise ValueError(f"{args.data}: column(s) {missing} not found; it has {table.column_names}. "
                         "Name the right ones with --image-column / --problem-column / --answer-column.")
    if len(table) == 0:
        raise ValueError(f"{args.data} ({args.split}) has no rows")
    first = table[0]
    if not isinstance(first[args.problem_column], str):
        raise ValueError(f"{args.data}: column {args.problem_column!r} must hold text, "
                         f"found {type(first[args.problem_column]).__name__}")
    if not isinstance(first[args.image_column], (list, dict, str, bytes, Image.Image)):
        raise ValueError(f"{args.data}: column {args.image_column!r} must hold images, paths or bytes, "
                         f"found {type(first[args.image_column]).__name__}")
    return table, base


def from_authors_format(row: dict, answer_column: str = "answer") -> dict:
    """{'message': [{'role': 'user', 'content': [{'type': 'image', 'image': 'file:///x.jpg'}, {'type': 'text', ...}]}],
    'answer': ...} -> the geo3k columns {'images': [path], 'problem': text, 'answer': text}."""
    messages = json.loads(row["message"]) if isinstance(row["message"], str) else row["message"]
    parts = [p for m in messages if m.get("role") == "user" for p in
             (m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}])]
    images = [p.get("image", p.get("image_url", "")).removeprefix("file://") for p in parts if p.get("type") == "image"]
    text = "\n".join(p["text"] for p in parts if p.get("type") == "text")
    return {"images": images, "problem": text, "answer": str(row.get(answer_column, ""))}


def open_image(image, base: Path | None = None) -> Image.Image:
    """An image as a table holds it (PIL, {'bytes', 'path'}, bytes, or a path relative to `base`) -> PIL RGB;
    BadRow if there is none or it does not decode."""
    if isinstance(image, dict):  # an undecoded datasets Image: {'bytes': ..., 'path': ...}
        image = image.get("bytes") or image.get("path")
    if not isinstance(image, (bytes, str, Image.Image)):
        raise BadRow(f"no image ({type(image).__name__})")
    try:
        if isinstance(image, bytes):
            image = Image.open(io.BytesIO(image))
        elif isinstance(image, str):
            # A relative path is relative to the data file, not to wherever the command was started.
            image = Image.open(base / image if base is not None and not os.path.isabs(image) else image)
        image.load()
        return image.convert("RGB")
    except (OSError, ValueError) as err:
        raise BadRow(f"unreadable image: {err}") from None


def prepare_example(row: dict, args: Args, base: Path | None) -> dict:
    """One table row -> {'images': [PIL RGB], 'problem': str, 'answer': str}, or BadRow with the reason."""
    image = row.get(args.image_column)
    image = open_image((image or [None])[0] if isinstance(image, list) else image, base)  # training keeps one
    problem, answer = row.get(args.problem_column), row.get(args.answer_column)
    if not isinstance(problem, str) or not problem.replace("<image>", "").strip():
        raise BadRow("empty problem")
    answer = "" if answer is None else str(answer)
    if reward.parse_gold(answer) is None:  # APO_SPEC §1 Decision: a data error, not a free reward
        raise BadRow(f"unparseable gold answer {answer[:60]!r}")
    return {"images": [image], "problem": problem, "answer": answer}


def usable_example(row: dict, args: Args, base: Path | None, processor) -> dict:
    """prepare_example, and a prompt that fits --max-prompt-tokens; BadRow otherwise."""
    example = prepare_example(row, args, base)
    n_tokens = rollout.encode_prompts(processor, [example["images"]], [example["problem"]], args.min_pixels,
                                      args.max_pixels)["input_ids"].shape[1]
    if n_tokens > args.max_prompt_tokens:
        raise BadRow(f"prompt of {n_tokens} tokens > --max-prompt-tokens {args.max_prompt_tokens}")
    return example


def data_order(n_rows: int, position: int, seed: int, shuffle: bool) -> int:
    """Row index at global `position` (positions run on across passes): pass k is a permutation seeded by seed+k,
    so the order depends on nothing but the seed, and a resumed run picks up at the same row."""
    epoch, offset = divmod(position, n_rows)
    return permutation(n_rows, seed + epoch)[offset] if shuffle else offset


@functools.lru_cache(maxsize=2)
def permutation(n: int, seed: int) -> list:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


# ------------------------------------------------------------------------------------------- group advantage, §2
def grpo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """GRPO's group-normalized advantage (APO_SPEC §2). rewards [B, G] -> [B, G].

    A group whose rewards are all equal has std 0 and gets 0 everywhere: it carries no learning signal."""
    mean = rewards.mean(-1, keepdim=True)                    # [B, 1]
    std = rewards.std(-1, keepdim=True)                      # [B, 1], unbiased (n-1), as the authors
    return (rewards - mean) / (std + 1e-9)                   # Â⁰_i = (r_i − mean_g r) / (std_g r + 1e-9)


# ------------------------------------------------------------------------------------------------------ STCR, §4
def stcr_weights(correct: torch.Tensor, lengths: torch.Tensor, base: float = 1.00001) -> torch.Tensor:
    """STCR's advantage multiplier (1 + w) (APO_SPEC §4). correct [B, G] (bool), lengths [B, G] -> [B, G].

    Only a wrong response longer than the mean of its group's correct ones gets w > 0; correct responses, shorter
    wrong ones, and every response of a group with no correct one (L⁺ undefined) get w = 0. Two facts the authors'
    setting implies: w ≈ Δ·ln(base) ≈ 1e-5·Δ, so the effect is small at these lengths (w ≈ 0.01 at 1000 extra
    tokens, 0.04 at 4096);
    and since the advantage also counts format, a wrong but well-formatted response can have Â⁰ > 0, which STCR
    then *amplifies*. Both are kept as the authors have them; `--stcr-base` tunes the strength.
    Computed in float64: in float32, 1.00001 itself is off by 0.14% in its logarithm."""
    correct, lengths = correct.bool(), lengths.double()
    n_correct = correct.sum(-1, keepdim=True)                                         # k_g, [B, 1]
    mean_len_correct = (lengths * correct).sum(-1, keepdim=True) / n_correct.clamp(min=1)  # L⁺_g, [B, 1]
    excess = lengths - mean_len_correct                                               # Δ_i, [B, G]
    w = -torch.expm1(-excess * math.log(base))                                        # w_i = 1 − base^(−Δ_i)
    w = torch.where(~correct & (n_correct > 0) & (excess > 0), w, torch.zeros_like(w))
    return (1 + w).float()                                                            # Â_i = (1 + w_i)·Â⁰_i


# ------------------------------------------------------------------------------------------------------ DADS, §5
def dads_kl_weights(advantages: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """DADS's KL weight κ (APO_SPEC §3, §5). advantages [B, G] (after STCR), correct [B, G] (bool) -> [B, G].

    A positive response (Â_i > 0: the authors test the advantage, not the accuracy) gets κ = f(d) of its group's
    difficulty d; every other response gets κ = 1. Easy prompt (d small): κ ≈ 1, full KL. Hard prompt (d → 1):
    κ → 0, a rare success may move further from the reference.
    (The authors' code also holds, commented out, the variant f(d) = exp(−e·d); not implemented here.)"""
    G = correct.shape[-1]
    difficulty = 1 - correct.float().sum(-1, keepdim=True) / G                       # d_g = 1 − k_g/G, [B, 1]
    f = 1 - torch.exp(-math.e * (1 - difficulty))                                    # f(d) = 1 − e^(−e·(1 − d))
    f = torch.where((difficulty == 0) | (difficulty == 1), torch.ones_like(f), f)    # f(0) = f(1) = 1
    return torch.where(advantages > 0, f.expand_as(advantages), torch.ones_like(advantages))


# ------------------------------------------------------------------------------------------------------ loss, §6-7
def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(π_θ ‖ π_ref) (APO_SPEC §6): [n, T], [n, T] -> [n, T], always ≥ 0.
    Unbiased for the KL under samples from π_θ, with lower variance than log π_θ − log π_ref."""
    log_ratio = ref_logp - logp                               # ℓ_ref,t − ℓ_θ,t
    return log_ratio.exp() - log_ratio - 1                    # kl_t = e^(ℓ_ref − ℓ_θ) − (ℓ_ref − ℓ_θ) − 1


def policy_loss(logp, old_logp, advantages, mask, clip_eps=0.2, agg="token", token_total=None, seq_total=None):
    """PPO-clip policy loss (APO_SPEC §7). logp, old_logp, mask [n, T]; advantages [n] -> (loss, clip fraction).

    `token_total` / `seq_total` are the token and sequence counts of the whole optimizer mini-batch: a micro-batch
    divides by them, so that the gradients summed over micro-batches equal those of the mini-batch at once."""
    mask = mask.float()
    ratio = torch.exp(logp - old_logp)                                      # ρ_t = exp(ℓ_θ,t − ℓ_old,t), [n, T]
    adv = advantages[:, None]                                               # the same Â_i on every token, [n, 1]
    clipped_ratio = ratio.clamp(1 - clip_eps, 1 + clip_eps)
    per_token = -torch.minimum(ratio * adv, clipped_ratio * adv)            # −min(ρ_t Â_i, clip(ρ_t, 1±ε) Â_i)
    clipped = (clipped_ratio * adv < ratio * adv).float()                   # tokens where the clip binds
    if agg == "token":   # mean over every response token of the mini-batch (default, APO_SPEC §7 Decision)
        loss = (per_token * mask).sum() / (token_total or mask.sum())
    else:                # mean over each response's tokens, then over responses (the GRPO paper's form)
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum() / (seq_total or mask.shape[0])
    clip_fraction = (clipped * mask).sum() / mask.sum().clamp(min=1)
    return loss, clip_fraction.detach()


def apo_loss(logp, old_logp, ref_logp, advantages, kl_weights, mask, kl_beta=1e-3, clip_eps=0.2, agg="token",
             token_total=None, seq_total=None):
    """The total loss (APO_SPEC §6-7). Tensors [n, T]; advantages, kl_weights (κ) [n].
    Returns (loss, stats) with the policy term, the κ-weighted KL term and the clip fraction."""
    pg_loss, clip_fraction = policy_loss(logp, old_logp, advantages, mask, clip_eps, agg, token_total, seq_total)
    mask = mask.float()
    kl_per_seq = (k3_kl(logp, ref_logp) * mask).sum(-1) / mask.sum(-1).clamp(min=1)   # KL_i, [n]
    kl_loss = (kl_weights * kl_per_seq).sum() / (seq_total or mask.shape[0])           # L_kl = mean_i κ_i·KL_i
    loss = pg_loss + kl_beta * kl_loss                                                 # L = L_pg + β·L_kl
    stats = {"pg_loss": pg_loss.detach(), "kl_loss": kl_loss.detach(), "clip_fraction": clip_fraction,
             "kl": kl_per_seq.detach().sum() / (seq_total or mask.shape[0])}  # unweighted mean KL_i, for the log
    return loss, stats


# ---------------------------------------------------------------------------------------------------- update, §8
def stochastic_round_to_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """fp32 -> bf16, rounding up or down at random with probabilities that make the result unbiased: E[out] = x.
    bf16 keeps the top 16 bits of an fp32; adding uniform noise to the 16 bits dropped before truncating does it."""
    bits = x.view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=x.device, generator=generator)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)  # -65536 = 0xFFFF0000


class AdamW(torch.optim.Optimizer):
    """AdamW with fp32 moments whatever the weights' dtype, and stochastic rounding for bf16 weights.

    Why: the authors keep fp32 master weights (ZeRO-2 over 8 GPUs). On one GPU, fp32 weights + fp32 Adam for policy
    and reference would take 63 GiB before a single activation. Here the weights are bf16 (2 bytes) and only the
    moments are fp32 (8 bytes). The catch: an Adam update is ~lr = 1e-6 per weight, while bf16 weights of size
    0.02 are 1.2e-4 apart, so rounding to nearest would throw every update away. Stochastic rounding moves a weight
    to the next bf16 value with probability (update / spacing): each weight follows its fp32 trajectory in
    expectation. For fp32 weights this is exactly torch.optim.AdamW (same operations in the same order).

    The update runs on slices of `slice_size` weights: its fp32 temporaries (gradient, denominator, weight, and the
    rounding's noise) take ~24 bytes per weight of a slice, 0.4 GiB, where a whole 151,936 × 2048 embedding would
    take 7 GiB at the moment memory is fullest (weights, moments and gradients all resident).

    The rounding draws from a generator of its own, seeded alike on every rank: data-parallel replicas then round
    alike and stay bit-identical (drawn from each rank's sampling stream, they drifted apart after one bf16 update).
    Under FSDP2 the weights are DTensors: the math runs on each rank's local shard."""

    slice_size = 1 << 24

    def __init__(self, params, lr=1e-6, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, seed=0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        device = self.param_groups[0]["params"][0].device
        self.generator = torch.Generator(device).manual_seed(seed)

    def load_state_dict(self, state_dict: dict):
        """As torch's, except that the moments stay fp32: torch casts a loaded state to each weight's dtype, which
        for bf16 weights rounds the moments to bf16 (and the next step then fails on the mix of dtypes)."""
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        saved = [state_dict["state"].get(i) for group in state_dict["param_groups"] for i in group["params"]]
        for p, state in zip(params, saved):
            for key in ("exp_avg", "exp_avg_sq"):
                if state is not None and key in state:
                    self.state[p][key] = state[key].to(device=p.device, dtype=torch.float32)

    @torch.no_grad()
    def step(self, closure=None):  # (closure: torch.distributed.checkpoint calls step(closure=None) to build state)
        local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731  (a DTensor's shard)
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(p, dtype=torch.float32),
                                 exp_avg_sq=torch.zeros_like(p, dtype=torch.float32))
                state["step"] += 1
                t = state["step"]
                slices = (local(x).view(-1).split(self.slice_size) for x in (p, state["exp_avg"], state["exp_avg_sq"]))
                for w, m, v, grad in zip(*slices, local(p.grad).reshape(-1).split(self.slice_size)):
                    grad = grad.float()
                    m.lerp_(grad, 1 - beta1)                                 # m_t = β1·m + (1 − β1)·g
                    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)      # v_t = β2·v + (1 − β2)·g²
                    denom = (v.sqrt() / (1 - beta2 ** t) ** 0.5).add_(eps)  # √v̂ + ε, v̂ = v_t / (1 − β2^t)
                    weight = w.float().mul_(1 - lr * wd)                     # decoupled decay: w ← w·(1 − lr·λ)
                    weight.addcdiv_(m, denom, value=-lr / (1 - beta1 ** t))  # w ← w − lr·m̂/(√v̂ + ε)
                    w.copy_(stochastic_round_to_bf16(weight, self.generator) if w.dtype == torch.bfloat16 else weight)


def cosine_schedule(step: int, total: int, warmup_ratio: float, lr: float, min_lr: float) -> float:
    """Learning rate at optimizer step `step`: linear warmup, then cosine from lr to min_lr (authors' schedule)."""
    warmup = math.ceil(total * warmup_ratio)
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def minibatch_gradients(model, batch: dict, rows: list, args: Args) -> dict:
    """Backward of the loss over the responses `rows` of a rollout batch, in micro-batches of args.micro_batch_size:
    the gradients accumulate in the parameters' .grad. Returns the loss and its terms, each a float.

    Many GPUs: `rows` are this rank's share of the mini-batch. The loss divides by the token and sequence counts of
    the whole mini-batch, summed over ranks, and the gradients are then summed over ranks: the gradient is exactly
    that of one process on all the responses (so are the terms returned)."""
    device = model.device
    token_total, seq_total = parallel.total([batch["response_mask"][rows].sum().item(), len(rows)])
    sums = dict.fromkeys(("loss", "pg_loss", "kl_loss", "kl", "clip_fraction", "entropy"), 0.0)
    for start in range(0, len(rows), args.micro_batch_size):
        micro = rollout.select(batch, rows[start:start + args.micro_batch_size])
        logp, entropy = rollout.response_logprobs(model, micro, args.temperature, args.logprob_chunk)  # [n, T]
        mask = micro["response_mask"].to(device)
        old_logp = micro["old_logp"].to(device) if "old_logp" in micro else logp.detach()
        ref_logp = micro["ref_logp"].to(device) if micro.get("ref_logp") is not None else logp.detach()
        loss, stats = apo_loss(logp, old_logp, ref_logp, micro["advantages"].to(device),
                               micro["kl_weights"].to(device), mask, args.kl_beta, args.clip_eps, args.loss_agg,
                               token_total, seq_total)
        loss.backward()
        share = mask.sum().item() / token_total  # this micro-batch's share of the mini-batch's tokens
        sums["loss"] += loss.item()
        for k in ("pg_loss", "kl_loss", "kl"):
            sums[k] += stats[k].item()
        sums["clip_fraction"] += stats["clip_fraction"].item() * share
        sums["entropy"] += (entropy * mask).sum().item() / token_total
    parallel.sync_gradients(model)
    return dict(zip(sums, parallel.total(list(sums.values()))))


def update_policy(model, batch: dict, optimizer, args: Args, lrs: list) -> dict:
    """One pass over a rollout's B·G responses (APO_SPEC §8): shuffled mini-batches of `args.mini_batch_size`
    responses, one optimizer step each at learning rate lrs[i] (on many GPUs, each rank holds 1/W of each).

    `batch` is a rollout batch (rollout.py) plus advantages and kl_weights [N], ref_logp [N, T] (None without a
    reference), and old_logp [N, T] unless there is a single mini-batch: then ℓ_old is ℓ_θ itself (detached), the
    ratio is 1 and the clip never binds, which is exact on-policy GRPO and saves a forward pass.
    Returns the stats averaged over the mini-batches, and `finite`: per optimizer step, whether it was taken. A step
    with a non-finite loss or gradient norm is skipped: it would poison the weights and the Adam moments."""
    N, per_rank, n_updates = batch["input_ids"].shape[0], args.mini_batch_size // parallel.world(), len(lrs)
    order = torch.randperm(N).tolist()
    sums = {"pg_loss": 0.0, "kl_loss": 0.0, "kl": 0.0, "clip_fraction": 0.0, "entropy": 0.0, "grad_norm": 0.0,
            "finite": []}
    for lr, start in zip(lrs, range(0, N, per_rank)):
        optimizer.zero_grad(set_to_none=True)
        stats = minibatch_gradients(model, batch, order[start:start + per_rank], args)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        for k in ("pg_loss", "kl_loss", "kl", "clip_fraction", "entropy"):
            sums[k] += stats[k] / n_updates
        sums["grad_norm"] += grad_norm / n_updates
        # Both are global values, the same on every rank: all ranks take the step, or none.
        finite = math.isfinite(stats["loss"]) and math.isfinite(grad_norm)
        if finite:
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
        sums["finite"].append(finite)
    optimizer.zero_grad(set_to_none=True)
    return sums


# ------------------------------------------------------------------------------------------ models and checkpoints
def resolve_device(args: Args) -> tuple:
    if args.device == "auto":
        if torch.cuda.is_available():
            args.device = "cuda"
        elif args.model == "toy" or args.data == "toy":
            args.device = "cpu"
        else:
            sys.exit(f"No CUDA GPU found. Training {args.model} on a CPU would take hours per step; "
                     "pass --device cpu to force it anyway, or try `python apo.py --data toy` (minutes on a CPU).")
    dtype = {"auto": torch.bfloat16 if args.device.startswith("cuda") else torch.float32,
             "bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    if args.device == "cpu" and "toy" in (args.model, args.data):
        torch.set_num_threads(1)  # toy-sized matrices gain nothing from threads, and on a busy CPU lose ~10x
    return torch.device(args.device), dtype


def load_model(name: str, dtype, device, trust_remote_code: bool = False):
    """A Qwen2.5-VL policy and its processor, from a Hub id or a local folder (safetensors only)."""
    from transformers import AutoConfig, AutoProcessor, Qwen2_5_VLForConditionalGeneration

    if name == "toy":
        import toy
        name = str(toy.starting_model())
    config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    if config.model_type != "qwen2_5_vl":
        raise ValueError(f"{name} is a {config.model_type!r} model; this project trains Qwen2.5-VL checkpoints")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        name, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code).to(device)
    processor = AutoProcessor.from_pretrained(name, trust_remote_code=trust_remote_code)
    return model, processor


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


# ------------------------------------------------------------------------------------------------------- logging
def held_out_examples(args: Args, processor) -> list:
    """The problems evaluated during training: the usable rows of --eval-data (default: the training data) in
    --eval-split, up to --eval-limit of them; [] when evaluation is off or there is no such split."""
    if not args.eval_every:
        return []
    say = print if parallel.is_main() else lambda *_: None
    if not args.eval_data and Path(args.data).suffix in (".json", ".jsonl", ".parquet"):
        say(f"no held-out evaluation: {args.data} has no {args.eval_split} split (name one with --eval-data)")
        return []
    held_out = dataclasses.replace(args, data=args.eval_data or args.data, split=args.eval_split)
    try:
        table, base = load_table(held_out)
    except ValueError as err:  # datasets: "Unknown split"
        say(f"no held-out evaluation: {err}")
        return []
    examples, skipped = [], 0
    for index in range(len(table)):
        if args.eval_limit and len(examples) == args.eval_limit:
            break
        try:
            examples.append(usable_example(table[index], held_out, base, processor))
        except (BadRow, OSError):
            skipped += 1
    say(f"held-out evaluation: {len(examples)} problems of {held_out.data} ({held_out.split}; {skipped} bad rows "
        f"skipped), at step 0, every {args.eval_every} steps and at the end")
    return examples


def evaluate(model, processor, examples: list, args: Args) -> dict:
    """Greedy answers to held-out problems, with the training prompt and rewards: accuracy, format rate, length.
    (Many GPUs: each rank answers its share, and the counts are summed.)"""
    greedy = rollout.generation_config(processor, args.max_new_tokens, 1.0, 1.0, do_sample=False)
    batch = args.generation_batch_size or args.prompts_per_step * args.group_size  # as much as a rollout holds
    mine = parallel.share(examples)
    with parallel.full_weights(model):
        answers = rollout.answer(model, processor, mine, greedy, batch, args.min_pixels, args.max_pixels)
    texts = [a["texts"][0] for a in answers]
    correct, formatted, length, truncated, n = parallel.total([
        sum(reward.accuracy_reward(t, e["answer"]) for t, e in zip(texts, mine)),
        sum(reward.format_reward(t) > 0 for t in texts), sum(a["lengths"][0] for a in answers),
        sum(a["truncated"][0] for a in answers), len(mine)])
    return {"accuracy": correct / n, "format_rate": formatted / n, "response_length": length / n,
            "truncated_rate": truncated / n, "problems": int(n)}


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


# ------------------------------------------------------------------------------------------------- training loop
def train(args: Args) -> Path:
    """Run APO as configured; returns the run folder. Under torchrun every process runs this, each on its share of
    the step's prompts; the calls to `parallel` are where they meet (each a no-op in a single process)."""
    from tqdm import tqdm

    out = Path(args.out)
    device, dtype = resolve_device(args)
    rank, world, device = parallel.init(str(device))
    device, main = torch.device(device), parallel.is_main()  # rank 0 alone writes files and prints
    random.seed(args.seed + rank)  # sampling differs per rank; rank 0 samples as a single process does
    torch.manual_seed(args.seed + rank)
    if args.prompts_per_step % world or args.mini_batch_size % world:
        sys.exit(f"--prompts-per-step ({args.prompts_per_step}) and --mini-batch-size ({args.mini_batch_size}) must "
                 f"divide by the number of processes ({world})")
    if out.exists() and any(out.glob("*.jsonl")) and not args.resume:
        sys.exit(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
    resume_from = latest_checkpoint(out) if args.resume else None
    if args.resume and resume_from is None:
        sys.exit(f"--resume: no checkpoint found in {out}")
    if resume_from and (resume_from / "sharded").exists() != args.fsdp:
        sys.exit(f"{resume_from} was saved {'with' if args.fsdp else 'without'} --fsdp: resume the same way")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps({**dataclasses.asdict(args), "world_size": world}, indent=2))

    # data
    table, base = load_table(args)
    steps = args.steps or args.epochs * len(table) // args.prompts_per_step
    responses_per_step = args.prompts_per_step * args.group_size
    minibatches_per_step = math.ceil(responses_per_step / args.mini_batch_size)
    on_policy = minibatches_per_step == 1  # one optimizer step per rollout: ℓ_old = ℓ_θ, no separate pass needed

    # models: the policy, and the frozen reference it is kept close to (APO_SPEC §6)
    model, processor = load_model(str(resume_from if resume_from and not args.fsdp else args.model), dtype, device,
                                  args.trust_remote_code)  # (--fsdp: the weights come from sharded/ below)
    reference = None
    if args.kl_beta > 0:  # always the starting model, also when resuming
        reference, _ = load_model(args.model, dtype, device, args.trust_remote_code)
        reference.eval().requires_grad_(False)
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    if args.fsdp:
        parallel.shard(model)
    optimizer = AdamW(model.parameters(), lr=args.lr, betas=args.adam_betas, weight_decay=args.weight_decay,
                      seed=args.seed)
    total_updates = steps * minibatches_per_step
    lr_at = lambda update: cosine_schedule(update, total_updates, args.warmup_ratio, args.lr, args.min_lr)  # noqa
    gen_config = rollout.generation_config(processor, args.max_new_tokens, args.temperature, args.top_p)

    state = {"step": 0, "position": 0, "updates": 0, "bad_rows": 0, "skipped_updates": 0, "bad_in_a_row": 0,
             "steps": steps}
    if args.resume:
        # weights_only: the state holds tensors and plain data, so no pickled code can run on loading
        saved = torch.load(resume_from / "trainer_state.pt", weights_only=True)
        rngs = saved["rng"] if isinstance(saved["rng"], list) else [saved["rng"]]  # one per process
        if len(rngs) != world:
            sys.exit(f"{resume_from} was saved by {len(rngs)} process(es): resume with as many")
        if args.fsdp:
            parallel.load_sharded(model, optimizer, resume_from / "sharded")
        else:
            optimizer.load_state_dict(saved["optimizer"])
        set_rng_state(rngs[rank], optimizer)
        state = saved["state"]
        # Drop what was logged after that checkpoint: it is redone. A step's metrics and samples are logged during
        # the step, an evaluation at step s after s steps (step 0: before any).
        for name, kept in (("metrics", range(state["step"])), ("samples", range(state["step"])),
                           ("eval", range(state["step"] + 1))):
            path = out / f"{name}.jsonl"
            if main and path.exists():
                lines = [l for l in path.read_text().splitlines() if json.loads(l)["step"] in kept]
                path.write_text("".join(l + "\n" for l in lines))
        parallel.barrier()
        if main:
            print(f"resumed from {resume_from} at step {state['step']}")
        if state["step"] >= steps:
            if main:
                print(f"{out} has done {state['step']} steps already: nothing to do (a larger --steps extends it)")
            return out
        if state.get("steps", steps) != steps:  # an extended run: the schedule is that of a run of `steps` steps
            if main:
                print(f"the run was planned for {state['steps']} steps, now {steps}: the learning rate follows the "
                      f"{steps}-step schedule from here on ({lr_at(state['updates'] - 1):.3g} -> "
                      f"{lr_at(state['updates']):.3g})")
            state["steps"] = steps
    seen_bad = set()
    held_out = held_out_examples(args, processor)
    evaluated = {json.loads(l)["step"] for l in (out / "eval.jsonl").read_text().splitlines()} \
        if (out / "eval.jsonl").exists() else set()

    def evaluate_after(done: int):
        """Held-out evaluation of the policy after `done` steps: at 0, every --eval-every steps, at the end."""
        if held_out and (done % args.eval_every == 0 or done == steps) and done not in evaluated:
            timer = time.perf_counter()
            result = {"step": done, **evaluate(model, processor, held_out, args),
                      "seconds": time.perf_counter() - timer}
            evaluated.add(done)
            if main:
                with open(out / "eval.jsonl", "a") as f:
                    f.write(json.dumps(result) + "\n")
                tqdm.write(f"step {done}: held-out accuracy {result['accuracy']:.3f}, format "
                           f"{result['format_rate']:.3f} ({result['problems']} problems, {result['seconds']:.1f} s)")

    def checkpoint(name: str, keep_last: int = args.keep_last):
        trainer_state = {"rng": parallel.gather_objects(rng_state(optimizer)), "state": dict(state),
                         "args": dataclasses.asdict(args)}
        save_checkpoint(out, name, model, processor, trainer_state, optimizer, keep_last)
        if main:
            plot_curves([out], out / "curves.png")  # redrawn at each checkpoint and at the end

    bar = tqdm(range(state["step"], steps), initial=state["step"], total=steps, desc="APO" if args.dads or args.stcr
               else "GRPO", dynamic_ncols=True, disable=not main)
    evaluate_after(state["step"])
    for step in bar:
        timer = time.perf_counter()

        # --- data: B good rows; a bad row is skipped, counted, and named once (the position moves on either way)
        examples, skipped_here = [], 0
        while len(examples) < args.prompts_per_step:
            index = data_order(len(table), state["position"], args.seed, args.shuffle)
            state["position"] += 1
            try:  # (reading the row decodes its image: a corrupt one fails right here)
                examples.append(usable_example(table[index], args, base, processor))
            except (BadRow, OSError) as err:
                state["bad_rows"] += 1
                skipped_here += 1
                if main and index not in seen_bad:
                    seen_bad.add(index)
                    tqdm.write(f"skipping row {index}: {err}")
                if skipped_here > len(table):
                    sys.exit(f"no usable row in a whole pass over {args.data}: check the data")
        # many GPUs: every rank chose the same B rows; it keeps its block of B/W of them
        mine = parallel.share(list(range(len(examples))))
        examples = [examples[i] for i in mine]
        prompts = rollout.encode_prompts(processor, [e["images"] for e in examples],
                                         [e["problem"] for e in examples], args.min_pixels, args.max_pixels)

        # --- rollout: G responses per prompt (rollout.py)
        with parallel.full_weights(model):  # --fsdp: the whole weights on every rank, gathered once for the rollout
            batch = rollout.sample_responses(model, processor, prompts, args.group_size, gen_config,
                                             args.generation_batch_size, seed=(args.seed, step), first_prompt=mine[0])
        t_rollout = time.perf_counter() - timer

        # --- reward (APO_SPEC §1): r_i = acc_i + fmt_i
        timer = time.perf_counter()
        answers = [e["answer"] for e in examples for _ in range(args.group_size)]
        accuracy = torch.tensor([reward.accuracy_reward(t, a) for t, a in zip(batch["texts"], answers)])
        fmt = torch.tensor([reward.format_reward(t) for t in batch["texts"]])
        B, G = len(examples), args.group_size
        rewards = (accuracy + fmt).view(B, G)                                                     # r, [B, G]
        correct, lengths = (accuracy > 0).view(B, G), batch["lengths"].view(B, G)                 # acc, |o|, [B, G]
        t_reward = time.perf_counter() - timer

        # --- group advantage (§2), STCR (§4), DADS (§5)
        advantages0 = grpo_advantages(rewards)                                                    # Â⁰, [B, G]
        stcr = stcr_weights(correct, lengths, args.stcr_base) if args.stcr else torch.ones(B, G)  # 1 + w, [B, G]
        advantages = stcr * advantages0                                                           # Â, [B, G]
        kl_weights = dads_kl_weights(advantages, correct) if args.dads else torch.ones(B, G)      # κ, [B, G]
        batch["advantages"], batch["kl_weights"] = advantages.flatten(), kl_weights.flatten()     # [N]

        # --- log-probs of the rollout-time policy (ℓ_old) and of the reference (ℓ_ref), [N, T]
        timer = time.perf_counter()
        if not on_policy:
            batch["old_logp"], _ = rollout.batched_logprobs(model, batch, args.temperature, args.micro_batch_size,
                                                            args.logprob_chunk)
        batch["ref_logp"] = (rollout.batched_logprobs(reference, batch, args.temperature, args.micro_batch_size,
                                                      args.logprob_chunk)[0] if reference is not None else None)
        t_logprobs = time.perf_counter() - timer

        # --- update: one pass over the B·G responses in mini-batches (§8)
        timer = time.perf_counter()
        lrs = [lr_at(state["updates"] + i) for i in range(minibatches_per_step)]
        sums = update_policy(model, batch, optimizer, args, lrs)
        state["updates"] += minibatches_per_step
        for finite in sums.pop("finite"):
            state["bad_in_a_row"] = 0 if finite else state["bad_in_a_row"] + 1
            state["skipped_updates"] += not finite
        t_update = time.perf_counter() - timer
        state["step"] = step + 1

        # --- logging: one JSON line per step (metrics.jsonl) and a few full samples (samples.jsonl). The metrics
        # are over all B·G responses of the step: every rank's, gathered in prompt order (means of per-rank means
        # would be wrong for the conditional ones).
        rewards_all, accuracy_all, fmt_all, lengths_all, advantages_all, stcr_all, kl_weights_all, truncated_all = \
            parallel.gather(torch.stack([rewards.flatten(), accuracy, fmt, lengths.flatten().float(),
                                         advantages.flatten(), stcr.flatten(), kl_weights.flatten(),
                                         batch["truncated"].float()], 1)).T                        # [W·N] each
        right, wrong, positive = accuracy_all > 0, accuracy_all == 0, advantages_all > 0
        seconds = parallel.total([t_rollout, t_reward, t_logprobs, t_update], op="max")  # the slowest rank's
        metrics = {
            "step": step, "reward": rewards_all.mean().item(), "accuracy": accuracy_all.mean().item(),
            "format_rate": (fmt_all > 0).float().mean().item(), "response_length": lengths_all.mean().item(),
            "response_tokens": int(lengths_all.sum().item()),  # over all processes: B·G responses, each once
            "response_length_correct": lengths_all[right].mean().item() if right.any() else None,
            "response_length_wrong": lengths_all[wrong].mean().item() if wrong.any() else None,
            "truncated_rate": truncated_all.mean().item(),
            **{k: sums[k] for k in ("kl", "kl_loss", "entropy", "clip_fraction", "pg_loss", "grad_norm")},
            "dads_weight_pos_mean": kl_weights_all[positive].mean().item() if positive.any() else None,
            "stcr_mult_neg_mean": stcr_all[wrong].mean().item() if wrong.any() else None,
            "stcr_mult_neg_max": stcr_all[wrong].max().item() if wrong.any() else None,
            "equal_reward_groups": (rewards_all.view(-1, G).std(-1) == 0).float().mean().item(),
            "lr": optimizer.param_groups[0]["lr"], "bad_rows": state["bad_rows"],
            "skipped_updates": state["skipped_updates"], "world_size": world,
            **dict(zip(("seconds_rollout", "seconds_reward", "seconds_logprobs", "seconds_update"), seconds)),
        }
        if main:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
            with open(out / "samples.jsonl", "a") as f:
                for b in range(min(args.log_samples, B)):
                    f.write(json.dumps({"step": step, "problem": examples[b]["problem"],
                                        "answer": examples[b]["answer"], "responses": batch["texts"][b * G:(b + 1) * G],
                                        "rewards": rewards[b].tolist(), "advantages": advantages[b].tolist()}) + "\n")
        bar.set_postfix(reward=f"{metrics['reward']:.3f}", acc=f"{metrics['accuracy']:.2f}",
                        len=f"{metrics['response_length']:.0f}")
        evaluate_after(step + 1)

        if state["bad_in_a_row"] >= args.max_bad_updates:
            checkpoint(f"checkpoint-{step + 1:06d}")
            sys.exit(f"{state['bad_in_a_row']} updates in a row had a non-finite loss or gradient: stopped after "
                     f"saving {out}/checkpoint-{step + 1:06d}. Lower --lr or check the data.")
        stop = parallel.total([len(STOP)], op="max")[0] > 0  # a signal to any rank stops them all, after this step
        if stop or (step + 1) % args.save_every == 0:
            checkpoint(f"checkpoint-{step + 1:06d}")
        if stop:
            if main:
                print(f"\nstopped by signal {STOP[0] if STOP else 'to another process'}: saved "
                      f"{out}/checkpoint-{step + 1:06d}; continue with the same command and --resume")
            return out
    bar.close()
    checkpoint("final", keep_last=0)
    return out


def request_stop(signum, frame):
    """SIGINT / SIGTERM: the step under way finishes, a checkpoint is saved, the run exits (a second SIGINT: at
    once)."""
    if STOP and signum == signal.SIGINT:
        raise KeyboardInterrupt
    STOP.append(signum)


STOP = []  # signals received, checked after every step


if __name__ == "__main__":
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, request_stop)
    try:
        train(parse_args())
    finally:
        parallel.close()
