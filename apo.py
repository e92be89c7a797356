"""APO: Asymmetric Policy Optimization for Qwen2.5-VL (arXiv 2506.21655), the method in one file.

APO is GRPO (G responses per prompt, each one's advantage its reward relative to its group) with
two asymmetric terms; docs/APO_SPEC.md gives the exact math, and each function cites its section:
  - STCR, on negatives (§4): `stcr_multiplier`, Â = (1 + w)·Â⁰ for a wrong response longer than
    its group's correct ones;
  - DADS, on positives (§5): `dads_kl_weights`, each positive response's KL term weighted by
    κ = f(d), below 1 on hard prompts (d: the difficulty, §3), so that a rare success may move
    further from the reference.
Both are switched on in `apo_step` and act in `apo_loss`, nowhere else (`--no-dads --no-stcr`:
GRPO with the same k3 KL loss). Read top to bottom: the arguments, §2-§8, `apo_step` (one whole
step), the driver. `rollout.py` samples and computes log-probs, `reward.py` scores, `eval.py`
evaluates; `plumbing/` holds what is not the method (data, models, the run folder, the optimizer,
the command line, many GPUs).

Where the method departs from the paper (docs/DEVIATIONS.md lists all, with reasons): the policy
term is a mean over the mini-batch's tokens (deviation 1); with one optimizer step per rollout,
ℓ_old is ℓ_θ itself, detached (6); mini-batches are whole groups (17); one GPU's sizes (5).
"""

import dataclasses
import math
import random
import sys
from pathlib import Path

import torch

import eval as evaluation
import reward
import rollout
from plumbing import data, flags, models, parallel, pictures, run_folder
from plumbing.adamw import AdamW


# ---------------------------------------------------------------------------------------- arguments
@dataclasses.dataclass
class Args:
    # the method (APO_SPEC §2-§8)
    group_size: int = 8
    """G, responses sampled per prompt (authors: 8)"""
    kl_beta: float = 1e-3
    """β, weight of the k3 KL loss toward the reference (authors: 1e-3); 0 drops the reference"""
    clip_eps: float = 0.2
    """PPO clip range ε (authors: 0.2)"""
    dads: bool = True
    """DADS: difficulty-weighted KL for positive samples (--no-dads switches it off)"""
    stcr: bool = True
    """STCR: longer wrong responses get more negative advantages (--no-stcr switches it off)"""
    stcr_base: float = 1.00001
    """base of STCR's weight 1 - base^(-Δ) (authors: 1.00001)"""
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
    loss_agg: str = "token"
    """policy-loss mean: 'token' (over the mini-batch's response tokens) or 'sequence' (per
    response first)"""
    temperature: float = 1.0
    """sampling temperature; log-probs are computed at the same temperature (authors: 1.0)"""
    top_p: float = 1.0
    """nucleus sampling (authors: 1.0)"""
    # the size of a step and of the run (APO_SPEC §8)
    prompts_per_step: int = 16
    """B, prompts per rollout (authors: 128 on 8 GPUs)"""
    mini_batch_size: int = 64
    """responses per optimizer step (authors: 64): B·G / mini_batch_size steps per rollout"""
    max_new_tokens: int = 1024
    """response length limit (authors: 4096)"""
    steps: int = 0
    """rollout steps to run (0: `epochs` passes over the data)"""
    epochs: int = 2
    """passes over the data when --steps is 0 (authors: 2)"""
    seed: int = 0
    """seed of data order, sampling and initialization of everything random"""
    # model and data
    model: str = "Qwen/Qwen2.5-VL-3B-Instruct"
    """policy to train and frozen reference: a Qwen2.5-VL checkpoint, Hub id or folder ('toy')"""
    data: str = "geo3k"
    """'geo3k', 'toy', a Hub id, a folder in the Hub layout, a .parquet/.jsonl/.json file"""
    split: str = "train"
    """dataset split to train on (Hub ids and folders)"""
    image_column: str = "images"
    """column holding the image (a list of images: the first is used; an image, a path, bytes)"""
    problem_column: str = "problem"
    """column holding the problem text (its '<image>' mark is removed: the chat template places
    the image)"""
    answer_column: str = "answer"
    """column holding the gold answer"""
    shuffle: bool = True
    """shuffle the data at each pass (the authors' script does not: --no-shuffle)"""
    max_prompt_tokens: int = 1024
    """longer prompts are skipped and counted (authors: 9216; geometry3k's are ~450 tokens)"""
    min_pixels: int = 3136
    """images are resized to at least this many pixels (Qwen's default, 4 × 28²)"""
    max_pixels: int = 401408
    """and at most this many (512 × 28²: ≤ 512 image tokens, fits 80 GB; authors: 2,560,000)"""
    trust_remote_code: bool = False
    """allow code shipped with a checkpoint to run (off unless you trust its source)"""
    # the run folder: logs, held-out evaluation, checkpoints
    out: str = "runs/apo"
    """run folder: metrics.jsonl, samples.jsonl, checkpoints, final/"""
    resume: bool = False
    """continue the run found in --out from its latest checkpoint"""
    eval_every: int = 50
    """greedy accuracy on held-out problems at step 0, every N steps and at the end (0: never)"""
    eval_data: str = ""
    """data to evaluate on, as --data ('': the training data's --eval-split; a file has none)"""
    eval_split: str = "test"
    """split of the held-out problems (geometry3k: 601 test problems)"""
    eval_limit: int = 0
    """evaluate the first N usable held-out problems only (0: all)"""
    eval_breakdown: str = ""
    """a column of the held-out data whose values eval.jsonl reports apart (accuracy_<value>)"""
    save_every: int = 50
    """rollout steps between checkpoints"""
    keep_last: int = 2
    """checkpoints kept (the oldest are deleted; 0: all)"""
    log_samples: int = 2
    """prompts per step whose responses go to samples.jsonl: the step's first ones"""
    log_random_samples: int = 2
    """and this many more, drawn at random among the step's others (samples.jsonl: "chosen")"""
    preset: str = ""
    """'authors': the authors' schedule where one GPU allows (APO_SPEC §8); explicit flags win"""
    # LoRA and live logging (docs/RUNNING.md)
    lora_rank: int = 0
    """r: train LoRA adapters of this rank, the reference being the adapters off (0: all
    parameters)"""
    lora_alpha: float = 0.0
    """α: the adapters add (α/r)·B·A to each weight they adapt (0: twice the rank)"""
    lora_dropout: float = 0.0
    """dropout on the adapters' inputs, in the update only (0, as advised: else ρ compares
    random masks)"""
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    """the language model's linear layers that get adapters, comma-separated (default: all)"""
    lora_vision: bool = False
    """adapters on the vision tower too (blocks and merger); without, it stays frozen"""
    report_to: str = "none"
    """live logs into --out: 'tensorboard', 'wandb' or both, comma-separated (W&B reads
    WANDB_PROJECT, WANDB_MODE, ...); 'none': the JSON lines alone"""
    # the machine: none of these changes the result
    device: str = "auto"
    """'auto' (CUDA, else stop unless the model is 'toy'), 'cuda' or 'cpu' (forces the CPU)"""
    dtype: str = "auto"
    """'auto' (bfloat16 on CUDA, float32 on CPU), 'bfloat16' or 'float32'"""
    gradient_checkpointing: bool = True
    """recompute activations in backward: trades ~30% compute for most activation memory"""
    micro_batch_size: int = 4
    """responses per forward/backward (gradients accumulate over a mini-batch: the same result)"""
    share_prompt: bool = True
    """log-prob passes forward each prompt once per group, its responses side by side behind it
    (rollout.shared_rows); --no-share-prompt: a copy of the prompt and image per response"""
    generation_batch_size: int = 0
    """sequences per `generate` call (0: all B·G at once)"""
    logprob_chunk: int = 1024
    """positions per vocabulary-projection chunk in log-prob passes (bounds the fp32 logits)"""
    max_bad_updates: int = 3
    """stop (after a checkpoint) when this many updates in a row have a non-finite loss"""
    fsdp: bool = False
    """under torchrun: shard weights, gradients and Adam moments (FSDP2; without: replicas)"""


# ---------------------------------------------------------------------------- group advantage, §2
def grpo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """GRPO's group-normalized advantage Â⁰ (APO_SPEC §2). rewards [B, G] -> [B, G]. A group whose
    rewards are all equal has std 0 and gets 0 everywhere: it carries no learning signal."""
    mean = rewards.mean(-1, keepdim=True)               # [B, 1]
    std = rewards.std(-1, keepdim=True)                 # [B, 1], unbiased (n-1), as the authors'
    return (rewards - mean) / (std + 1e-9)              # Â⁰_i = (r_i − mean_g r) / (std_g r + 1e-9)


# --------------------------------------------------------------------------------- difficulty, §3
def difficulty(correct: torch.Tensor) -> torch.Tensor:
    """A prompt's difficulty d (APO_SPEC §3): the share of its group that got it wrong, by the
    accuracy alone. correct [B, G] (bool) -> [B, 1]."""
    return 1 - correct.float().sum(-1, keepdim=True) / correct.shape[-1]     # d_g = 1 − k_g/G


# --------------------------------------------------------------------------------------- STCR, §4
def stcr_multiplier(correct: torch.Tensor, lengths: torch.Tensor,
                    base: float = 1.00001) -> torch.Tensor:
    """STCR's multiplier 1 + w of the advantage, Â = (1 + w)·Â⁰ (APO_SPEC §4). correct [B, G]
    (bool), lengths [B, G] -> [B, G]. Only a wrong response longer than the mean of its group's
    correct ones gets w > 0; correct responses, shorter wrong ones, and every response of a group
    with no correct one (L⁺ undefined) get w = 0. Two facts of the authors' setting, kept
    (`--stcr-base` tunes it):
    - w ≈ Δ·ln(base) ≈ 1e-5·Δ: small at these lengths (w ≈ 0.01 at 1000 extra tokens);
    - the advantage counts format too, so a wrong but well-formatted response can have Â⁰ > 0
      (its group's others lack the format), and STCR then *amplifies* that positive advantage.
    In float64: in float32, 1.00001 itself is off by 0.14% in its logarithm."""
    correct, lengths = correct.bool(), lengths.double()
    n_correct = correct.sum(-1, keepdim=True)                                    # k_g, [B, 1]
    mean_len_correct = (lengths * correct).sum(-1, keepdim=True) / n_correct.clamp(min=1)  # L⁺_g
    excess = lengths - mean_len_correct                           # Δ_i = |o_i| − L⁺_g, [B, G]
    w = -torch.expm1(-excess * math.log(base))                    # w_i = 1 − base^(−Δ_i)
    w = torch.where(~correct & (n_correct > 0) & (excess > 0), w, torch.zeros_like(w))
    return (1 + w).float()                                        # 1 + w_i, [B, G]


# --------------------------------------------------------------------------------------- DADS, §5
def dads_kl_weights(advantages: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """DADS's KL weight κ of each response (APO_SPEC §5). advantages [B, G] (after STCR), correct
    [B, G] (bool) -> [B, G]. A positive response gets κ = f(d) of its group's difficulty d (§3);
    every other response gets κ = 1. Easy prompt (d small): κ ≈ 1, the full KL. Hard prompt
    (d → 1): κ → 0, a rare success may move further from the reference. Two choices of the
    authors, kept:
    - f(0) = f(1) = 1 by definition, where the formula gives 0.93 and 0: a group all right has no
      rare success to free, and in a group all wrong the positives merely kept the format;
    - "positive" is Â > 0, not "correct": a wrong but well-formatted answer in a group whose
      others lack the format has Â > 0, and so gets κ < 1 too.
    (The authors' code also holds, commented out, the variant f(d) = exp(−e·d); not here.)"""
    d = difficulty(correct)                                               # [B, 1]
    f = 1 - torch.exp(-math.e * (1 - d))                                 # f(d) = 1 − e^(−e(1 − d))
    f = torch.where((d == 0) | (d == 1), torch.ones_like(f), f)           # f(0) = f(1) = 1
    ones = torch.ones_like(advantages)
    return torch.where(advantages > 0, f.expand_as(advantages), ones)     # κ_i, [B, G]


# ----------------------------------------------------------------------------------- loss, §6-§7
def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(π_θ ‖ π_ref) (APO_SPEC §6): [n, T], [n, T] -> [n, T], ≥ 0.
    Unbiased for the KL under samples from π_θ, with lower variance than log π_θ − log π_ref."""
    log_ratio = ref_logp - logp                         # ℓ_ref,t − ℓ_θ,t
    return log_ratio.exp() - log_ratio - 1              # kl_t = e^(ℓ_ref − ℓ_θ) − (ℓ_ref − ℓ_θ) − 1


def policy_loss(logp, old_logp, advantages, mask, *, clip_eps: float, agg: str,
                token_total: float, seq_total: float) -> tuple:
    """PPO-clip policy loss (APO_SPEC §7). logp, old_logp, mask [n, T]; advantages [n] -> (loss,
    the share of tokens where the clip binds). `token_total`, `seq_total`: the token and response
    counts of the whole optimizer mini-batch (all processes): dividing each micro-batch by them,
    the gradients summed over micro-batches (and processes) are those of the whole mini-batch."""
    mask = mask.float()
    ratio = torch.exp(logp - old_logp)                       # ρ_t = exp(ℓ_θ,t − ℓ_old,t), [n, T]
    adv = advantages[:, None]                                # the same Â_i on every token, [n, 1]
    clipped_ratio = ratio.clamp(1 - clip_eps, 1 + clip_eps)
    per_token = -torch.minimum(ratio * adv, clipped_ratio * adv)  # −min(ρ_t Â_i, clip(ρ_t)·Â_i)
    clipped = (clipped_ratio * adv < ratio * adv).float()         # tokens where the clip binds
    if agg == "token":   # every response token of the mini-batch alike (APO_SPEC §7, Decision)
        loss = (per_token * mask).sum() / token_total
    else:                # each response's token mean, then the mean over responses (GRPO's paper)
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum() / seq_total
    clip_fraction = (clipped * mask).sum() / mask.sum().clamp(min=1)
    return loss, clip_fraction.detach()


def apo_loss(*, logp, old_logp, ref_logp, advantages, kl_weights, mask, kl_beta: float,
             clip_eps: float, agg: str, token_total: float, seq_total: float) -> tuple:
    """The total loss L = L_pg + β·L_kl (APO_SPEC §6-§7) of a micro-batch, and its terms (floats
    that add up over the micro-batches of a mini-batch). Tensors [n, T]; Â and κ [n].
    old_logp None: on-policy (one optimizer step per rollout): ℓ_old = ℓ_θ detached, ρ = 1;
    ref_logp None: no reference (β = 0), no KL term.
    Why a token mean for L_pg and a response mean for L_kl: the policy term weighs every sampled
    token alike (§7), while κ_i weighs a response: DADS scales each response's mean KL_i whole."""
    old_logp = logp.detach() if old_logp is None else old_logp
    ref_logp = logp.detach() if ref_logp is None else ref_logp                 # k3 = 0: no KL
    pg_loss, clip_fraction = policy_loss(logp, old_logp, advantages, mask, clip_eps=clip_eps,
                                         agg=agg, token_total=token_total, seq_total=seq_total)
    mask = mask.float()
    kl_per_seq = (k3_kl(logp, ref_logp) * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # KL_i, [n]
    kl_loss = (kl_weights * kl_per_seq).sum() / seq_total               # L_kl = mean_i κ_i·KL_i
    loss = pg_loss + kl_beta * kl_loss                                  # L = L_pg + β·L_kl
    share = mask.sum().item() / token_total  # of the mini-batch's tokens: weighs the clip fraction
    return loss, {"loss": loss.item(), "pg_loss": pg_loss.item(), "kl_loss": kl_loss.item(),
                  "kl": (kl_per_seq.detach().sum() / seq_total).item(),  # mean_i KL_i, unweighted
                  "clip_fraction": clip_fraction.item() * share,
                  "kl_per_response": kl_per_seq.detach()}                # KL_i, [n], logged


# ------------------------------------------------------------------------------------- update, §8
def cosine_schedule(step: int, total: int, warmup_ratio: float, lr: float, min_lr: float) -> float:
    """Learning rate at optimizer step `step`: linear warmup, then cosine from lr to min_lr (the
    authors')."""
    warmup = math.ceil(total * warmup_ratio)
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def update_policy(model, batch: dict, optimizer, args: Args, lrs: list) -> dict:
    """One pass over a rollout's responses (APO_SPEC §8): mini-batches of args.mini_batch_size
    responses, one optimizer step each at learning rate lrs[i], made of whole groups in a shuffled
    order of the groups (so that the shared layout forwards each prompt once, rollout.shared_rows);
    inside, micro-batches of args.micro_batch_size whose gradients accumulate (their size changes
    nothing). `batch`: a rollout with advantages, kl_weights [N], old_logp and ref_logp [N, T] or
    None (see apo_loss). Returns the loss's terms and the gradient norm averaged over mini-batches,
    `kl_per_response` [N] (logged) and `finite`: per optimizer step, whether it was taken (a
    non-finite loss or gradient would poison weights and moments). Many GPUs: each process holds
    1/W of each mini-batch, divides by the counts over all processes, and the gradients are summed:
    one process's update on all the responses."""
    device, N, n_updates = model.device, batch["advantages"].shape[0], len(lrs)
    per_rank = args.mini_batch_size // parallel.world()
    prompts = batch["prompt_index"].unique()                  # the groups, in a shuffled order
    order = torch.cat([(batch["prompt_index"] == p).nonzero()[:, 0]
                       for p in prompts[torch.randperm(len(prompts))]]).tolist()
    means, finite, kl_per_response = {}, [], torch.zeros(N)
    for lr, start in zip(lrs, range(0, N, per_rank)):
        rows = order[start:start + per_rank]
        token_total, seq_total = parallel.total([batch["response_mask"][rows].sum().item(),
                                                 len(rows)])
        optimizer.zero_grad(set_to_none=True)
        sums = {}  # the mini-batch's terms, summed over its micro-batches
        for micro_start in range(0, len(rows), args.micro_batch_size):
            micro_rows = rows[micro_start:micro_start + args.micro_batch_size]
            micro = rollout.select(batch, micro_rows)
            logp, entropy = rollout.response_logprobs(model, micro, args.temperature,
                                                      args.logprob_chunk, args.share_prompt)  # ℓ_θ
            mask = micro["response_mask"].to(device)                                # [n, T]
            on = lambda key: None if micro.get(key) is None else micro[key].to(device)  # noqa
            loss, terms = apo_loss(logp=logp, old_logp=on("old_logp"), ref_logp=on("ref_logp"),
                                   advantages=on("advantages"), kl_weights=on("kl_weights"),
                                   mask=mask, kl_beta=args.kl_beta, clip_eps=args.clip_eps,
                                   agg=args.loss_agg, token_total=token_total,
                                   seq_total=seq_total)
            loss.backward()
            kl_per_response[micro_rows] = terms.pop("kl_per_response").cpu().float()
            terms["entropy"] = (entropy * mask).sum().item() / token_total  # DADS's claim (§7)
            for key, value in terms.items():
                sums[key] = sums.get(key, 0.0) + value
        parallel.sync_gradients(model)
        sums = dict(zip(sums, parallel.total(list(sums.values()))))  # over all processes
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        sums["grad_norm"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        for key, value in sums.items():
            means[key] = means.get(key, 0.0) + value / n_updates
        # Both are global values, the same on every process: all take the step, or none.
        finite.append(math.isfinite(sums["loss"]) and math.isfinite(sums["grad_norm"]))
        if finite[-1]:
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {**means, "kl_per_response": kl_per_response, "finite": finite}


# ----------------------------------------------------------------------------------------- the step
def apo_step(policy, reference, processor, optimizer, examples: list, state: dict, args: Args,
             clock=None) -> tuple:
    """One step of APO on the step's B examples: rollout → reward → Â⁰ → STCR → DADS → ℓ_old,
    ℓ_ref → update. Returns the step's metrics (a line of metrics.jsonl) and its logged groups
    (samples.jsonl). `state` holds the loop's counters (the step adds its optimizer steps, and
    those it skipped); `clock` times the phases (run_folder.Stopwatch; tools/bench.py passes one
    that also measures memory).

    Many GPUs: every process holds the same B examples, keeps its block of B/W (whole groups, so
    the group terms need no communication), and meets the others only in `parallel` calls."""
    clock, step, G = clock or run_folder.Stopwatch(), state["step"], args.group_size
    mine = parallel.share(list(range(len(examples))))
    examples = [examples[i] for i in mine]
    B = len(examples)
    with clock("rollout"):  # G responses per prompt, keyed by (seed, step, prompt, sample)
        prompts = rollout.encode_prompts(processor, [e["images"] for e in examples],
                                         [e["problem"] for e in examples], args.min_pixels,
                                         args.max_pixels)
        sampling = rollout.generation_config(processor, args.max_new_tokens, args.temperature,
                                             args.top_p)
        with parallel.full_weights(policy):  # --fsdp: the whole weights on every process, once
            batch = rollout.sample_responses(policy, processor, prompts, G, sampling,
                                             args.generation_batch_size, seed=(args.seed, step),
                                             first_prompt=mine[0])

    with clock("reward"):  # r_i = acc_i + fmt_i (§1), then the advantages with APO's two terms
        golds = [e["answer"] for e in examples for _ in range(G)]
        accuracy = torch.tensor([reward.accuracy_reward(t, a)
                                 for t, a in zip(batch["texts"], golds)])        # acc, [N]
        fmt = torch.tensor([reward.format_reward(t) for t in batch["texts"]])    # fmt, [N]
        rewards = (accuracy + fmt).view(B, G)                                    # r, [B, G]
        correct = (accuracy > 0).view(B, G)  # by the accuracy alone, never the reward (§3, §4)
        lengths = batch["lengths"].view(B, G)                                    # |o|, [B, G]
        advantages0 = grpo_advantages(rewards)                                   # Â⁰ (§2)
        stcr = (stcr_multiplier(correct, lengths, args.stcr_base) if args.stcr
                else torch.ones(B, G))                                           # 1 + w (§4)
        advantages = stcr * advantages0                                          # Â, [B, G]
        kl_weights = (dads_kl_weights(advantages, correct) if args.dads
                      else torch.ones(B, G))                                     # κ (§5)

    with clock("logprobs"):  # ℓ_old and ℓ_ref of the responses, [N, T]: each decided here, once
        n_updates = math.ceil(args.prompts_per_step * G / args.mini_batch_size)
        passes = lambda model: rollout.batched_logprobs(  # noqa: E731
            model, batch, args.temperature, args.micro_batch_size, args.logprob_chunk,
            args.share_prompt)[0]
        # ℓ_old: the rollout-time policy. With one optimizer step it is ℓ_θ itself (None: apo_loss
        # takes ℓ_θ detached), the same gradient with a forward pass fewer (deviation 6).
        old_logp = passes(policy) if n_updates > 1 else None
        ref_logp = passes(reference) if reference is not None else None         # None: β = 0

    with clock("update"):  # n_updates optimizer steps on the cosine schedule of the whole run
        lrs = [cosine_schedule(state["updates"] + i, state["steps"] * n_updates,
                               args.warmup_ratio, args.lr, args.min_lr) for i in range(n_updates)]
        stats = update_policy(policy, dict(batch, advantages=advantages.flatten(),
                                           kl_weights=kl_weights.flatten(), old_logp=old_logp,
                                           ref_logp=ref_logp), optimizer, args, lrs)
        state["updates"] += n_updates
        for finite in stats.pop("finite"):
            state["bad_in_a_row"] = 0 if finite else state["bad_in_a_row"] + 1
            state["skipped_updates"] += not finite

    per_response = {"rewards": rewards, "advantages": advantages, "lengths": lengths,
                    "correct": correct, "advantages0": advantages0, "stcr_multipliers": stcr,
                    "kl_weights": kl_weights, "kl": stats.pop("kl_per_response").view(B, G)}
    metrics = step_metrics(step, per_response, accuracy, fmt, batch["truncated"], stats, clock,
                           state, optimizer.param_groups[0]["lr"])
    return metrics, logged_groups(step, examples, batch, per_response, fmt, args)


def step_metrics(step: int, per_response: dict, accuracy, fmt, truncated, stats: dict, clock,
                 state: dict, lr: float) -> dict:
    """A line of metrics.jsonl: the step's means over all B·G responses (every process's, gathered
    in prompt order: means of per-process means would be wrong for the conditional ones), the
    update's terms, the counters, and the seconds of each phase (the slowest process's)."""
    G = per_response["rewards"].shape[1]
    columns = [per_response["rewards"].flatten(), accuracy, fmt,
               per_response["lengths"].flatten().float(), per_response["advantages"].flatten(),
               per_response["stcr_multipliers"].flatten(), per_response["kl_weights"].flatten(),
               truncated.float(), per_response["kl"].flatten()]
    r, acc, fmt_all, length, adv, mult, kappa, truncated, kl = parallel.gather(
        torch.stack(columns, 1)).T                                               # [W·N] each
    right, wrong, positive = acc > 0, acc == 0, adv > 0
    share_right = right.view(-1, G).float().mean(-1, keepdim=True).expand(-1, G).flatten()
    hard = (share_right > 0) & (share_right <= 3 / 8)   # a hard group: 1 to 3 of 8 right
    mean_if = lambda x, which: x[which].mean().item() if which.any() else None  # noqa: E731
    phases = ("rollout", "reward", "logprobs", "update")
    seconds = parallel.total([clock.seconds[k] for k in phases], op="max")
    return {
        "step": step,
        "reward": r.mean().item(),
        "accuracy": acc.mean().item(),
        "format_rate": (fmt_all > 0).float().mean().item(),
        "response_length": length.mean().item(),
        "response_tokens": int(length.sum().item()),  # all processes: B·G responses, each once
        "response_length_correct": mean_if(length, right),
        "response_length_wrong": mean_if(length, wrong),
        "truncated_rate": truncated.mean().item(),
        **{k: stats[k] for k in ("kl", "kl_loss", "entropy", "clip_fraction", "pg_loss",
                                 "grad_norm")},
        "dads_weight_pos_mean": mean_if(kappa, positive),
        "dads_weight_correct_mean": mean_if(kappa, positive & right),  # (all-wrong groups' κ is 1)
        "kl_correct_hard": mean_if(kl, right & hard),      # how far DADS lets rare successes move
        "stcr_mult_neg_mean": mean_if(mult, wrong),
        "stcr_mult_neg_max": mult[wrong].max().item() if wrong.any() else None,
        "equal_reward_groups": (r.view(-1, G).std(-1) == 0).float().mean().item(),
        "lr": lr,
        "bad_rows": state["bad_rows"],
        "skipped_updates": state["skipped_updates"],
        "world_size": parallel.world(),
        **{f"seconds_{k}": s for k, s in zip(phases, seconds)},
    }


def logged_groups(step: int, examples: list, batch: dict, per_response: dict, fmt, args: Args):
    """The lines of samples.jsonl: the first --log-samples groups and --log-random-samples more,
    drawn at random (keyed by the step: the global random streams are left alone), each response
    with its numbers (eval.py --explain shows them)."""
    B, G = per_response["rewards"].shape
    first = list(range(min(args.log_samples, B)))
    rest = range(len(first), B)
    drawn = sorted(random.Random(f"{args.seed}-{step}").sample(
        rest, min(args.log_random_samples, len(rest))))
    d, fmt = difficulty(per_response["correct"]), fmt.view(B, G)
    truncated = batch["truncated"].view(B, G)
    return [{"step": step, "chosen": "first" if b in first else "random",
             "problem": examples[b]["problem"], "answer": examples[b]["answer"],
             "row": examples[b].get("row"), "difficulty": d[b].item(),
             "responses": batch["texts"][b * G:(b + 1) * G], "format": fmt[b].tolist(),
             "truncated": truncated[b].tolist(),
             **{k: v[b].tolist() for k, v in per_response.items()}}
            for b in first + drawn]


# --------------------------------------------------------------------------------------- the driver
def train(args: Args) -> Path:
    """Run APO as configured; returns the run folder. Under torchrun every process runs this."""
    from tqdm import tqdm

    out = Path(args.out)
    device, dtype = models.resolve_device(args.device, args.dtype, args.model, args.data)
    args = dataclasses.replace(args, device=str(device))  # what 'auto' chose, for args.json
    rank, world, device = parallel.init(str(device))
    say = tqdm.write if parallel.is_main() else lambda *_: None  # process 0 alone prints, writes
    random.seed(args.seed + rank)  # each process's own streams: they shuffle the mini-batches
    torch.manual_seed(args.seed + rank)
    if args.prompts_per_step % world or args.mini_batch_size % world:
        sys.exit(f"--prompts-per-step ({args.prompts_per_step}) and --mini-batch-size "
                 f"({args.mini_batch_size}) must divide by the number of processes ({world})")
    resume_from = run_folder.open_run(out, args.resume, args.fsdp)  # checks: nothing written yet
    columns = (args.image_column, args.problem_column, args.answer_column)
    table, base, columns = data.load_table(args.data, args.split, columns)
    steps = args.steps or args.epochs * len(table) // args.prompts_per_step
    if steps == 0:
        sys.exit(f"--epochs {args.epochs} over the {len(table)} rows of {args.data} make no "
                 f"step of --prompts-per-step {args.prompts_per_step}: pass --steps N")
    # the policy, and the frozen reference it is kept close to (§6): the starting model
    lora = models.lora_config(args.lora_rank, args.lora_alpha, args.lora_dropout,
                              args.lora_targets, args.lora_vision)
    policy, reference, processor = models.load_models(
        args.model, resume_from, args.kl_beta > 0, args.gradient_checkpointing, args.fsdp, dtype,
        device, args.trust_remote_code, lora, args.seed)
    optimizer = AdamW([p for p in policy.parameters() if p.requires_grad], lr=args.lr,
                      betas=args.adam_betas, weight_decay=args.weight_decay, seed=args.seed)
    state = {"step": 0, "position": 0, "updates": 0, "bad_rows": 0, "skipped_updates": 0,
             "bad_in_a_row": 0, "steps": steps}
    if resume_from:  # (restore says what it found)
        state = run_folder.restore(resume_from, policy, optimizer, args.fsdp, steps)
        if state["step"] >= steps:
            return out
    held_out = data.held_out_examples(
        args.eval_data or args.data, args.eval_split, columns, args.eval_limit, processor,
        args.min_pixels, args.max_pixels, args.max_prompt_tokens, say, not args.eval_data,
        args.eval_breakdown) if args.eval_every else []
    config = dataclasses.asdict(args)  # what args.json and every checkpoint record
    run_folder.start_run(out, config, world, resume_from)  # all loaded: the run starts here
    live = pictures.LiveLog(out, args.report_to, config)  # --report-to: TensorBoard, W&B
    due = {done for done in range(state["step"], steps + 1)
           if held_out and (done % args.eval_every == 0 or done == steps)}
    due -= run_folder.logged_steps(out, "eval")  # (a resumed run does not evaluate twice)
    if state["step"] in due:
        log_evaluation(policy, processor, held_out, args, out, state["step"], live, say)
    usable = lambda row: data.usable_example(  # noqa: E731
        row, columns, base, processor, args.min_pixels, args.max_pixels, args.max_prompt_tokens)
    bar = tqdm(total=steps, initial=state["step"], desc="APO" if args.dads or args.stcr else "GRPO",
               dynamic_ncols=True, disable=not parallel.is_main())
    named = set()  # the bad rows already named in the log
    for step in range(state["step"], steps):
        examples, state["position"], skipped = data.take_examples(
            table, args.prompts_per_step, state["position"], args.seed, args.shuffle, usable)
        state["bad_rows"] += len(skipped)
        for index, why in (row for row in skipped if row[0] not in named):
            named.add(index)
            say(f"skipping row {index}: {why}")
        metrics, samples = apo_step(policy, reference, processor, optimizer, examples, state, args)
        state["step"] = step + 1
        run_folder.append(out, "metrics", [metrics], live)
        run_folder.append(out, "samples", samples, live)
        bar.update(1)
        bar.set_postfix(reward=f"{metrics['reward']:.3f}", acc=f"{metrics['accuracy']:.2f}",
                        len=f"{metrics['response_length']:.0f}")
        if step + 1 in due:
            log_evaluation(policy, processor, held_out, args, out, step + 1, live, say)
        # checkpoints: every --save-every steps, and before a stop (a signal to any process)
        name = f"checkpoint-{step + 1:06d}"
        stop = parallel.total([len(run_folder.STOP)], op="max")[0] > 0
        bad = state["bad_in_a_row"] >= args.max_bad_updates
        if bad or stop or (step + 1) % args.save_every == 0:
            run_folder.checkpoint(out, name, policy, processor, optimizer, state, config,
                                  args.keep_last)
        if bad or stop:
            live.close()
        if bad:
            sys.exit(f"{state['bad_in_a_row']} updates in a row had a non-finite loss or "
                     f"gradient: stopped after saving {out}/{name}. Lower --lr or check the data.")
        if stop:
            by = run_folder.STOP[0] if run_folder.STOP else "to another process"
            say(f"\nstopped by signal {by}: saved {out}/{name}; continue with the same command "
                "and --resume")
            return out
    bar.close()
    live.close()
    run_folder.checkpoint(out, "final", policy, processor, optimizer, state, config)
    return out


def log_evaluation(policy, processor, held_out: list, args: Args, out: Path, done: int, live, say):
    """The held-out evaluation after `done` steps (eval.evaluate: greedy answers, the training
    prompt and reward) into eval.jsonl and `live`, and a line to the log. Many GPUs: each process
    answers its share of the problems, and the counts are summed."""
    clock = run_folder.Stopwatch()
    with clock("eval"):
        records = evaluation.evaluate(policy, processor, parallel.share(held_out), args,
                                      batch_size=args.generation_batch_size
                                      or args.prompts_per_step * args.group_size)
        values = sorted({v for e in held_out for v in e.get("groups", {}).values()})  # breakdown
        correct, formatted, length, truncated, n, *per_value = parallel.total([
            sum(r["correct"] for r in records), sum(r["format"] for r in records),
            sum(r["length"] for r in records), sum(r["truncated"] for r in records),
            len(records), *(sum(r["correct"] for r in records if v in r["groups"].values())
                            for v in values),
            *(sum(v in r["groups"].values() for r in records) for v in values)])
    result = {"step": done, "accuracy": correct / n, "format_rate": formatted / n,
              "response_length": length / n, "truncated_rate": truncated / n,
              **{f"accuracy_{v}": c / k
                 for v, c, k in zip(values, per_value, per_value[len(values):])},
              "problems": int(n), "seconds": clock.seconds["eval"]}
    run_folder.append(out, "eval", [result], live)
    say(f"step {done}: held-out accuracy {result['accuracy']:.3f}, format "
        f"{result['format_rate']:.3f} ({result['problems']} problems, {result['seconds']:.1f} s)")


# --------------------------------------------------------------------------------- the command line
PRESETS = {
    # APO_SPEC §8 on one GPU: the same rollout and update sizes, generating 64 sequences at a time
    "authors": dict(prompts_per_step=128, max_new_tokens=4096, max_prompt_tokens=9216,
                    max_pixels=2_560_000, mini_batch_size=64, shuffle=False, epochs=2,
                    generation_batch_size=64),
    # The toy tasks (plumbing/toy.py): a tiny model, small images, short answers, minutes on a CPU.
    # A constant rate: the last colour to click often needs steps 200-400, where a cosine had
    # already decayed. β = 0.3: the reference answers every letter alike, so its pull keeps a
    # rare right letter sampled; at 0.02 a colour stayed wrong for good in some seeds (README).
    "toy": dict(model="toy", prompts_per_step=8, group_size=8, max_new_tokens=32, lr=1e-3,
                min_lr=1e-3, mini_batch_size=64, micro_batch_size=64, max_pixels=168 * 168,
                min_pixels=28 * 28, kl_beta=0.3, gradient_checkpointing=False, steps=450,
                save_every=50, adam_betas=(0.9, 0.99), eval_every=25),
    # The graded toy (docs/EXPERIMENT.md): where APO's terms have something to act on. Spelled out
    # in full: the experiment's committed runs were made with these values.
    "toy-graded": dict(model="toy-graded", prompts_per_step=8, group_size=8, max_new_tokens=52,
                       lr=1e-3, min_lr=1e-4, mini_batch_size=64, micro_batch_size=64,
                       max_pixels=168 * 168, min_pixels=28 * 28, kl_beta=0.1,
                       gradient_checkpointing=False, steps=80, save_every=1000,
                       adam_betas=(0.9, 0.99), eval_every=20, eval_breakdown="level"),
}
# With --lora-rank: adapters that start at B = 0 move a weight less per step than full-parameter
# Adam does, so they need a larger learning rate (docs/RUNNING.md, "LoRA", has the toy's sweep,
# measured at β = 0.02).
PRESETS["toy-lora"] = dict(PRESETS["toy"], lr=5e-3, min_lr=5e-4, steps=300, kl_beta=0.02)


def parse_args(argv=None) -> Args:
    """The command line (plumbing/flags.py): a flag per field of Args, its docstring the help,
    --preset (or --data toy) changing the defaults, every value checked against its range."""
    return flags.parse(Args, PRESETS, argv, description=__doc__.split("\n")[0])


if __name__ == "__main__":
    run_folder.stop_on_signals()
    try:
        train(parse_args())
    finally:
        parallel.close()
