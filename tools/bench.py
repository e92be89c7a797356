"""Benchmark of one APO step: seconds and peak memory per phase, throughput, MFU; and the memory plan.

    python tools/bench.py --config tiny --device cpu --threads 1 --out bench_tiny.json   # the toy's shapes, CPU
    python tools/bench.py --config toy --threads 1 --no-share-prompt --out toy.json  # the toy itself, a layout
    python tools/bench.py --config 3b --device cuda --out bench_3b.json                 # Qwen2.5-VL-3B, one GPU
    python tools/bench.py --config 3b --dry-run --out plan_3b.json             # memory plan: no GPU, no weights
    python tools/bench.py --config 3b --dry-run --lora-rank 16 --generation-batch-size 64 --out plan_lora.json

The model has random weights and the prompts are synthetic (a noise image and a one-line problem), so nothing is
downloaded. What runs is `apo.apo_step` itself, with apo.Args' defaults: rollout, rewards and advantages, old and
reference log-probs, the update; this script only times its phases (`Meter`, passed as the step's clock) and the
decoding steps of `generate` (`DecodeClock`), and makes every response run to --max-new-tokens (--no-full-length
lets EOS end them): the step measured is the longest the settings allow. docs/PERF.md holds the numbers.
"""

import argparse
import copy
import dataclasses
import json
import os
import platform
import random
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers
from PIL import Image
from transformers import CompileConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.generation.streamers import BaseStreamer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: apo.py and plumbing/
import apo  # noqa: E402
import rollout  # noqa: E402
from plumbing import data, flags, models, run_folder, toy  # noqa: E402
from plumbing.adamw import AdamW  # noqa: E402

# The public config.json of Qwen/Qwen2.5-VL-3B-Instruct (architecture only, no weights), kept with the test data.
QWEN_3B_CONFIG = Path(__file__).resolve().parents[1] / "tests" / "data" / "qwen2_5_vl_3b_config.json"
PEAK_BF16_FLOPS = 989e12   # H100 SXM (and H200), dense bf16 tensor cores, no sparsity
HBM_BYTES_PER_S = 3.0e12   # what a decode step can hope to read per second on an H100 (3.35 TB/s nominal)
TARGET_GIB = 60        # an 80 GB GPU, with room for what the plan leaves out
LORA_TARGET_GIB = 22   # with --lora-rank: a 24 GB GPU (RTX 3090/4090, A10, L4)
GiB = 2 ** 30

# Both configs run apo.Args' defaults (16 prompts × 8 responses × up to 1024 tokens, two optimizer steps of 64,
# micro-batches of 4); tiny with the toy task's images (4 image tokens), 3b with 352 image tokens, as many as the
# largest geometry3k diagrams in tests/data/geo3k_sample make.
TINY = dict(min_pixels=28 * 28, max_pixels=56 * 56)
IMAGE_SIZE = {"tiny": (56, 56), "3b": (616, 448)}
FLAGS = ["prompts_per_step", "group_size", "max_new_tokens", "mini_batch_size", "micro_batch_size",
         "generation_batch_size", "logprob_chunk", "kl_beta", "min_pixels", "max_pixels", "max_prompt_tokens",
         "gradient_checkpointing", "lora_rank", "lora_targets", "lora_vision", "share_prompt"]


RANGES = [  # this script's own flags, as flags.RANGES (those of FLAGS, and --seed, are checked against its)
    ("steps", lambda v: v >= 1, ">= 1 (the last is reported)"),
    ("threads", lambda v: v >= 1, ">= 1"),
    ("image_size", lambda v: min(v) >= 1, "two sizes >= 1"),
    ("target_gib", lambda v: v > 0, "> 0"),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=["tiny", "toy", "3b"], required=True,
                   help="tiny: the toy model's shapes, random weights; toy: the toy task itself (its starting "
                        "model, data and preset, responses ending at EOS); 3b: Qwen2.5-VL-3B's shapes")
    p.add_argument("--config-file", help=f"Qwen2.5-VL-3B's config.json (default: {QWEN_3B_CONFIG})")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--dry-run", action="store_true", help="write the memory plan only (meta device, no weights)")
    p.add_argument("--steps", type=int, default=2, help="APO steps to run; the last is reported (the first warms up)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target-gib", type=float, help=f"memory the plan must fit (default: {TARGET_GIB}, with "
                                                    f"--lora-rank {LORA_TARGET_GIB})")
    p.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads); 1 is fastest on a busy machine")
    p.add_argument("--image-size", type=int, nargs=2, metavar=("W", "H"), help="synthetic image size in pixels")
    p.add_argument("--full-length", action=argparse.BooleanOptionalAction, default=None,
                   help="every response runs to --max-new-tokens (EOS is suppressed until then; default: on, "
                        "but for --config toy)")
    p.add_argument("--cache-implementation", choices=["dynamic", "static"], default=None,
                   help="KV cache of `generate` (default: rollout.generation_config's)")
    p.add_argument("--compile-decode", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the decode step (transformers does it by itself with a static cache on "
                        "CUDA: --no-compile-decode stops it)")
    for name in FLAGS:
        kind = type(getattr(apo.Args, name))
        if kind is bool:
            p.add_argument("--" + name.replace("_", "-"), action=argparse.BooleanOptionalAction, default=None)
        else:
            p.add_argument("--" + name.replace("_", "-"), type=kind, default=None)
    a = p.parse_args(argv)
    a.image_size = tuple(a.image_size or IMAGE_SIZE.get(a.config, (toy.IMAGE_SIZE,) * 2))
    a.full_length = a.config != "toy" if a.full_length is None else a.full_length
    if a.config == "toy" and a.dry_run:
        p.error("--dry-run plans --config tiny or 3b")
    if a.target_gib is None:
        a.target_gib = LORA_TARGET_GIB if a.lora_rank else TARGET_GIB
    flags.check_ranges(p, vars(a), RANGES)
    preset = dict(TINY if a.config == "tiny" else apo.PRESETS["toy"] if a.config == "toy" else {})
    preset.update({k: getattr(a, k) for k in FLAGS if getattr(a, k) is not None})
    s = apo.Args(**preset)
    flags.check_ranges(p, {**{k: getattr(s, k) for k in FLAGS}, "seed": a.seed})  # training's flags, its ranges
    return a, s


# ----------------------------------------------------------------------------------------------- model and prompts
def load_config(a, tokenizer) -> Qwen2_5_VLConfig:
    """The model config; for 3b, Qwen2.5-VL-3B's with the toy tokenizer's special-token ids.

    The synthetic prompts are encoded by toy.build_processor's tokenizer (nothing to download), whose special
    tokens have small ids: the model must look for those ids instead of Qwen's. The vocabulary keeps its real size,
    151,936, so the embedding, the output projection and the log-softmax cost what they cost in training; all
    token ids the tokenizer produces are below 433, so they are in range, and the sampled ids it does not know
    decode to nothing (the texts are not scored: the rewards are random)."""
    if a.config == "tiny":
        return toy.tiny_config(tokenizer)
    path = Path(a.config_file) if a.config_file else QWEN_3B_CONFIG
    if not path.is_file():
        sys.exit(f"--config 3b needs Qwen2.5-VL-3B's config.json; {path} does not exist. Pass --config-file with "
                 "the config.json of Qwen/Qwen2.5-VL-3B-Instruct.")
    config = Qwen2_5_VLConfig(**json.loads(path.read_text()))
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in toy.SPECIAL_TOKENS}
    config.image_token_id, config.video_token_id = ids["<|image_pad|>"], ids["<|video_pad|>"]
    config.vision_start_token_id, config.vision_end_token_id = ids["<|vision_start|>"], ids["<|vision_end|>"]
    config.eos_token_id = config.text_config.eos_token_id = ids["<|im_end|>"]
    config.pad_token_id = config.text_config.pad_token_id = config.text_config.bos_token_id = ids["<|endoftext|>"]
    return config


def synthetic_examples(n: int, image_size: tuple, seed: int) -> list:
    """n examples as apo.apo_step takes them: a noise image of image_size pixels, a one-line problem, a gold."""
    rng = random.Random(seed)
    w, h = image_size
    return [{"images": [Image.frombytes("RGB", (w, h), rng.randbytes(w * h * 3))],
             "problem": f"<image>Find x if the angle at B is {rng.randint(20, 80)} degrees and AB = "
                        f"{rng.randint(2, 9)}.", "answer": "5", "row": i} for i in range(n)]


def encode(processor, examples: list, s: apo.Args) -> dict:
    return rollout.encode_prompts(processor, [e["images"] for e in examples], [e["problem"] for e in examples],
                                  s.min_pixels, s.max_pixels)


def count_parameters(model) -> dict:
    """Parameters (shared ones once) and the per-token / per-patch parameter counts used for FLOPs."""
    lm, visual = model.model.language_model, model.model.visual
    n = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731 (parameters() deduplicates)
    # A text token goes through every language-model matrix and the output projection; the embedding is a lookup.
    per_token = n(lm) - lm.embed_tokens.weight.numel() + model.lm_head.weight.numel()
    return {"parameters": n(model), "text_params_per_token": per_token, "vision_params_per_patch": n(visual),
            "largest_parameter": max(p.numel() for p in model.parameters())}


# -------------------------------------------------------------------------------------------------- memory plan
def lora_layers(config, s: apo.Args) -> tuple:
    """(in, out) features of the linear layers that get LoRA adapters (models.LANGUAGE_LAYERS, VISION_LAYERS),
    from the config: --lora-targets of one decoder layer, and with --lora-vision those of one vision block, then the
    merger's two (once)."""
    t, v = config.text_config, config.vision_config
    H, I = t.hidden_size, t.intermediate_size
    head_dim = getattr(t, "head_dim", None) or H // t.num_attention_heads
    q, kv = t.num_attention_heads * head_dim, t.num_key_value_heads * head_dim
    shapes = {"q_proj": (H, q), "k_proj": (H, kv), "v_proj": (H, kv), "o_proj": (q, H), "gate_proj": (H, I),
              "up_proj": (H, I), "down_proj": (I, H)}
    text = [shapes[n.strip()] for n in s.lora_targets.split(",") if n.strip()]
    Hv, Iv, Hm = v.hidden_size, v.intermediate_size, v.hidden_size * v.spatial_merge_size ** 2
    vision = [(Hv, 3 * Hv), (Hv, Hv), (Hv, Iv), (Hv, Iv), (Iv, Hv)] if s.lora_vision else []
    merger = [(Hm, Hm), (Hm, v.out_hidden_size)] if s.lora_vision else []
    return text, vision, merger


def memory_plan(config, counts: dict, s: apo.Args, prompt_tokens: int, patches: int,
                target_gib: float = TARGET_GIB) -> dict:
    """Peak memory of one APO step on one GPU, in GiB, by component and by phase, from the shapes alone.

    Weights, gradients and activations in bf16 (2 bytes), Adam moments in fp32 (2 × 4 bytes): adamw.AdamW. Exact for
    weights, moments, gradients and the KV cache; the activation terms count the tensors listed beside them
    (bytes per token, H = hidden size, I = MLP size, kv = key/value width). Not counted: the CUDA context (~0.5 GiB,
    outside torch.cuda.max_memory_allocated) and the caching allocator's fragmentation (reserved − allocated).

    With --lora-rank r: no reference copy (it is the policy with its adapters off); gradients and Adam moments for
    the adapters alone, r·(in + out) parameters per adapted layer, in fp32 (peft's default); the vision tower out
    of the backward unless it has adapters; and what the adapters add to activations (`lora_saved`, `lora_temp`).

    The log-prob passes forward a micro-batch of b responses as rows: with --share-prompt (the default) one row per
    prompt it holds, P + (b/rows)·T tokens each, the prompt's image once per row; without, b rows of P + T tokens."""
    t, v = config.text_config, config.vision_config
    L, H, I, V = t.num_hidden_layers, t.hidden_size, t.intermediate_size, t.vocab_size
    kv = t.num_key_value_heads * (getattr(t, "head_dim", None) or H // t.num_attention_heads)
    Lv, Hv, Iv = v.depth, v.hidden_size, v.intermediate_size
    N, largest, P, T = counts["parameters"], counts["largest_parameter"], prompt_tokens, s.max_new_tokens
    S = P + T                                                   # tokens of a sequence: prompt + response
    n_gen = s.generation_batch_size or s.prompts_per_step * s.group_size   # sequences per `generate` call
    b, chunk, r = s.micro_batch_size, s.logprob_chunk, s.lora_rank
    # a micro-batch's rows: the update takes whole groups in turn, so b responses hold ceil(b / G) prompts (b ≤ G:
    # one) and every row P + its responses; unshared, a row per response
    rows = -(-b // s.group_size) if s.share_prompt else b
    micro_tokens = rows * P + b * T if s.share_prompt else b * S
    row_tokens = micro_tokens // rows
    text, vision, merger = lora_layers(config, s) if r else ([], [], [])
    n_lora = r * (L * sum(i + o for i, o in text) + Lv * sum(i + o for i, o in vision) + sum(i + o for i, o in merger))
    trained = n_lora if r else N                                # the parameters with gradients and Adam moments
    largest_trained = r * max(max(i, o) for i, o in text + vision + merger) if r else largest
    grad_bytes = 4 if r else 2                                  # fp32 adapters, or bf16 weights
    # LoRA (fp32 adapters in a bf16 model): each adapted layer casts its input to fp32, a copy that backward keeps
    # (lora_saved: 4·in bytes per token, summed over a layer's adapted linears), and adds B·A·x in fp32 (B's output,
    # scaled, then summed with the base output: lora_temp = 4·in + 8·out at the widest one).
    lora_saved = lambda shapes: 4 * sum(i for i, o in shapes)                        # noqa: E731
    lora_temp = lambda shapes: max((4 * i + 8 * o for i, o in shapes), default=0)    # noqa: E731
    vision_backward = not r or s.lora_vision  # a frozen tower without adapters is no part of the backward
    # One layer's forward without gradients, at its widest (the MLP): residual, normed input, act(gate), up and
    # their product, bf16 → (6H + 6I) bytes per token; the vision blocks alike per patch; plus the attention mask
    # [n, 1, S, S]: bool where left padding makes sdpa use one, bf16 (2 bytes) for the shared layout's 4D mask.
    no_grad_layer = lambda n, tokens, mask_bytes=1: n * max(  # noqa: E731
        tokens * (6 * H + 6 * I + lora_temp(text)) + mask_bytes * tokens ** 2,
        patches * (6 * Hv + 6 * Iv + lora_temp(vision)))
    mask_bytes = 2 if s.share_prompt else 1
    c = {
        "policy_weights": 2 * N + 4 * n_lora,                  # bf16 weights (+ fp32 adapters)
        "reference_weights": 2 * N if s.kl_beta > 0 and not r else 0,  # frozen copy for the KL term (APO_SPEC §6)
        "adam_moments": 8 * trained,                             # m and v, fp32
        "gradients": grad_bytes * trained,                       # from the first backward to the last step
        # adamw.AdamW works on slices of AdamW.slice_size weights: fp32 grad, denominator and weight, and the
        # rounding's int32 noise, sum and mask: 6 × 4 bytes per weight of the largest slice.
        "optimizer_temporaries": 24 * min(largest_trained, AdamW.slice_size),
        # K and V of every layer for every sequence at full length, bf16: n_gen · S · L · 2 · kv · 2 bytes.
        "kv_cache": n_gen * S * L * 2 * kv * 2,
        # Prefill: all n_gen prompts through one layer at a time (no gradients).
        "prefill_activations": no_grad_layer(n_gen, P),
        # Gradient checkpointing keeps each layer's input, bf16: (tokens·L·H + rows·patches·Lv·Hv) · 2 bytes.
        "checkpointed_activations": (micro_tokens * L * H + rows * patches * Lv * Hv * vision_backward) * 2,
        # Backward of one layer: its forward is recomputed with what backward needs kept — 2 RMSNorms (fp32 input
        # 4H + bf16 output 2H each), q/k/v input, rotated q and k, v, attention output, o_proj input (8H + 4kv),
        # gate, act(gate), up, product (8I) — plus gradients in flight (4H + 4I): (26H + 12I + 4kv) bytes/token.
        "layer_recompute": max(micro_tokens * (26 * H + 12 * I + 4 * kv + lora_saved(text) + lora_temp(text))
                               + rows * mask_bytes * row_tokens ** 2,
                               rows * patches * (30 * Hv + 12 * Iv + lora_saved(vision) + lora_temp(vision))
                               * vision_backward),
        # rollout.response_logprobs: fp32 [chunk, V] tensors — in backward the saved log-softmax, the gradient
        # scattered by gather, and log_softmax's exp and result: 4 × chunk · V · 4 bytes (2 without gradients).
        "logits_chunk": 4 * chunk * V * 4,
        # A parameter's fresh gradient before it is added to .grad: the tied embedding / output projection, V·H
        # (with LoRA: the largest adapter matrix).
        "parameter_gradient_temporary": grad_bytes * largest_trained,
        "micro_batch_forward": no_grad_layer(rows, row_tokens, mask_bytes),
        # rollout.response_logprobs asks the model's forward for its hidden states (the last one is projected):
        # without gradients every layer's output then stays alive, tokens · (L + 1) · H · 2 bytes. (With them, the
        # same tensors are the checkpointed activations: nothing more in the update.)
        "logprob_hidden_states": micro_tokens * (L + 1) * H * 2,
    }
    resident = c["policy_weights"] + c["reference_weights"] + c["adam_moments"]
    kv_at = lambda tokens: c["kv_cache"] * tokens // S  # noqa: E731
    phases = {
        # prefill (KV cache of the prompts + one layer's activations), or the last decode step (full KV cache, one
        # layer's growing copy, and ~4 fp32 [n_gen, V] tensors: logits, warped scores, probabilities)
        "rollout": resident + max(kv_at(P) + c["prefill_activations"],
                                  c["kv_cache"] * (L + 1) // L + 4 * n_gen * V * 4),
        "logprobs": resident + c["micro_batch_forward"] + c["logprob_hidden_states"] + c["logits_chunk"] // 2,
        "optimizer": resident + c["gradients"] + c["optimizer_temporaries"],
    }
    # the update: forward + backward of a micro-batch with the gradients resident (or an optimizer step)
    phases["update"] = max(phases["optimizer"], resident + c["gradients"] + c["checkpointed_activations"]
                           + max(c["logits_chunk"] + c["parameter_gradient_temporary"], c["layer_recompute"]))
    gib = lambda x: round(x / GiB, 2)  # noqa: E731
    peak = max(phases.values())
    return {"parameters": N, "trained_parameters": trained, "peak_memory_gib": gib(peak), "target_gib": target_gib,
            "fits": peak <= target_gib * GiB,
            "peak_phase": max(phases, key=phases.get), "components_gib": {k: gib(x) for k, x in c.items()},
            "phases_gib": {k: gib(x) for k, x in phases.items()},
            "assumptions": {"prompt_tokens": P, "response_tokens": T, "patches_per_image": patches,
                            "generation_batch": n_gen, "micro_batch_size": b, "logprob_chunk": chunk,
                            "lora_rank": r, "share_prompt": s.share_prompt, "rows_per_micro_batch": rows,
                            "tokens_per_micro_batch": micro_tokens}}


def dry_run(a, s: apo.Args, processor) -> dict:
    """The memory plan for the settings, from the real parameter count (model built on the meta device)."""
    config = load_config(a, processor.tokenizer)
    with torch.device("meta"):
        counts = count_parameters(Qwen2_5_VLForConditionalGeneration(config))
    prompts = encode(processor, synthetic_examples(1, a.image_size, a.seed), s)
    P, patches = prompts["input_ids"].shape[1], int(prompts["image_grid_thw"][0].prod())
    plan = memory_plan(config, counts, s, P, patches, a.target_gib)
    # The longest prompt the settings admit (--max-prompt-tokens) with an image at --max-pixels, at the default
    # generation batch, and the largest generation batch that keeps it within the target.
    longest = lambda n_gen: memory_plan(config, counts, dataclasses.replace(s, generation_batch_size=n_gen),  # noqa
                                        s.max_prompt_tokens, s.max_pixels // config.vision_config.patch_size ** 2,
                                        a.target_gib)
    worst = longest(s.generation_batch_size)
    plan["longest_prompt"] = {**{k: worst[k] for k in ("peak_memory_gib", "fits", "peak_phase", "phases_gib",
                                                        "assumptions")},
                              "generation_batch_size_that_fits": next((n for n in (128, 64, 32, 16, 8, 4, 2, 1)
                                                                       if longest(n)["fits"]), None)}
    return plan


# ------------------------------------------------------------------------------------------------- measuring
class Meter(run_folder.Stopwatch):
    """apo_step's clock, with the peak memory of each phase: seconds and peaks, summed / maxed over a phase's
    visits during a step. Phases may nest (the optimizer steps inside the update): a phase's peak includes those
    of the phases inside it.

    CUDA: torch.cuda.max_memory_allocated, reset when a phase starts. CPU: the process's peak resident set
    (VmHWM), reset at each phase through /proc/self/clear_refs where Linux allows it; elsewhere the peak since start
    (resource.getrusage)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds, self.peak, self.open = {}, {}, []

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def _fold_peak(self):  # the peak since the last reset counts for every phase under way
        peak = self._peak_bytes()
        for name in self.open:
            self.peak[name] = max(self.peak.get(name, 0), peak)
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass

    def _peak_bytes(self) -> int:
        if self.cuda:
            return torch.cuda.max_memory_allocated()
        try:
            return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024
        except (OSError, AttributeError):
            import resource
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)

    @contextmanager
    def __call__(self, name: str):
        self._sync()
        self._fold_peak()
        self.open.append(name)
        start = time.perf_counter()
        yield
        self._sync()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        self._fold_peak()
        self.open.pop()


class DecodeClock(BaseStreamer):
    """A `generate` streamer used as a stopwatch. generate() calls put() once with the prompt, then once per
    decoding step with that step's tokens, which it has just copied to the host: the times are synchronized with
    the device. Prefill = first token − prompt; decode = the rest, per step."""

    def __init__(self):
        self.calls = []  # per generate call: (sequences, [time of prompt, of token 1, of token 2, ...])

    def put(self, value):
        if value.dim() == 2:  # the prompt [n, P]: a new generate call begins
            self.calls.append((value.shape[0], []))
        self.calls[-1][1].append(time.perf_counter())

    def end(self):
        pass

    def summary(self) -> dict:
        steps = sum(len(times) - 2 for _, times in self.calls)
        decode = sum(times[-1] - times[1] for _, times in self.calls)
        return {"prefill_seconds": sum(times[1] - times[0] for _, times in self.calls), "decode_seconds": decode,
                "decode_steps": steps, "decode_token_steps": sum(n * (len(times) - 2) for n, times in self.calls),
                "decode_ms_per_token_step": 1000 * decode / max(steps, 1)}


def step_flops(pass_tokens: int, pass_patches: int, counts: dict, decode_token_steps: int, logprob_passes: int,
               prefill_tokens: int, rollout_patches: int) -> dict:
    """Model FLOPs of a step: 2·N per token for each forward without gradients, 6·N per token (forward + backward)
    for the update; N = the parameters a token (or an image patch) goes through. Real tokens only (no padding),
    those a pass forwards (`pass_tokens`: with --share-prompt each prompt once per row); attention's own FLOPs
    (~4·S·H per token per layer, a few % here) and the recompute of gradient checkpointing are not counted, as
    MFU conventionally does."""
    per_pass = counts["text_params_per_token"] * pass_tokens + counts["vision_params_per_patch"] * pass_patches
    generate = (counts["text_params_per_token"] * (prefill_tokens + decode_token_steps)
                + counts["vision_params_per_patch"] * rollout_patches)
    return {"rollout": 2 * generate, "logprobs": 2 * per_pass * logprob_passes, "update": 6 * per_pass}


def rows_per_pass(n_prompts: int, group_size: int, micro_batch_size: int, share_prompt: bool) -> int:
    """Rows a log-prob pass forwards: one per (micro-batch, prompt) pair with --share-prompt, the micro-batches
    taking each group's responses in turn; else one per response."""
    prompt_of = [i // group_size for i in range(n_prompts * group_size)]
    if not share_prompt:
        return len(prompt_of)
    return sum(len(set(prompt_of[i:i + micro_batch_size])) for i in range(0, len(prompt_of), micro_batch_size))


def cpu_name() -> str:
    try:
        return re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text()).group(1)
    except (OSError, AttributeError):
        return platform.processor() or "cpu"


def bench(a, s: apo.Args, processor) -> dict:
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA GPU found")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # as models.resolve_device
    torch.manual_seed(a.seed)
    random.seed(a.seed)
    if a.config == "toy":  # the toy's starting model and its own processor
        model, processor = models.load_model("toy", dtype, device)
        config = model.config
    else:
        config = load_config(a, processor.tokenizer)
        with torch.device(device):  # random weights, made directly where they are used
            model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype)
    counts = count_parameters(model)
    reference = copy.deepcopy(model).eval().requires_grad_(False) if s.kl_beta > 0 and not s.lora_rank else None
    if s.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if s.lora_rank:  # as models.load_models: adapters, and the reference is the model with them off
        model = models.add_adapters(model, models.lora_config(s.lora_rank, s.lora_alpha, s.lora_dropout,
                                                                      s.lora_targets, s.lora_vision), a.seed)
        reference = models.AdaptersOff(model) if s.kl_beta > 0 else None
    model.train()
    optimizer = AdamW([p for p in model.parameters() if p.requires_grad], lr=s.lr, betas=s.adam_betas,
                      weight_decay=s.weight_decay)
    # generate's settings beyond rollout.generation_config's, passed to each of apo_step's generate calls
    overrides = {"min_new_tokens": s.max_new_tokens} if a.full_length else {}
    if a.cache_implementation:
        overrides["cache_implementation"] = None if a.cache_implementation == "dynamic" else a.cache_implementation
    if a.compile_decode is not None:
        overrides["disable_compile"] = not a.compile_decode
        if a.compile_decode and device.type != "cuda":
            overrides["compile_config"] = CompileConfig()
            overrides["compile_config"]._compile_all_devices = True  # transformers compiles on CUDA only otherwise
    examples = synthetic_examples(s.prompts_per_step, a.image_size, a.seed) if a.config != "toy" else [
        data.prepare_example(row, data.COLUMNS) for row in toy.toy_rows("train", seed=0)[:s.prompts_per_step]]
    prompts = encode(processor, examples, s)
    P, patches = prompts["input_ids"].shape[1], int(prompts["image_grid_thw"][0].prod())
    G = s.group_size
    prompt_tokens, all_patches = G * int(prompts["attention_mask"].sum()), G * prompts["pixel_values"].shape[0]
    rows = rows_per_pass(s.prompts_per_step, G, s.micro_batch_size, s.share_prompt)
    pass_prompt_tokens = prompt_tokens * rows // (s.prompts_per_step * G)  # each row holds its prompt once
    pass_patches = all_patches * rows // (s.prompts_per_step * G)
    if s.lora_rank and not s.lora_vision and s.share_prompt:
        pass_patches = 0  # the frozen tower's features come from the rollout (rollout.sample_responses)
    clock = DecodeClock()
    generate = model.generate
    model.generate = lambda **kwargs: generate(**kwargs, streamer=clock, **overrides)  # apo_step's calls, timed
    step = optimizer.step

    def timed_step(meter):  # the optimizer's share of the update
        with meter("optimizer"):
            step()

    steps = []
    state = {"step": 0, "updates": 0, "steps": a.steps, "bad_rows": 0, "skipped_updates": 0, "bad_in_a_row": 0}
    for _ in range(a.steps):
        meter, clock.calls = Meter(device), []
        optimizer.step = lambda: timed_step(meter)
        metrics, _ = apo.apo_step(model, reference, processor, optimizer, examples, state, s, clock=meter)
        state["step"] += 1
        timing = clock.summary()
        generated = metrics["response_tokens"]
        flops = step_flops(pass_prompt_tokens + generated, pass_patches, counts, timing["decode_token_steps"],
                           (s.prompts_per_step * G > s.mini_batch_size) + (reference is not None), prompt_tokens,
                           all_patches)
        seconds = {k: round(x, 4) for k, x in meter.seconds.items()}
        step_seconds = sum(x for k, x in meter.seconds.items() if k != "optimizer")  # (inside "update")
        update_seconds = meter.seconds["update"]
        steps.append({
            "step_seconds": round(step_seconds, 3), "seconds": seconds,
            "peak_memory_gib": round(max(meter.peak.values()) / GiB, 3),
            "peak_memory_gib_by_phase": {k: round(x / GiB, 3) for k, x in meter.peak.items()},
            "rollout_tokens_per_s": round(generated / meter.seconds["rollout"], 1),
            "train_tokens_per_s": round((pass_prompt_tokens + generated) / update_seconds, 1),
            "tokens_per_pass": {"prompt": pass_prompt_tokens, "response": generated, "rows": rows,
                                "image_patches": pass_patches},
            **{k: round(x, 4) for k, x in timing.items()},
            "response_tokens": generated, "tflop": round(sum(flops.values()) / 1e12, 3),
            "mfu": round(sum(flops.values()) / step_seconds / PEAK_BF16_FLOPS, 4) if device.type == "cuda" else None,
            "mfu_by_phase": ({"rollout": round(flops["rollout"] / meter.seconds["rollout"] / PEAK_BF16_FLOPS, 4),
                              "logprobs": round(flops["logprobs"] / meter.seconds["logprobs"] / PEAK_BF16_FLOPS, 4),
                              "update": round(flops["update"] / update_seconds / PEAK_BF16_FLOPS, 4)}
                             if device.type == "cuda" else None),
        })
        print(json.dumps(steps[-1]), flush=True)
    del optimizer.step
    # The decode floor: a decoding step reads every language-model weight once, and the KV cache (on average at
    # half the response length) once more: bytes / HBM bandwidth.
    t = config.text_config
    kv_per_token = t.num_hidden_layers * 2 * t.num_key_value_heads * 2 * (getattr(t, "head_dim", None)
                                                                           or t.hidden_size // t.num_attention_heads)
    lm_bytes = counts["text_params_per_token"] * (2 if dtype == torch.bfloat16 else 4)
    n_gen = s.generation_batch_size or s.prompts_per_step * s.group_size
    kv_bytes = n_gen * (P + s.max_new_tokens / 2) * kv_per_token
    result = {
        "config": a.config, "device": a.device,
        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else cpu_name(),
        "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "settings": {**{k: getattr(s, k) for k in FLAGS}, "image_size": a.image_size, "full_length": a.full_length,
                     "cache_implementation": a.cache_implementation or "dynamic",
                     "compile_decode": a.compile_decode},
        **counts, "prompt_tokens": P, "patches_per_image": patches, "steps_run": a.steps,
        **steps[-1],
        "decode_floor_ms": round(1000 * lm_bytes / HBM_BYTES_PER_S, 3) if device.type == "cuda" else None,
        "decode_floor_ms_with_kv_cache": (round(1000 * (lm_bytes + kv_bytes) / HBM_BYTES_PER_S, 3)
                                          if device.type == "cuda" else None),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GiB, 3) if device.type == "cuda" else None,
        "per_step": steps,
        "memory_plan": memory_plan(config, counts, s, P, patches, a.target_gib) if device.type == "cuda" else None,
    }
    return result


def main(argv=None):
    a, s = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    processor = toy.build_processor(min_pixels=s.min_pixels, max_pixels=s.max_pixels)
    result = dry_run(a, s, processor) if a.dry_run else bench(a, s, processor)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "per_step"}, indent=2))


if __name__ == "__main__":
    main()
