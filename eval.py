"""Evaluate Qwen2.5-VL policies: the five benchmarks of the paper's Table 1, geometry3k, or any training-format data.

    python eval.py --model runs/apo/final --baseline Qwen/Qwen2.5-VL-3B-Instruct --bench all --out runs/apo/table1.json
    python eval.py --model runs/apo/final --bench mathvista --limit 100            # a quick look
    python eval.py --model M --bench mathverse --data path/to/MathVerse            # a local copy, Hub layout or parquet
    python eval.py --model runs/toy/final --baseline toy --data toy --samples 4    # training-format data, pass@4
    python eval.py --plot runs/apo runs/grpo --out curves.png                       # training curves of run folders
    python eval.py --plot apo=runs/apo-s0,runs/apo-s1 grpo=runs/grpo-s0,runs/grpo-s1  # seeds of two methods
    python eval.py --explain runs/toy                                               # a page of a run's groups
    python eval.py --explain runs/apo/table1.json                                   # ... of an evaluation's answers

How a benchmark is scored (the authors released no evaluation; the README's "Reproducing Table 1" says why absolute
numbers differ from official ones): each row becomes images, the problem text, a gold and its kind
(`benchmark_example`); the model answers greedily with the training prompt (`rollout.build_messages`: the images,
the problem, then "think in <think>, answer in <answer>"); `score` checks the final answer by rules, no LLM judge:
- letter (multiple choice): the answer's letter (A–I: "B", "(B)", "B.", "B: text", "\\text{B}", "**B**", "The answer
  is B"), or, with no letter, the option whose exact (normalized) text it is, else the one option whose value it
  gives (none where several share it); where options repeat the right one's text, each of them is right;
- number (MathVista integer / float): equal after rounding to the row's precision, units ignored ("W = 1.2": its
  right side);
- math (free form): the training reward's reading of the gold (a value, or normalized text when it is not one), or
  normalized text equality; any of several acceptable golds (MMMU);
- the final answer is the <answer> block's (or its \\boxed{…}), else the last \\boxed{…}; otherwise 0: no random
  guess, no judge. A short sentence that states one value ("The length is 14 cm") is read as that value, in every
  kind, as in training (reward.py).

To check the grader where a misread answer costs most, `--explain RESULT.json` writes RESULT.html: each problem with
every model's response, the final answer as `score` read it (`explain_score`) beside the gold's reading, and why
each 0 is a 0, with filters (wrong only, cut at the token limit, models disagree, a benchmark). `--explain RUN`
writes the same page for a run's logged groups (plumbing/pictures.py `explain`).
"""

import argparse
import ast
import dataclasses
import html
import json
import re
from pathlib import Path

import torch

import reward
import rollout
from plumbing import data, flags, models, parallel, pictures

MMMU_SUBJECTS = (
    "Accounting", "Agriculture", "Architecture_and_Engineering", "Art", "Art_Theory", "Basic_Medical_Science",
    "Biology", "Chemistry", "Clinical_Medicine", "Computer_Science", "Design", "Diagnostics_and_Laboratory_Medicine",
    "Economics", "Electronics", "Energy_and_Power", "Finance", "Geography", "History", "Literature", "Manage",
    "Marketing", "Materials", "Math", "Mechanical_Engineering", "Music", "Pharmacy", "Physics", "Psychology",
    "Public_Health", "Sociology")
# name -> (Hub id, config(s), split). MathVerse: all 3,940 rows of testmini (788 problems × 5 versions), as R1-style
# papers report it; MMMU: its 30 subject configs, 900 validation rows.
BENCHMARKS = {
    "mathvista": ("AI4Math/MathVista", None, "testmini"),
    "mathverse": ("AI4Math/MathVerse", "testmini", "testmini"),
    "mmk12": ("FanqingM/MMK12", None, "test"),
    "mmstar": ("Lin-Chen/MMStar", "val", "val"),
    "mmmu": ("MMMU/MMMU", MMMU_SUBJECTS, "validation"),
    "geo3k": ("hiyouga/geometry3k", None, "test"),
}
# The paper's Table 1 (accuracy, %): Qwen2.5-VL-3B-Instruct -> View-R1-3B (APO). geometry3k is not in it.
PAPER = {"mathvista": (57.8, 66.2), "mathverse": (34.7, 41.6), "mmk12": (43.5, 47.0), "mmstar": (54.1, 61.3),
         "mmmu": (47.6, 48.9)}
TITLES = {"mathvista": "MathVista", "mathverse": "MathVerse", "mmk12": "MMK12", "mmstar": "MMStar", "mmmu": "MMMU",
          "geo3k": "geometry3k"}


# ------------------------------------------------------------------------------------------------ rows -> examples
def inline_choices(text: str) -> list | None:
    """Options written inside a question, in order from A: "Choices:\\nA:40°\\nB:60°" (MathVerse), "A. 3\\nB. 4"
    (MMK12), "Options: A: on the book., B: beneath the cat." (MMStar). None when there are fewer than two."""
    markers = [m for m in re.finditer(r"(?:^|\n|,\s+|:\s*)\(?([A-I])\)?\s*[:.．、)]\s*", text)]
    kept = []
    for m in markers:
        if m.group(1) == "ABCDEFGHI"[len(kept)]:
            kept.append(m)
    options = [text[m.end():(kept[i + 1].start() if i + 1 < len(kept) else len(text))].split("\n")[0].strip(" ,")
               for i, m in enumerate(kept)]
    return options if len(options) >= 2 else None


def benchmark_example(name: str, row: dict) -> dict:
    """One row of benchmark `name` -> {'images': [PIL], 'problem': the text shown before the format instruction,
    'answer': the gold (a list where several are right), 'kind': 'letter' | 'number' | 'math' | 'text',
    'choices': option texts or None, 'precision': decimals of a number, 'unit', 'groups': {breakdown: value}}.
    data.BadRow when the row cannot be used."""
    example = {"choices": None, "precision": None, "unit": None, "groups": {}}

    def letter(gold: str) -> str | None:  # "C", "(C)" -> "C"
        parsed = reward.parse_gold(gold)
        return parsed.value if parsed is not None and parsed.kind == "letter" else None

    if name == "mathvista":
        choices = list(row["choices"] or [])
        example.update(images=[data.open_image(row["decoded_image"])], problem=row["query"], unit=row.get("unit"),
                       groups={"question_type": row["question_type"], "answer_type": row["answer_type"]})
        if row["question_type"] == "multi_choice":
            if row["answer"] not in choices:
                raise data.BadRow(f"answer {row['answer']!r} is none of the choices")
            example.update(answer=chr(65 + choices.index(row["answer"])), kind="letter", choices=choices)
        elif row["answer_type"] in ("integer", "float"):
            example.update(answer=row["answer"], kind="number", precision=int(row.get("precision") or 0))
        else:  # 'list' (2 rows): a Python-style list, read as a set
            example.update(answer=row["answer"], kind="math")
    elif name == "mathverse":
        multi, gold = row["question_type"] == "multi-choice", row["answer"].strip()
        example.update(images=[data.open_image(row["image"])], problem=row["query_cot"], answer=letter(gold) or gold,
                       kind="letter" if multi and letter(gold) else "text" if multi else "math",  # "False": text
                       choices=inline_choices(row["question"]) if multi else None,
                       groups={"problem_version": row["problem_version"]})
    elif name in ("mmk12", "mmstar"):
        if not letter(row["answer"]):
            raise data.BadRow(f"answer {row['answer']!r} is not a choice letter")
        example.update(images=[data.open_image(row["image"])], problem=row["question"],
                       answer=letter(row["answer"]), kind="letter",
                       choices=inline_choices(row["question"]),
                       groups={"subject": row["subject"]} if name == "mmk12" else {"category": row["category"]})
    elif name == "mmmu":
        options = ast.literal_eval(row["options"]) if row["options"] else []
        text = row["question"] + "".join(f"\n({chr(65 + i)}) {o}" for i, o in enumerate(options))
        # each image the text refers to ("<image 3>"), once, in the order of first mention (rollout.build_messages
        # puts it where its tag first stands)
        numbers = list(dict.fromkeys(int(k) for k in re.findall(r"<image (\d+)>", text)))
        images = [data.open_image(row.get(f"image_{k}")) for k in numbers]
        multi = row["question_type"] == "multiple-choice"
        gold = row["answer"]
        if not multi and gold.startswith("["):  # several acceptable answers, e.g. "['24/7', '3.429']"
            gold = [str(g) for g in ast.literal_eval(gold)]
        example.update(images=images, problem=text, answer=gold, kind="letter" if multi else "math",
                       choices=options if multi else None, groups={"subject": "_".join(row["id"].split("_")[1:-1])})
        if not images:
            raise data.BadRow("no image referenced")
    else:
        raise ValueError(f"unknown benchmark {name!r}: one of {sorted(BENCHMARKS)}")
    if not example["images"]:
        raise data.BadRow("no image")
    # Golds and options are read here, once, each with a gold's budget; `score` then finds them read (reading one
    # inside a response's 0.6 s could cut it short).
    golds = example["answer"] if isinstance(example["answer"], list) else [example["answer"]]
    for text in [*(example["choices"] or []), *(golds if example["kind"] != "number" else [])]:
        reward.parse_gold(text)
    return example


def training_example(row: dict, columns: tuple, base) -> dict:
    """A row of training-format data (geometry3k, toy, a file), which `score` checks as the training reward does (no
    kind of its own)."""
    return {**data.prepare_example(row, columns, base), "choices": None, "precision": None, "unit": None,
            "groups": {}}


def load_examples(name: str, source: str, split: str = "test", limit: int = 0) -> tuple:
    """The usable examples of a benchmark (by its Hub id, or `source`: a local copy in the Hub layout or a parquet
    file) or of training-format data, and how many rows were skipped as bad (each named once)."""
    import datasets

    if name in BENCHMARKS and name != "geo3k":
        hub_id, config, split = BENCHMARKS[name]
        source = source or hub_id
        configs = list(config) if isinstance(config, tuple) else [config]
        if Path(source).suffix in data.FILE_BUILDERS:  # a file (.parquet) is one table, of all configs and splits
            configs = [None]
        elif isinstance(config, tuple) and Path(source).is_dir():  # a local copy may hold some subjects only
            configs = [c for c in datasets.get_dataset_config_names(source) if c in config]
        table = datasets.concatenate_datasets([data.read_dataset(source, split, c) for c in configs])
        make, base = (lambda row: benchmark_example(name, row)), None
    else:
        table, base, columns = data.load_table(source or name, split)
        make = lambda row: training_example(row, columns, base)  # noqa: E731
    examples, skipped = [], 0
    for i in range(len(table)):
        if limit and len(examples) == limit:
            break
        try:
            examples.append(make(table[i]))
        except (data.BadRow, OSError, ValueError, SyntaxError) as err:  # (reading a row decodes its images)
            skipped += 1
            print(f"{name}: skipping row {i}: {err}")
    if not examples:
        raise SystemExit(f"{name}: no usable rows")
    return examples, skipped


# ---------------------------------------------------------------------------------------------------------- score
def _same_option(answer: str, option: str) -> bool:
    """An answer that gives an option's value (the option read as a gold is)."""
    gold = reward.parse_gold(option)
    return gold is not None and gold.kind != "letter" and reward.answer_matches(answer, gold)


def _chosen(answer: str, options: list) -> list:
    """The options an answer without a letter names: all those whose exact (normalized) text it is (options may repeat
    a text: 9, 12, 18, 18), else those whose value it gives, if they are one text; none where different options share
    that value (0.0 - 0.2 and 0.2 - 0.4 both read as -0.2: only their texts tell them apart, hence text first)."""
    texts = [reward.plain_text(option) for option in options]
    chosen = [i for i, text in enumerate(texts) if text == reward.plain_text(answer)] or \
        [i for i, option in enumerate(options) if _same_option(answer, option)]
    return chosen if len({texts[i] for i in chosen}) == 1 else []


def _number_of(answer: str) -> float | None:
    """The real number an answer gives, units ignored: math-verify drops the ones it knows, and here what follows
    the number ("1.25 J"); "W = 1.2": the value its right side gives, as in training. None where there is none."""
    for text in (answer, re.sub(r"(?<=[\d}])\s*[^\d\s{}][^\d{}]*$", "", answer)):
        value = reward.math_value(text)
        if getattr(value, "rel_op", None) == "==":
            value = value.rhs
        if value is not None and getattr(value, "is_number", False) and value.is_real:
            return float(value)
    return None


def _is_right(example: dict, response: str) -> bool:
    answer = reward.extract_answer(response)
    if not answer:
        return False
    golds = example["answer"] if isinstance(example["answer"], list) else [example["answer"]]
    if example.get("kind") == "letter":
        options, right, letter = example["choices"] or [], ord(golds[0]) - 65, reward.letter_of(answer)
        if letter:  # right also when its option repeats the right one's text (MathVista pid 781: 9, 12, 18, 18)
            i = ord(letter) - 65
            return i == right or max(i, right) < len(options) and \
                reward.plain_text(options[i]) == reward.plain_text(options[right])
        return right in _chosen(answer, options)
    if example.get("kind") == "number":
        value, digits = _number_of(answer), example.get("precision") or 0
        return value is not None and round(value, digits) == round(float(golds[0]), digits)
    for gold in golds:  # math, text, and training-format data (no kind: the training reward itself)
        parsed = reward.parse_gold(gold)
        if parsed is not None and reward.is_correct(response, parsed) or \
                example.get("kind") == "math" and reward.plain_text(answer) == reward.plain_text(gold):
            return True
    return False


def score(example: dict, response: str) -> float:
    """1.0 when the response's final answer is right by the rule of the example's kind (module docstring), else
    0.0. Never raises; the training reward's time budget (CPU time) applies."""
    return 1.0 if reward.budgeted(_is_right, example, response) else 0.0


def explain_score(example: dict, response: str) -> dict:
    """How `score` read a response, in reward.explain's terms (answer, source, gold_kind, gold_reading, reading,
    accuracy, format, the reasons), with score's own accuracy: a letter gold by the answer's letter, or else the
    option whose text or value it gives; a number rounded to the row's precision; any other gold as the training
    reward reads it (the first of several golds that the answer gives, else the first). Never raises."""
    accuracy, golds = score(example, response), example.get("answer")
    golds = golds if isinstance(golds, list) and golds else [golds]
    explained = [reward.explain(response, g if isinstance(g, str) else "") for g in golds]
    e = next((x for x in explained if x["accuracy"]), explained[0])
    kind, answer = example.get("kind"), e["answer"]
    read = reward.budgeted(_read_by_kind, example, answer, accuracy) if answer and kind in ("letter", "number") \
        else None
    if read:
        e = dict(e, **read)
    elif kind == "math" and accuracy and not e["accuracy"]:  # math, equal as text: the gold's text, exactly
        e = dict(e, reading=reward.plain_text(answer))
    why = None if accuracy else e["accuracy_reason"] or "another answer"
    return dict(e, accuracy=accuracy, gold_kind=kind or e["gold_kind"], accuracy_reason=why,
                reason="; ".join(filter(None, (why, e["format_reason"]))) or None)


def _read_by_kind(example: dict, answer: str, accuracy: float) -> dict:
    golds = example["answer"] if isinstance(example["answer"], list) else [example["answer"]]
    if example["kind"] == "number":
        digits = int(example.get("precision") or 0)
        value, gold = _number_of(answer), f"{float(golds[0]):.{digits}f}"
        reading = None if value is None else f"{value:.{digits}f}"
        why = "no number read" if value is None else f"another number: {reading} for {gold}"
        return {"reading": reading, "gold_reading": gold, "accuracy_reason": None if accuracy else why}
    letter, options = reward.letter_of(answer), example.get("choices") or []
    if letter:
        return {"reading": letter, "gold_reading": golds[0],
                "accuracy_reason": None if accuracy else f"another letter: {letter} for {golds[0]}"}
    chosen = "".join(chr(65 + i) for i in _chosen(answer, options)) or None  # no letter: an option by its text
    why = "no letter, and no one option's text or value" if options else "no letter (the options are not at hand)"
    return {"reading": chosen and f"option {chosen}", "gold_reading": golds[0],
            "accuracy_reason": None if accuracy else f"another option: {chosen} for {golds[0]}" if chosen else why}


# ------------------------------------------------------------------------------------------------------- evaluate
def evaluate(model, processor, examples: list, cfg, samples: int = 0, batch_size: int = 16,
             progress: str = "") -> list:
    """One record per example: the greedy response (the training prompt; `cfg`: apo.Args for the token limit and
    the pixel budget), its score, format and length; with `samples`, the scores of that many sampled responses.
    Training's held-out evaluations and eval.py both answer through here."""
    greedy = rollout.generation_config(processor, cfg.max_new_tokens, 1.0, 1.0, do_sample=False)
    with parallel.full_weights(model):  # --fsdp: the whole weights on every process
        answers = rollout.answer(model, processor, examples, greedy, batch_size, cfg.min_pixels, cfg.max_pixels,
                                 progress=progress)
        drawn = rollout.answer(model, processor, examples, rollout.generation_config(
            processor, cfg.max_new_tokens, cfg.temperature, cfg.top_p), batch_size, cfg.min_pixels,
            cfg.max_pixels, samples, progress=f"{progress} samples", seed=cfg.seed) if samples else [None] * len(
            examples)
    records = []
    for e, a, d in zip(examples, answers, drawn):
        text = a["texts"][0]
        record = {"problem": e["problem"], "answer": e["answer"], "kind": e.get("kind"), "groups": e.get("groups", {}),
                  "choices": e.get("choices"), "precision": e.get("precision"),  # (how `score` reads it)
                  "response": text, "correct": score(e, text) > 0, "format": reward.format_reward(text) > 0,
                  "length": a["lengths"][0], "truncated": a["truncated"][0]}
        if d is not None:
            record["samples_correct"] = [score(e, t) > 0 for t in d["texts"]]
        records.append(record)
    return records


def summarize(records: list, samples: int) -> dict:
    """Accuracy, format rate, response lengths (all / correct / wrong; None where there is none), pass@k, and the
    accuracy per value of each breakdown (MathVerse per problem version, MMStar per category, ...)."""
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
    breakdown = {}
    for r in records:
        for group, value in r["groups"].items():
            breakdown.setdefault(group, {}).setdefault(value, []).append(r["correct"])
    summary["breakdown"] = {group: {value: {"accuracy": mean(hits), "problems": len(hits)}
                                    for value, hits in sorted(values.items())} for group, values in breakdown.items()}
    return summary


# --------------------------------------------------------------------------------------------------------- report
def table_1(results: dict, benches: list) -> str:
    """A Markdown table shaped like the paper's Table 1: accuracy (%) per benchmark, one row per model, the paper's
    rows for reference, and the difference when there are two models."""
    rows = [["model", *(TITLES.get(b, b) for b in benches)]]
    if any(b in PAPER for b in benches):
        for i, name in enumerate(("Qwen2.5-VL-3B (paper)", "View-R1-3B, APO (paper)")):
            rows.append([name, *(f"{PAPER[b][i]:.1f}" if b in PAPER else "" for b in benches)])
    for model, by_bench in results.items():
        rows.append([model, *(f"{100 * by_bench[b]['accuracy']:.1f}" for b in benches)])
    if len(results) == 2:
        first, second = results.values()
        rows.append(["difference", *(f"{100 * (first[b]['accuracy'] - second[b]['accuracy']):+.1f}"
                                     for b in benches)])
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def details(results: dict, benches: list) -> str:
    """Per benchmark: every metric of each model, and the breakdowns."""
    fmt = lambda v: "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = []
    for b in benches:
        lines.append(f"\n{TITLES.get(b, b)}")
        first = next(iter(results.values()))[b]
        for key in (k for k in first if k != "breakdown"):
            lines.append(f"  {key:30}" + "".join(f"{fmt(r[b][key]):>12}" for r in results.values()))
        for group, values in first["breakdown"].items():
            for value in values:
                lines.append(f"  {group}={value}"[:32].ljust(32) + "".join(
                    f"{fmt(r[b]['breakdown'][group][value]['accuracy']):>12}" for r in results.values()) +
                    f"  (n={values[value]['problems']})")
    return "\n".join(lines)


def bar_chart(results: dict, benches: list, path: Path):
    """Accuracy and mean response length per benchmark (above and below), one bar per model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with plt.rc_context({"font.size": 11, "legend.fontsize": 10}):
        fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.2 * len(benches) + 1), 6.4))  # 8 in: 800 px shows it whole
        width = 0.8 / len(results)
        for ax, (key, unit) in zip(axes, (("accuracy", "accuracy"), ("mean_response_length", "tokens"))):
            for j, (model, by_bench) in enumerate(results.items()):
                bars = ax.bar([i + j * width for i in range(len(benches))],
                              [by_bench[b][key] or 0 for b in benches], width, label=model)
                ax.bar_label(bars, fmt="%.2f" if key == "accuracy" else "%.0f", fontsize=9)
            ax.set_xticks([i + width * (len(results) - 1) / 2 for i in range(len(benches))],
                          [TITLES.get(b, b) for b in benches])
            ax.set_ylabel(unit)
            ax.margins(y=0.12)  # room for the bars' labels
        axes[0].set_ylim(0, 1.1)
        axes[0].legend()
        pictures.save_figure(fig, path)


def explain_results(path: Path) -> Path:
    """RESULT.html beside an eval.py result JSON: the page of `pictures.explain` for an evaluation. Each problem of
    each benchmark with every model's response, its accuracy, format and length (✂: cut at the token limit), the
    final answer as `score` read it (explain_score, today's grader) beside the gold's reading, and why each 0 is a 0;
    filters: wrong only, cut only, the problems where models disagree, a benchmark. JSONs of earlier versions
    (without the options and precision of each problem) read letters and numbers with less."""
    import tempfile

    report = json.loads(path.read_text())
    models, benches = report["models"], report["benchmarks"]
    results = report.get("results", {})
    sampled = any("samples_correct" in r for m in models for b in benches for r in report["responses"][m][b])
    columns = [("accuracy", "acc", "accuracy: right by the benchmark's rule, 0 or 1"),
               ("format", "fmt", "the training format, 0 or 0.5"), ("length", "tokens", "response length")]
    if sampled:
        columns.insert(2, ("sampled", "sampled", "the share of --samples sampled responses that are right"))
    groups = []
    for bench in benches:
        for i, records in enumerate(zip(*(report["responses"][m][bench] for m in models))):
            first = records[0]
            example = {k: first.get(k) for k in ("answer", "kind", "choices", "precision")}
            rows = [{"label": model, "right": r["correct"], "cut": r.get("truncated"), "text": r["response"],
                     "explained": explain_score(example, r["response"]),
                     "numbers": {"accuracy": float(r["correct"]), "format": 0.5 * r["format"], "length": r["length"],
                                 "sampled": sum(r["samples_correct"]) / len(r["samples_correct"])
                                 if r.get("samples_correct") else None}}
                    for model, r in zip(models, records)]
            facts = [f"{TITLES.get(bench, bench)} problem {i}", f"kind: {first.get('kind') or 'training-format'}"]
            facts += [f"{k}: {v}" for k, v in (first.get("groups") or {}).items()]
            if first.get("choices"):
                facts.append("options: " + "; ".join(f"{chr(65 + j)}. {c}" for j, c in enumerate(first["choices"])))
            gold = " or ".join(map(str, first["answer"])) if isinstance(first["answer"], list) else first["answer"]
            groups.append({"part": bench, "chosen": None, "image": None, "problem": first["problem"], "gold": gold,
                           "facts": html.escape(", ".join(facts)), "rows": rows, "limit": 3000,
                           "flags": {"split": len({r["correct"] for r in records}) > 1}})
    figures = []
    if results:
        with tempfile.TemporaryDirectory() as tmp:
            bar_chart(results, benches, Path(tmp) / "bars.png")
            figures.append((Path(tmp) / "bars.png").read_bytes())
    limits = report.get("max_new_tokens") or {}
    tokens = html.escape(f" (at most {', '.join(f'{n} tokens on {TITLES.get(b, b)}' for b, n in limits.items())})"
                         if limits else "")
    intro = (f"<p>{html.escape(', '.join(models))} on {html.escape(', '.join(TITLES.get(b, b) for b in benches))}: "
             f"{len(groups)} problems, greedy answers{tokens}. Green: right, red: wrong (as scored then); acc: "
             "right by the benchmark's rule; fmt: the training format's reward; ✂: cut at the token limit. The "
             "final answers are read by today's grader (<code>eval.explain_score</code>). The JSON holds no images."
             "</p>")
    if results:
        intro += f"<p><code>{html.escape(table_1(results, benches))}</code></p>"  # (code: pre-wrapped, as <pre>)
    flags = (("split", "the models disagree"),) if len(models) > 1 else ()
    return pictures.render_page(path.with_suffix(".html"), str(path), intro, figures, groups, columns,
                                "benchmark", flags)


# ----------------------------------------------------------------------------------------------------------- main
RANGES = [  # this script's own flags, as flags.RANGES (--device, --dtype, --seed and --temperature: as training's)
    ("samples", lambda v: v >= 0, ">= 0 (0: none)"),
    ("max_new_tokens", lambda v: v >= 0, ">= 0 (0: the default)"),
    ("max_pixels", lambda v: v >= 0, ">= 0 (0: training's)"),
    ("batch_size", lambda v: v >= 1, ">= 1"),
    ("limit", lambda v: v >= 0, ">= 0 (0: all)"),
    ("explain_steps", lambda v: v >= 0, ">= 0 (0: all)"),
]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="toy", help="checkpoint to evaluate: Hub id, folder, or 'toy'")
    p.add_argument("--baseline", default="", help="a second model, answering the same prompts")
    p.add_argument("--bench", default="", help=f"benchmarks, comma-separated: {', '.join(BENCHMARKS)}, or 'all' "
                   "(without --bench: the training-format data of --data)")
    p.add_argument("--data", action="append", default=[], metavar="[NAME=]PATH",
                   help="with --bench: a local copy of a benchmark (a folder in the Hub layout, or parquet), "
                   "NAME=PATH for each of several; without: training-format data as apo.py --data (default geo3k)")
    p.add_argument("--split", default="test", help="split of training-format data")
    p.add_argument("--out", default="", help="result JSON (default: eval-<name>.json); a Markdown table (.md) and "
                   "a chart (.png) are written beside it")
    p.add_argument("--samples", type=int, default=0, help="k sampled responses per problem for pass@k (0: none)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of --samples")
    p.add_argument("--max-new-tokens", type=int, default=0, help="response length limit (0: 2048 for the "
                   "benchmarks, training's for training-format data)")
    p.add_argument("--max-pixels", type=int, default=0, help="image pixel budget (0: training's)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generate call")
    p.add_argument("--limit", type=int, default=0, help="evaluate the first N usable problems of each (0: all)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    p.add_argument("--plot", nargs="+", metavar="RUN|LABEL=RUN,RUN", help="draw the training curves of these run "
                   "folders into --out (a .png; the method's terms beside it, *_terms.png) instead of evaluating; "
                   "LABEL=RUN,RUN,...: seeds of one method, one colour, each thin and their mean bold")
    p.add_argument("--chance", type=float, default=None, help="with --plot: a dotted line at this accuracy "
                   "(default: the runs' own where known, 1/4 on the toys; none elsewhere)")
    p.add_argument("--explain", metavar="RUN|RESULT.json", help="instead of evaluating, a self-contained page to "
                   "audit the rewards: for a run folder, RUN/explain.html: the curves and each logged group (image, "
                   "problem, gold; each response's accuracy, format, reward, advantages, KL weight, KL, length, "
                   "final answer as the grader reads it, why a 0 is a 0); for this script's result JSON, RESULT.html: "
                   "each problem with every model's answer, read the same way. Filters in the page; 3,000 "
                   "characters a response")
    p.add_argument("--explain-steps", type=int, default=0, help="steps shown by --explain RUN, evenly spread over "
                   "the run (0: all, as many as about 40 MB of page hold)")
    a = p.parse_args(argv)
    flags.check_ranges(p, vars(a), RANGES)
    flags.check_ranges(p, {"device": a.device, "dtype": a.dtype, "seed": a.seed,
                         "temperature": a.temperature if a.samples else None})  # (unused without samples)
    if a.baseline == a.model:
        p.error("--baseline names the model itself")
    if a.explain:
        target = Path(a.explain)
        if not (target.is_file() and target.suffix == ".json" or (target / "samples.jsonl").is_file()):
            raise SystemExit(f"--explain {target}: neither a run folder (samples.jsonl) nor a result JSON")
        print(f"wrote {explain_results(target) if target.is_file() else pictures.explain(target, a.explain_steps)}")
        return
    if a.plot:
        arms = [(arm.split("=", 1)[0], arm.split("=", 1)[1].split(",")) if "=" in arm else arm for arm in a.plot]
        for run in (r for arm in arms for r in (arm[1] if isinstance(arm, tuple) else [arm])):
            if not (Path(run) / "metrics.jsonl").is_file():
                raise SystemExit(f"--plot {run}: not a run folder (no metrics.jsonl in it)")
        out = Path(a.out or "curves.png")
        out.parent.mkdir(parents=True, exist_ok=True)
        pictures.plot_curves(arms, out, chance=a.chance)
        print(f"wrote {out} and {pictures.terms_path(out)}")
        return

    benches = [b for b in a.bench.split(",") if b] if a.bench != "all" else list(BENCHMARKS)
    unknown = sorted(set(benches) - set(BENCHMARKS))
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}: choose from {', '.join(BENCHMARKS)} or all")
    sources = dict(d.split("=", 1) if "=" in d and d.split("=", 1)[0] in BENCHMARKS else ("", d) for d in a.data)
    if not benches:  # training-format data: one 'benchmark' named after it
        if len(a.data) > 1:
            p.error("without --bench, --data names one data set")
        benches = [sources.get("", "geo3k")]
        sources = {benches[0]: benches[0]}
    elif "" in sources:
        if len(benches) > 1:
            p.error("with several benchmarks, name each local copy: --data NAME=PATH")
        sources = {benches[0]: sources[""]}

    # The data settings (pixel budget, response length) are training's: apo.Args, with the toy preset
    # applied for toy data. (Imported here: apo.py imports this file for its held-out evaluations.)
    import apo

    toy = benches == ["toy"]
    cfg = apo.Args(**{**(apo.PRESETS["toy"] if toy else {}), "model": a.model, "data": benches[0], "split": a.split,
                      "seed": a.seed, "device": a.device, "dtype": a.dtype, "temperature": a.temperature})
    cfg.max_pixels = a.max_pixels or cfg.max_pixels
    tokens = {b: a.max_new_tokens or (2048 if b in PAPER else cfg.max_new_tokens) for b in benches}
    names = [a.model] + ([a.baseline] if a.baseline else [])
    for name in [m for m in names if m != "toy"]:  # one not found stops now, not after the first one's answers
        models.model_config(name, cfg.trust_remote_code)
    device, dtype = models.resolve_device(cfg.device, cfg.dtype, cfg.model, cfg.data)
    examples = {b: load_examples(b, sources.get(b, ""), a.split, a.limit) for b in benches}

    results, responses = {}, {}
    for name in names:
        torch.manual_seed(a.seed)
        model, processor = models.load_model(name, dtype, device, cfg.trust_remote_code)
        results[name], responses[name] = {}, {}
        for b in benches:
            records = evaluate(model, processor, examples[b][0], dataclasses.replace(cfg, max_new_tokens=tokens[b]),
                               a.samples, a.batch_size, progress=f"{name} {b}")
            results[name][b], responses[name][b] = summarize(records, a.samples), records
        del model
    table = table_1(results, benches)
    print(details(results, benches) + "\n\n" + table)

    out = Path(a.out or f"eval-{Path(benches[0]).stem if len(benches) == 1 else 'bench'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"models": list(results), "benchmarks": benches, "max_new_tokens": tokens,
              "max_pixels": cfg.max_pixels, "skipped_rows": {b: examples[b][1] for b in benches},
              "paper": {b: PAPER[b] for b in benches if b in PAPER}, "results": results, "responses": responses}
    out.write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text(table + "\n")
    bar_chart(results, benches, out.with_suffix(".png"))
    print(f"wrote {out}, {out.with_suffix('.md')} and {out.with_suffix('.png')}")
    return report


if __name__ == "__main__":
    main()
