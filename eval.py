"""Evaluate Qwen2.5-VL policies on a data set, and draw training curves.

    python eval.py --model runs/toy/final --data toy --split test --out runs/toy/eval.json --baseline toy
    python eval.py --model runs/apo/final --data geo3k --split test --out runs/apo/geo3k.json --samples 8
    python eval.py --plot runs/toy-apo runs/toy-grpo --out docs/toy_apo_vs_grpo.png

Each problem is answered once greedily: accuracy, format rate, and mean response length over all, correct and wrong
responses. `--samples k` adds k sampled responses per problem (at --temperature) for pass@k, the share of problems
that at least one of the k samples solves, and the mean accuracy of a single sample. `--baseline M2` answers the
same prompts with a second model and prints the two side by side. The numbers go to --out (JSON, with every
response), and a bar chart beside it (same name, .png).

Prompts, rewards and data loading are those of training (apo.py, rollout.py, reward.py), so an evaluation scores
exactly what training optimizes.
"""

import argparse
import json
from pathlib import Path

import torch

import apo
import reward
import rollout


def load_examples(cfg: apo.Args, limit: int = 0) -> tuple:
    """The usable rows of cfg.data / cfg.split as prepared examples, and how many rows were skipped as bad."""
    table, base = apo.load_table(cfg)
    examples, skipped = [], 0
    for i in range(min(len(table), limit or len(table))):
        try:
            examples.append(apo.prepare_example(table[i], cfg, base))
        except (apo.BadRow, OSError) as err:  # (reading a row decodes its image: a corrupt one fails there)
            skipped += 1
            print(f"skipping row {i}: {err}")
    if not examples:
        raise SystemExit(f"{cfg.data} ({cfg.split}): no usable rows")
    return examples, skipped


@torch.no_grad()
def answer_all(model_name: str, examples: list, cfg: apo.Args, device, dtype, samples: int, batch_size: int) -> list:
    """One record per example: the greedy response, its scores and length, and (samples > 0) the samples' scores."""
    model, processor = apo.load_model(model_name, dtype, device, cfg.trust_remote_code)
    greedy = rollout.generation_config(processor, cfg.max_new_tokens, 1.0, 1.0, do_sample=False)
    sampling = rollout.generation_config(processor, cfg.max_new_tokens, cfg.temperature, cfg.top_p)
    records = []
    for start in range(0, len(examples), batch_size):
        part = examples[start:start + batch_size]
        prompts = rollout.encode_prompts(processor, [e["image"] for e in part], [e["problem"] for e in part],
                                         cfg.min_pixels, cfg.max_pixels)
        out = rollout.sample_responses(model, processor, prompts, 1, greedy)
        drawn = rollout.sample_responses(model, processor, prompts, samples, sampling) if samples else None
        for i, e in enumerate(part):
            text = out["texts"][i]
            record = {"problem": e["problem"], "answer": e["answer"], "response": text,
                      "correct": reward.accuracy_reward(text, e["answer"]) > 0,
                      "format": reward.format_reward(text) > 0,
                      "length": out["lengths"][i].item(), "truncated": out["truncated"][i].item()}
            if drawn is not None:
                record["samples_correct"] = [reward.accuracy_reward(t, e["answer"]) > 0
                                             for t in drawn["texts"][i * samples:(i + 1) * samples]]
            records.append(record)
        print(f"{model_name}: {len(records)}/{len(examples)}", end="\r", flush=True)
    print()
    return records


def summarize(records: list, samples: int) -> dict:
    """Accuracy, format rate, response lengths (all / correct / wrong; None where there is none), pass@k."""
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    summary = {
        "problems": len(records),
        "accuracy": mean([r["correct"] for r in records]),
        "format_rate": mean([r["format"] for r in records]),
        "mean_response_length": mean([r["length"] for r in records]),
        "mean_response_length_correct": mean([r["length"] for r in records if r["correct"]]),
        "mean_response_length_wrong": mean([r["length"] for r in records if not r["correct"]]),
        "truncated_rate": mean([r["truncated"] for r in records]),
    }
    if samples:
        summary[f"pass@{samples}"] = mean([any(r["samples_correct"]) for r in records])
        summary["sample_accuracy"] = mean([c for r in records for c in r["samples_correct"]])
    return summary


def print_table(results: dict):
    """One row per metric, one column per model, and the difference when there are two."""
    names = list(results)
    metrics = [k for k, v in results[names[0]].items() if isinstance(v, (int, float)) or v is None]
    fmt = lambda v: "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    rows = [["metric", *names] + (["difference"] if len(names) == 2 else [])]
    for k in metrics:
        values = [results[n][k] for n in names]
        diff = [f"{values[0] - values[1]:+.3f}".replace("+0.000", "0") if None not in values else "-"] \
            if len(names) == 2 else []
        rows.append([k, *map(fmt, values), *diff])
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)))


def bar_chart(results: dict, path: Path):
    """Rates (accuracy, format, pass@k) and response lengths of each model, side by side."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = next(iter(results.values()))
    panels = [("rate", [k for k in first if k in ("accuracy", "format_rate", "sample_accuracy")
                        or k.startswith("pass@")]),
              ("tokens", ["mean_response_length", "mean_response_length_correct", "mean_response_length_wrong"])]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    width = 0.8 / len(results)
    for ax, (unit, keys) in zip(axes, panels):
        for j, (name, summary) in enumerate(results.items()):
            values = [summary[k] or 0.0 for k in keys]
            bars = ax.bar([i + j * width for i in range(len(keys))], values, width, label=name)
            ax.bar_label(bars, fmt="%.2f" if unit == "rate" else "%.0f", fontsize=7)
        ax.set_xticks([i + width * (len(results) - 1) / 2 for i in range(len(keys))],
                      [k.replace("mean_response_length", "length").replace("_", " ") for k in keys], fontsize=8)
        ax.set_ylabel(unit)
    axes[0].set_ylim(0, 1.1)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ training curves
CURVES = [  # panel title, metrics.jsonl keys drawn in it
    ("reward", ["reward"]), ("accuracy", ["accuracy"]), ("format rate", ["format_rate"]),
    ("response length (tokens)", ["response_length_correct", "response_length_wrong"]),
    ("KL to the reference", ["kl"]), ("entropy", ["entropy"]),
    ("DADS: mean KL weight of positives", ["dads_weight_pos_mean"]),
    ("STCR: advantage multiplier of negatives", ["stcr_mult_neg_mean", "stcr_mult_neg_max"]),
]


def plot_runs(run_dirs: list, path: Path, smooth: int = 10):
    """Training curves of one or more run folders (their metrics.jsonl) in one PNG: raw values faint, and a moving
    average over `smooth` steps on top."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(16, 6.5))
    for colour, run in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 9, map(Path, run_dirs)):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
        for ax, (title, keys) in zip(axes.flat, CURVES):
            for key, style in zip(keys, ("-", "--")):
                points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
                if not points:
                    continue
                steps, values = zip(*points)
                window = [values[max(0, i - smooth + 1):i + 1] for i in range(len(values))]
                ax.plot(steps, values, style, color=colour, alpha=0.2, linewidth=0.8)
                label = run.name + (f" {key.rsplit('_', 1)[-1]}" if len(keys) > 1 else "")  # correct, wrong, ...
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


def plot_run(run_dir) -> Path:
    """`run_dir`/curves.png from `run_dir`/metrics.jsonl (apo.py redraws it at each checkpoint and at the end)."""
    path = Path(run_dir) / "curves.png"
    plot_runs([run_dir], path)
    return path


# --------------------------------------------------------------------------------------------------------- main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="toy", help="checkpoint to evaluate: Hub id, folder, or 'toy'")
    p.add_argument("--baseline", default="", help="a second model, answering the same prompts")
    p.add_argument("--data", default="geo3k", help="as apo.py --data ('geo3k', 'toy', a Hub id, a file, ...)")
    p.add_argument("--split", default="test")
    p.add_argument("--out", default="", help="result JSON (default: eval-<data>-<split>.json); the chart is beside it")
    p.add_argument("--samples", type=int, default=0, help="k sampled responses per problem for pass@k (0: none)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of --samples")
    p.add_argument("--max-new-tokens", type=int, default=0, help="response length limit (0: as training, "
                   "apo.py's default or the toy preset's)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generate call")
    p.add_argument("--limit", type=int, default=0, help="evaluate the first N problems only (0: all)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    p.add_argument("--plot", nargs="+", metavar="RUN", help="draw the training curves of these run folders into "
                   "--out (a .png) instead of evaluating")
    a = p.parse_args(argv)
    if a.baseline == a.model:
        p.error("--baseline names the model itself")
    if a.plot:
        out = Path(a.out or "curves.png")
        out.parent.mkdir(parents=True, exist_ok=True)
        plot_runs(a.plot, out)
        print(f"wrote {out}")
        return

    # The data settings (pixel budget, response length, columns) are training's: apo.Args with the toy preset
    # applied for --data toy.
    cfg = apo.Args(**{**(apo.PRESETS["toy"] if a.data == "toy" else {}), "model": a.model, "data": a.data,
                      "split": a.split, "seed": a.seed, "device": a.device, "dtype": a.dtype,
                      "temperature": a.temperature})
    if a.max_new_tokens:
        cfg.max_new_tokens = a.max_new_tokens
    device, dtype = apo.resolve_device(cfg)
    torch.manual_seed(a.seed)
    examples, skipped = load_examples(cfg, a.limit)
    results, responses = {}, {}
    for name in [a.model] + ([a.baseline] if a.baseline else []):
        records = answer_all(name, examples, cfg, device, dtype, a.samples, a.batch_size)
        results[name], responses[name] = summarize(records, a.samples), records
    print_table(results)

    out = Path(a.out or f"eval-{Path(a.data).stem}-{a.split}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"model": a.model, "data": a.data, "split": a.split, "skipped_rows": skipped,
              "max_new_tokens": cfg.max_new_tokens, **results[a.model], "responses": responses[a.model]}
    if a.baseline:
        report["baseline"] = {"model": a.baseline, **results[a.baseline], "responses": responses[a.baseline]}
    out.write_text(json.dumps(report, indent=1))
    bar_chart(results, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return report


if __name__ == "__main__":
    main()
