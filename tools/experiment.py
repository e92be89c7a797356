"""What each APO term changes, on the graded toy: the sweep registered in docs/EXPERIMENT.md, and its report.

    python tools/experiment.py                 # every arm × 10 seeds, two runs at a time; a finished run is skipped
    python tools/experiment.py --quick         # a first look: GRPO, DADS, STCR, APO × 3 seeds
    python tools/experiment.py --report        # docs/experiment/summary.md and its figures, from the runs' files
    python tools/experiment.py --reproduce dads-seed3   # reruns a kept run's command; its evaluations must be equal

Each run is `python apo.py --data toy-graded --seed N --out runs/experiment/ARM-seedN` plus its arm's flags
(ARMS). Its numbers are kept in docs/experiment/runs/ARM-seedN.json: the arm, the seed, the command (apo.py's
argument list), its held-out evaluations as eval.jsonl writes them (`eval`) and the per-step metrics the analysis
reads (`metrics`). The report is computed from those files alone: paired differences with GRPO, seed by seed,
with 95% intervals (t) and a sign-flip test.
"""
import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import product
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNS, OUT = REPO / "runs" / "experiment", REPO / "docs" / "experiment"   # the run folders; what is committed
KEPT = OUT / "runs"
BASE = ["--data", "toy-graded"]  # every run's flags before its arm's: the preset (a test shrinks it)
BETA = 0.1              # β tuned on GRPO alone (docs/EXPERIMENT.md, "Tuning"): the preset's
STRONG_STCR = "1.02"    # w = 0.13 at one extra check line (7 tokens), 0.43 at four
ARMS = {  # name -> apo.py flags beyond the toy-graded preset
    "grpo": ["--no-dads", "--no-stcr"],
    "dads": ["--no-stcr"],
    "stcr": ["--no-dads"],
    "apo": [],
    "grpo-beta0": ["--no-dads", "--no-stcr", "--kl-beta", "0"],
    "dads-beta0": ["--no-stcr", "--kl-beta", "0"],
    "grpo-beta4x": ["--no-dads", "--no-stcr", "--kl-beta", str(4 * BETA)],
    "dads-beta4x": ["--no-stcr", "--kl-beta", str(4 * BETA)],
    "stcr-strong": ["--no-dads", "--stcr-base", STRONG_STCR],
    "grpo-seq": ["--no-dads", "--no-stcr", "--loss-agg", "sequence"],
    "stcr-strong-seq": ["--no-dads", "--stcr-base", STRONG_STCR, "--loss-agg", "sequence"],
}
QUICK = ["grpo", "dads", "stcr", "apo"]
# each arm against its baseline: the same seeds, one term (or dose) changed
PAIRS = [("dads", "grpo"), ("stcr", "grpo"), ("apo", "grpo"), ("dads-beta0", "grpo-beta0"),
         ("dads-beta4x", "grpo-beta4x"), ("stcr-strong", "grpo"), ("stcr-strong-seq", "grpo-seq")]
# not registered before the sweep (docs/EXPERIMENT.md §6 says so): what β itself and the sequence mean change
EXPLORATORY = [("grpo", "grpo-beta0"), ("grpo-beta4x", "grpo"), ("grpo-seq", "grpo")]
METRICS = ["kl_correct_hard", "dads_weight_correct_mean", "response_length_correct", "response_length_wrong",
           "entropy", "kl", "accuracy", "stcr_mult_neg_mean"]


def read_jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


def versions() -> dict:
    """The software a run's numbers depend on: under other versions of torch or transformers a rerun
    may differ (docs/EXPERIMENT.md §6: a sweep rerun in a fresh environment did)."""
    import platform

    import torch
    import transformers
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__}


def command(arm: str, seed: int) -> list:
    out = RUNS / f"{arm}-seed{seed}"
    out = out.relative_to(REPO) if out.is_relative_to(REPO) else out
    return ["apo.py", *BASE, "--seed", str(seed), "--out", str(out), *ARMS[arm]]


def run(arm: str, seed: int) -> str:
    """One run, unless its numbers are kept already; then its compact file."""
    kept = KEPT / f"{arm}-seed{seed}.json"
    if kept.exists():
        return f"{arm} seed {seed}: kept already"
    out, log = RUNS / f"{arm}-seed{seed}", RUNS / f"{arm}-seed{seed}.log"
    start = time.perf_counter()
    if not (out / "final").exists():
        shutil.rmtree(out, ignore_errors=True)  # a run killed before its end starts again
        with open(log, "w") as f:
            done = subprocess.run([sys.executable, *command(arm, seed)], cwd=REPO, stdout=f,
                                  stderr=subprocess.STDOUT, env=dict(os.environ, HF_HUB_OFFLINE="1"))
        if done.returncode:
            return f"{arm} seed {seed}: FAILED (see {log})"
    KEPT.mkdir(parents=True, exist_ok=True)
    kept.write_text(json.dumps({
        "arm": arm, "seed": seed, "command": command(arm, seed), "seconds": round(time.perf_counter() - start, 1),
        "versions": versions(),
        "eval": read_jsonl(out / "eval.jsonl"),
        "metrics": [{"step": m["step"], **{k: m[k] for k in METRICS}}
                    for m in read_jsonl(out / "metrics.jsonl")]}) + "\n")
    return f"{arm} seed {seed}: {time.perf_counter() - start:.0f} s"


# ------------------------------------------------------------------------------------------------------ report
def t95(n: int) -> float:
    """The two-sided 95% quantile of Student's t with n − 1 degrees of freedom (a table: no scipy needed)."""
    table = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262, 11: 2.228,
             12: 2.201, 13: 2.179, 14: 2.160, 15: 2.145, 16: 2.131, 20: 2.093, 30: 2.045}
    return table.get(n, 1.96 if n > 30 else table[max(k for k in table if k <= n)])


def paired(diffs: list) -> dict:
    """Mean of paired differences, its 95% interval, and the two-sided sign-flip p-value (exact)."""
    n = len(diffs)
    mean = statistics.fmean(diffs)
    half = t95(n) * statistics.stdev(diffs) / math.sqrt(n) if n > 1 else math.nan
    flips = [sum(d if (mask >> i) & 1 else -d for i, d in enumerate(diffs)) for mask in range(2 ** n)]
    p = sum(abs(f) >= abs(sum(diffs)) - 1e-12 for f in flips) / len(flips)
    return {"n": n, "mean": mean, "low": mean - half, "high": mean + half, "p": p}


def outcomes(r: dict) -> dict:
    """A run's numbers, registered in docs/EXPERIMENT.md: held-out accuracy at the end and its area under the curve
    (the mean over the evaluations), on each level; the mechanism metrics averaged over the run's steps (those
    where they have a value: kl_correct_hard needs a hard group)."""
    ev, m = r["eval"], r["metrics"]
    mean_of = lambda k: statistics.fmean(x[k] for x in m if x[k] is not None) if any(  # noqa: E731
        x[k] is not None for x in m) else None
    out = {}
    for level in ("", "_easy", "_hard", "_old"):
        out[f"final_accuracy{level}"] = ev[-1][f"accuracy{level}"]
        out[f"auc_accuracy{level}"] = statistics.fmean(e[f"accuracy{level}"] for e in ev)
    for k in METRICS:
        out[k] = mean_of(k)
    hard = [e for e in ev if e["accuracy_hard"] >= 0.5]
    out["steps_to_hard_0.5"] = hard[0]["step"] if hard else ev[-1]["step"] + ev[-1]["step"] - ev[-2]["step"]
    return out


def report():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {}
    for path in sorted(KEPT.glob("*.json")):
        r = json.loads(path.read_text())
        runs[r["arm"], r["seed"]] = r
    arms = [a for a in ARMS if any(k[0] == a for k in runs)]
    table = {(a, s): outcomes(r) for (a, s), r in runs.items()}
    groups = {"mechanism": ["dads_weight_correct_mean", "kl_correct_hard", "response_length_wrong",
                            "response_length_correct", "entropy"],
              "outcome": ["final_accuracy_hard", "auc_accuracy_hard", "steps_to_hard_0.5", "final_accuracy_easy",
                          "final_accuracy_old", "auc_accuracy_old"]}
    fmt = lambda x: "–" if x is None else f"{x:.3g}"  # noqa: E731
    lines = ["# The experiment's results", "", "Computed by `python tools/experiment.py --report` from "
             f"`docs/experiment/runs/` ({len(runs)} runs); docs/EXPERIMENT.md defines each number.", ""]
    results = {}
    for group, keys in groups.items():
        lines += [f"## {group.capitalize()}: mean per arm", "", "| arm | seeds | " + " | ".join(keys) + " |",
                  "|---|---|" + "---|" * len(keys)]
        for a in arms:
            rows = [v for (arm, _), v in table.items() if arm == a]
            mean = lambda k: statistics.fmean(v[k] for v in rows if v[k] is not None) if any(  # noqa: E731
                v[k] is not None for v in rows) else None
            lines.append(f"| {a} | {len(rows)} | " + " | ".join(fmt(mean(k)) for k in keys) + " |")
        lines += ["", f"## {group.capitalize()}: paired differences, arm − baseline, seed by seed: mean "
                  "[95% interval], sign-flip p", "", "| pair | " + " | ".join(keys) + " |",
                  "|---|" + "---|" * len(keys)]
        for a, b in PAIRS + EXPLORATORY:
            seeds = sorted(s for (arm, s) in table if arm == a and (b, s) in table)
            if len(seeds) < 2:
                continue
            cells = []
            for k in keys:
                diffs = [table[a, s][k] - table[b, s][k] for s in seeds
                         if table[a, s][k] is not None and table[b, s][k] is not None]
                if len(diffs) < 2:
                    cells.append("–")
                    continue
                d = results.setdefault(f"{a} − {b}", {})[k] = paired(diffs)
                cells.append(f"{d['mean']:+.3g} [{d['low']:+.2g}, {d['high']:+.2g}], p {d['p']:.2g}")
            label = f"{a} − {b} (n = {len(seeds)}{', exploratory' if (a, b) in EXPLORATORY else ''})"
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    out = OUT
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps({"per_run": {f"{a}-seed{s}": v for (a, s), v in table.items()},
                                                  "paired": results}, indent=1) + "\n")
    # Figures: held-out accuracy on hard items and the mechanism metrics over training, every seed faint, the
    # mean bold; one panel per quantity, four arms.
    plt.rcParams.update({"font.size": 11})
    colours = {"grpo": "#444444", "dads": "#1f77b4", "stcr": "#2ca02c", "apo": "#d62728"}
    panels = [("eval", "accuracy_hard", "held-out accuracy, hard items"),
              ("eval", "accuracy_old", "held-out accuracy, old skill"),
              ("metrics", "kl_correct_hard", "KL to reference, right answers of hard groups"),
              ("metrics", "response_length_wrong", "length of wrong responses (tokens)")]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))
    for ax, (log, key, title) in zip(axes.flat, panels):
        for arm, colour in colours.items():
            curves = [[(x["step"], x[key]) for x in r[log] if x[key] is not None]
                      for (a, _), r in runs.items() if a == arm]
            curves = [c for c in curves if c]
            if not curves:
                continue
            for c in curves:
                ax.plot(*zip(*c), color=colour, alpha=0.15, linewidth=0.8)
            steps = [s for s, _ in curves[0]]
            mean = [statistics.fmean(dict(c).get(s, math.nan) for c in curves) for s in steps]
            ax.plot(steps, mean, color=colour, linewidth=2, label=f"{arm} ({len(curves)} seeds)")
        if key.startswith("accuracy"):
            ax.axhline(0.25, color="grey", linestyle=":", linewidth=1, label="chance")
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:  # (a panel with no values yet has nothing to name)
            ax.legend(fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)
    plt.close(fig)
    print("\n".join(lines))


def reproduce(name: str) -> int:
    """Reruns a kept run's own `command` (its --out moved to RUNS/reproduce-NAME) and compares its held-out
    evaluations with the committed ones, every value but the seconds: 0 if equal, 1 (and what differs) if not.
    The toy runs on one thread whatever the machine (plumbing/models.py), so the thread count cannot change them;
    other versions of torch or transformers may (the kept file's `versions` says which it was made with)."""
    kept = json.loads((KEPT / f"{name}.json").read_text())
    command = list(kept["command"])
    out = RUNS / f"reproduce-{name}"
    shutil.rmtree(out, ignore_errors=True)
    command[command.index("--out") + 1] = str(out)
    done = subprocess.run([sys.executable, *command], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if done.returncode:
        sys.exit(f"{name}: the run failed:\n{done.stderr[-2000:]}")
    got = read_jsonl(out / "eval.jsonl")
    if kept.get("versions", versions()) != versions():
        print(f"{name}: kept under {kept['versions']}, rerun under {versions()}: equal numbers are "
              "not to be expected")
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    for new, old in zip(strip(got), strip(kept["eval"])):
        if new != old:
            print(f"{name}: differs at step {old['step']}: " + ", ".join(
                f"{k} {old[k]} -> {new.get(k)}" for k in old if new.get(k) != old[k]))
            return 1
    if len(got) != len(kept["eval"]):
        print(f"{name}: {len(got)} evaluations, {len(kept['eval'])} kept")
        return 1
    print(f"{name}: reproduced, {len(got)} evaluations equal to the committed ones")
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (each uses one thread)")
    p.add_argument("--quick", action="store_true", help="GRPO, DADS, STCR, APO × 3 seeds")
    p.add_argument("--arms", nargs="+", choices=list(ARMS), help="these arms only")
    p.add_argument("--report", action="store_true", help="the summary and figures from the kept runs")
    p.add_argument("--reproduce", metavar="ARM-seedN", help="rerun a kept run and compare its evaluations")
    a = p.parse_args(argv)
    if a.report:
        return report()
    if a.reproduce:
        if not (KEPT / f"{a.reproduce}.json").exists():
            sys.exit(f"--reproduce: no kept run {a.reproduce} in {KEPT}")
        sys.exit(reproduce(a.reproduce))
    arms, seeds = (QUICK, 3) if a.quick else (a.arms or list(ARMS), a.seeds)
    RUNS.mkdir(parents=True, exist_ok=True)
    if "--model" not in BASE:  # the preset's starting model, built once, before two runs would build it at once
        subprocess.run([sys.executable, "-c", "from plumbing import toy; toy.starting_model('toy-graded')"],
                       cwd=REPO, check=True)
    start = time.perf_counter()
    with ThreadPoolExecutor(a.jobs) as pool:  # seed-major: the first seeds of every arm finish first
        for line in pool.map(lambda job: run(*job), [(arm, s) for s, arm in product(range(seeds), arms)]):
            print(line, flush=True)
    print(f"sweep: {time.perf_counter() - start:.0f} s")
    report()


if __name__ == "__main__":
    main()
