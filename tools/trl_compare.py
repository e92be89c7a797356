"""apo's step beside TRL's GRPOTrainer at equal work, on the toy, in one process, one thread.

    pip install trl      # (not in requirements.txt: only this script needs it)
    python tools/trl_compare.py --out docs/bench/trl_toy.json                   # the toy's sizes
    python tools/trl_compare.py --group-size 16 --image-size 336 --out g16.json  # more responses, longer prompts
    python tools/trl_compare.py --table docs/bench/trl/*.json                   # docs/PERF.md's table from them

Equal work: the same starting model (the toy's), the same prompts in the same order (the toy's training rows, the
prompt of rollout.build_messages), the same reward (reward.accuracy_reward + reward.format_reward), the same sizes
(B prompts × G responses, up to 32 new tokens, one optimizer step per rollout over all of them), the same sampling
(temperature 1, no top-k/top-p, vision tokens suppressed), the same optimizer (AdamW, betas 0.9/0.99, grad clip 1,
lr on apo's cosine), β = 0.02 against a frozen reference, fp32 on the CPU. apo runs as GRPO (--no-dads --no-stcr)
unless --apo, so that the loss is the same too; TRL's loss_type "dapo" is the token mean over the batch, as apo's.

The two alternate step by step, ABBA (apo first on even steps, TRL first on odd ones), so each pair of steps meets
the same machine load; the summary takes the medians of steps --skip.. (the first ones warm up) and the median of
the per-pair ratios apo / TRL. Each side's phases: rollout, reward, log-prob passes, update (TRL's: from its own
methods, timed by wrapping them). Tokens per pass: what each side's log-prob forward holds (TRL: every completion
with its own copy of the prompt and image; apo: each prompt once per group, rollout.shared_rows).
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository
import apo  # noqa: E402
import reward  # noqa: E402
import rollout  # noqa: E402
from plumbing import data, models, toy  # noqa: E402
from plumbing.adamw import AdamW  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=23, help="optimizer steps of each side")
    p.add_argument("--skip", type=int, default=3, help="first steps left out of the summary (warm-up)")
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--image-size", type=int, default=toy.IMAGE_SIZE,
                   help="px a side: the prompt's image tokens ((size/28)^2), so its share of a sequence")
    p.add_argument("--apo", action="store_true", help="apo with DADS and STCR (default: GRPO, TRL's loss)")
    p.add_argument("--no-share-prompt", action="store_true", help="apo with a copy of the prompt per response")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="JSON: settings, every step of both sides, the summary")
    p.add_argument("--table", nargs="+", metavar="JSON", help="print the Markdown table of these results instead")
    a = p.parse_args(argv)
    if not a.table and not a.out:
        p.error("--out is required (or --table)")
    return a


def markdown_table(paths: list) -> str:
    """One row per result file: the settings, each side's median seconds per phase, tokens per log-prob pass."""
    lines = ["| B × G | image tokens | prompt share | apo layout | step apo / TRL (s) | ratio | rollout | "
             "log-probs | update | tokens per pass apo / TRL |", "|" + "---|" * 10]
    for path in paths:
        r = json.loads(Path(path).read_text())
        st, su = r["settings"], r["summary"]
        apo_s, trl_s = su["apo_median_s"], su["trl_median_s"]
        pair = lambda k: f"{apo_s[k]:.3f} / {trl_s[k]:.3f}"  # noqa: E731
        layout = ("shared" if st["share_prompt"] else "a copy each") + (", APO" if st["apo_terms"] else "")
        lines.append(f"| {st['prompts_per_step']} × {st['group_size']} | {(st['image_size'] // 28) ** 2} | "
                     f"{su['prompt_share_of_a_sequence']:.2f} | {layout} | {pair('step_s')} | "
                     f"**{su['ratio_median_of_pairs']:.2f}** | {pair('rollout')} | {pair('logprobs')} | "
                     f"{pair('update')} | {su['tokens_per_pass']['apo']['real_tokens']:.0f} / "
                     f"{su['tokens_per_pass']['trl']['real_tokens']} |")
    return "\n".join(lines)


class ApoSide:
    """apo.apo_step as apo.train runs it with the toy preset (no run folder, no evaluation)."""

    def __init__(self, a, steps: int):
        argv = ["--data", "toy", "--steps", str(steps), "--eval-every", "0", "--kl-beta", "0.02",
                "--prompts-per-step", str(a.prompts_per_step), "--group-size", str(a.group_size),
                "--mini-batch-size", str(a.prompts_per_step * a.group_size),
                "--micro-batch-size", str(a.prompts_per_step * a.group_size),
                "--max-pixels", str(a.image_size ** 2), "--min-pixels", str(a.image_size ** 2)]
        argv += [] if a.apo else ["--no-dads", "--no-stcr"]
        argv += ["--no-share-prompt"] if a.no_share_prompt else []
        self.args = args = apo.parse_args(argv)
        self.policy, self.reference, self.processor = models.load_models(
            args.model, None, True, False, False, torch.float32, torch.device("cpu"))
        self.optimizer = AdamW(list(self.policy.parameters()), lr=args.lr, betas=args.adam_betas, seed=args.seed)
        self.state = {"step": 0, "updates": 0, "bad_rows": 0, "skipped_updates": 0, "bad_in_a_row": 0,
                      "steps": steps}

    def step(self, examples) -> dict:
        metrics, _ = apo.apo_step(self.policy, self.reference, self.processor, self.optimizer, examples,
                                  self.state, self.args)
        self.state["step"] += 1
        phases = {k.removeprefix("seconds_"): v for k, v in metrics.items() if k.startswith("seconds_")}
        return {"step_s": sum(phases.values()), **phases, "mean_reward": metrics["reward"],
                "format_rate": metrics["format_rate"], "response_tokens": metrics["response_tokens"]}


def main(argv=None):
    a = parse_args(argv)
    if a.table:
        print(markdown_table(a.table))
        return None
    import transformers
    from qwen_vl_utils import fetch_image
    from transformers import TrainerCallback
    try:
        import datasets
        import trl
        from trl import GRPOConfig, GRPOTrainer
    except ImportError:
        sys.exit("this comparison needs TRL: pip install trl")
    torch.set_num_threads(a.threads)
    B, G = a.prompts_per_step, a.group_size
    side = ApoSide(a, a.steps)
    s = side.args
    # The prompts of the steps, in apo's order (data.take_examples), given to both sides.
    table, base, columns = data.load_table("toy", "train")
    usable = lambda row: data.usable_example(row, columns, base, side.processor, s.min_pixels,  # noqa: E731
                                             s.max_pixels, s.max_prompt_tokens)
    position, steps = 0, []
    for _ in range(a.steps):
        examples, position, _ = data.take_examples(table, B, position, s.seed, s.shuffle, usable)
        steps.append(examples)
    resized = lambda image: fetch_image({"image": image, "min_pixels": s.min_pixels,  # noqa: E731
                                         "max_pixels": s.max_pixels})
    text_of = lambda problem: rollout.build_messages(problem, 1)[0]["content"][1]["text"]  # noqa: E731
    trl_rows = [{"prompt": [{"role": "user", "content": text_of(e["problem"])}],
                 "images": [resized(e["images"][0])], "answer": e["answer"]} for step in steps for e in step]
    features = datasets.Features({"prompt": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
                                  "images": datasets.Sequence(datasets.Image()), "answer": datasets.Value("string")})
    trl_table = datasets.Dataset.from_list(trl_rows, features=features)

    # TRL's side: its own copy of the starting model and of the reference
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration
    folder = str(toy.starting_model())
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(folder, padding_side="left")
    processor.image_processor.size = {"shortest_edge": s.min_pixels, "longest_edge": s.max_pixels}
    tok = processor.tokenizer
    model.generation_config.eos_token_id = sorted({tok.convert_tokens_to_ids(t) for t in ("<|im_end|>",
                                                                                          "<|endoftext|>")})

    trl_rewards = []

    def reward_fn(prompts, completions, answer, **_):
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        rewards = [reward.accuracy_reward(t, g) + reward.format_reward(t) for t, g in zip(texts, answer)]
        trl_rewards.append(sum(rewards) / len(rewards))
        return rewards

    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_compare_"), report_to="none", logging_strategy="no",
        save_strategy="no", eval_strategy="no", use_cpu=True, bf16=False, gradient_checkpointing=False,
        seed=s.seed, max_steps=a.steps, dataloader_num_workers=0, remove_unused_columns=False,
        shuffle_dataset=False, num_generations=G, per_device_train_batch_size=B * G,
        gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1,
        max_completion_length=s.max_new_tokens, temperature=s.temperature, top_p=1.0, top_k=0,
        repetition_penalty=1.0, generation_kwargs={"suppress_tokens": tok.convert_tokens_to_ids(rollout.VISION_TOKENS)},
        loss_type="dapo", beta=s.kl_beta, epsilon=s.clip_eps, scale_rewards="group", use_bias_correction_kl=False,
        mask_truncated_completions=False, disable_dropout=True, optim="adamw_torch", learning_rate=s.lr,
        adam_beta1=s.adam_betas[0], adam_beta2=s.adam_betas[1], weight_decay=0.0, max_grad_norm=s.grad_clip,
        lr_scheduler_type="constant", warmup_steps=0, log_completions=False)

    clock, tokens = {}, {}

    def timed(name, method):
        def wrapper(self, *args, **kwargs):
            start = time.perf_counter()
            out = method(self, *args, **kwargs)
            clock[name] = clock.get(name, 0.0) + time.perf_counter() - start
            return out
        return wrapper

    class Timed(GRPOTrainer):  # TRL's own methods, each timed
        _generate = timed("rollout", GRPOTrainer._generate)
        _calculate_rewards = timed("reward", GRPOTrainer._calculate_rewards)
        _prepare_inputs = timed("prepare", GRPOTrainer._prepare_inputs)

        def create_scheduler(self, num_training_steps, optimizer=None):  # apo's cosine over the run's steps
            total = a.steps
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer or self.optimizer, lambda k: apo.cosine_schedule(k, total, s.warmup_ratio, s.lr,
                                                                           s.min_lr) / s.lr)
            return self.lr_scheduler

        def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args,
                                               **kwargs):
            name = "logprobs" if not torch.is_grad_enabled() else "update_forward"
            start = time.perf_counter()
            out = super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                             *args, **kwargs)
            clock[name] = clock.get(name, 0.0) + time.perf_counter() - start
            pixels = kwargs.get("pixel_values")
            tokens[name] = {"rows": int(input_ids.shape[0]), "real_tokens": int(attention_mask.sum()),
                            "image_patches": int(pixels.shape[0]) if pixels is not None else 0}
            return out

    records = []

    class Alternate(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            k = state.global_step
            self.apo = side.step(steps[k]) if k % 2 == 0 else None  # ABBA: apo first on even steps
            clock.clear()
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            k, trl_s = state.global_step - 1, time.perf_counter() - self.begin
            apo_step = self.apo or side.step(steps[k])
            logprobs = clock.get("logprobs", 0.0)
            trl_side = {"step_s": trl_s, "rollout": clock.get("rollout", 0.0), "reward": clock.get("reward", 0.0),
                        "logprobs": logprobs, "update": trl_s - clock.get("prepare", 0.0),
                        "other": clock.get("prepare", 0.0) - clock.get("rollout", 0.0) - clock.get("reward", 0.0)
                        - logprobs, "tokens": dict(tokens)}
            records.append({"step": k, "apo": apo_step, "trl": trl_side, "ratio": apo_step["step_s"] / trl_s})
            print(json.dumps({"step": k, "apo_s": round(apo_step["step_s"], 3), "trl_s": round(trl_s, 3),
                              "ratio": round(records[-1]["ratio"], 3)}), flush=True)

    trainer = Timed(model=model, reward_funcs=[reward_fn], args=config, train_dataset=trl_table,
                    processing_class=processor, callbacks=[Alternate()])
    trainer.train()

    kept = [r for r in records if r["step"] >= a.skip]
    median = lambda side_, k: statistics.median(r[side_][k] for r in kept)  # noqa: E731
    phases = ("step_s", "rollout", "reward", "logprobs", "update")
    P = rollout.encode_prompts(side.processor, [steps[0][0]["images"]], [steps[0][0]["problem"]], s.min_pixels,
                               s.max_pixels)["input_ids"].shape[1]
    apo_tokens = median("apo", "response_tokens")
    summary = {
        "steps": [kept[0]["step"], kept[-1]["step"]],
        "apo_median_s": {k: median("apo", k) for k in phases},
        "trl_median_s": {k: median("trl", k) for k in phases},
        "ratio_median_of_pairs": statistics.median(r["ratio"] for r in kept),
        "ratio_of_medians": median("apo", "step_s") / median("trl", "step_s"),
        "prompt_tokens": P, "response_tokens_per_step": {"apo": apo_tokens},
        # a log-prob pass: TRL forwards each completion with its prompt; apo each prompt once per group
        "tokens_per_pass": {"trl": kept[-1]["trl"]["tokens"].get("logprobs"),
                            "apo": {"rows": B if not a.no_share_prompt else B * G,
                                    "real_tokens": (B if not a.no_share_prompt else B * G) * P + apo_tokens}},
        "prompt_share_of_a_sequence": P / (P + apo_tokens / (B * G)),
        "reward_mean": {"apo": statistics.fmean(r["apo"]["mean_reward"] for r in records),
                        "trl": statistics.fmean(trl_rewards)},
    }
    settings = {"prompts_per_step": B, "group_size": G, "image_size": a.image_size, "apo_terms": a.apo,
                "share_prompt": not a.no_share_prompt, "threads": a.threads, "steps": a.steps, "skip": a.skip,
                "versions": {"torch": torch.__version__, "trl": trl.__version__,
                             "transformers": transformers.__version__}}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"settings": settings, "summary": summary, "steps": records}, indent=1))
    print(json.dumps({"settings": settings, "summary": summary}, indent=1))
    return summary


if __name__ == "__main__":
    main()
