"""tools/experiment.py end to end on a tiny sweep (2 arms × 2 seeds, 2 steps each): the kept files hold each run's
command and evaluations, the summary is computed from those files (checked against the run folders' own
eval.jsonl and paired differences worked out here), a finished run is skipped, and a kept run reproduces; and the
committed sweep: a kept file per arm and seed, and the committed summary computed from them."""
import json
import math
import statistics

import pytest
import torch

from conftest import read_jsonl

slow = pytest.mark.slow  # whole runs in processes of their own: the full suite only


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    from plumbing import toy
    from tools import experiment
    toy.starting_model()  # built once, before two runs would build it at once
    root = tmp_path_factory.mktemp("experiment")
    # held out: 8 problems of each level (the split is ordered by level, 100 easy, 100 hard, 40 old: a limit
    # would keep easy ones only), a tenth of the evaluation's time
    test = toy.toy_dataset("test", task="toy-graded")
    levels = test["level"]
    held_out = root / "held_out.parquet"
    rows = [i for level in ("easy", "hard", "old") for i in [j for j, v in enumerate(levels) if v == level][:8]]
    test.select(rows).to_parquet(str(held_out))
    patch = pytest.MonkeyPatch()
    patch.setattr(experiment, "RUNS", root / "runs")
    patch.setattr(experiment, "OUT", root / "docs")
    patch.setattr(experiment, "KEPT", root / "docs" / "runs")
    patch.setattr(experiment, "BASE", ["--model", "toy", "--data", "toy-graded", "--steps", "2", "--eval-every", "1",
                                       "--prompts-per-step", "2", "--group-size", "4", "--mini-batch-size", "8",
                                       "--micro-batch-size", "8", "--max-new-tokens", "24", "--save-every", "1000",
                                       "--eval-data", str(held_out)])
    (root / "docs").mkdir()
    experiment.main(["--arms", "grpo", "apo", "--seeds", "2"])
    yield experiment, root
    patch.undo()


@slow
def test_kept_files_hold_each_run_s_command_and_evaluations(sweep):
    experiment, root = sweep
    kept = sorted(p.name for p in (root / "docs" / "runs").glob("*.json"))
    assert kept == ["apo-seed0.json", "apo-seed1.json", "grpo-seed0.json", "grpo-seed1.json"]
    for arm, seed in [("grpo", 0), ("grpo", 1), ("apo", 0), ("apo", 1)]:
        run = json.loads((root / "docs" / "runs" / f"{arm}-seed{seed}.json").read_text())
        out = root / "runs" / f"{arm}-seed{seed}"
        assert (run["arm"], run["seed"]) == (arm, seed)
        assert run["command"][run["command"].index("--out") + 1] == str(out)
        assert run["command"][run["command"].index("--seed") + 1] == str(seed)
        assert ("--no-dads" in run["command"]) == (arm == "grpo")
        assert run["eval"] == read_jsonl(out / "eval.jsonl")
        assert run["versions"] == experiment.versions() and run["versions"]["torch"] == torch.__version__
        assert [e["step"] for e in run["eval"]] == [0, 1, 2]
        assert [m["step"] for m in run["metrics"]] == [0, 1]
    # both arms start from the same model: the same evaluation at step 0, then their own
    grpo, apo = (json.loads((root / "docs" / "runs" / f"{a}-seed0.json").read_text()) for a in ("grpo", "apo"))
    assert grpo["eval"][0]["accuracy"] == apo["eval"][0]["accuracy"]


@slow
def test_the_summary_is_computed_from_the_run_files(sweep):
    _, root = sweep
    summary = json.loads((root / "docs" / "summary.json").read_text())
    finals = {}
    for arm in ("grpo", "apo"):
        for seed in (0, 1):
            ev = read_jsonl(root / "runs" / f"{arm}-seed{seed}" / "eval.jsonl")
            got = summary["per_run"][f"{arm}-seed{seed}"]
            assert got["final_accuracy_hard"] == ev[-1]["accuracy_hard"]
            assert got["auc_accuracy_old"] == pytest.approx(sum(e["accuracy_old"] for e in ev) / 3)
            metrics = read_jsonl(root / "runs" / f"{arm}-seed{seed}" / "metrics.jsonl")
            assert got["entropy"] == pytest.approx((metrics[0]["entropy"] + metrics[1]["entropy"]) / 2)
            finals[arm, seed] = ev[-1]["accuracy_easy"]
    # the paired difference, worked out here: two seeds, t(1) = 12.706, sign-flip over the 4 sign patterns
    diffs = [finals["apo", s] - finals["grpo", s] for s in (0, 1)]
    d = summary["paired"]["apo − grpo"]["final_accuracy_easy"]
    assert d["n"] == 2 and d["mean"] == pytest.approx((diffs[0] + diffs[1]) / 2)
    if diffs[0] != diffs[1]:
        half = 12.706 * statistics.stdev(diffs) / math.sqrt(2)
        assert (d["low"], d["high"]) == pytest.approx((d["mean"] - half, d["mean"] + half))
    total = abs(diffs[0] + diffs[1])
    flips = [abs(a * diffs[0] + b * diffs[1]) for a in (1, -1) for b in (1, -1)]
    assert d["p"] == sum(f >= total - 1e-12 for f in flips) / 4
    table = (root / "docs" / "summary.md").read_text()
    assert "from `docs/experiment/runs/` (4 runs)" in table and "| apo − grpo (n = 2) |" in table
    assert (root / "docs" / "curves.png").stat().st_size > 10_000


@slow
def test_a_finished_run_is_skipped_and_a_kept_run_reproduces(sweep, capsys):
    experiment, root = sweep
    before = (root / "docs" / "runs" / "apo-seed1.json").read_text()
    assert experiment.run("apo", 1) == "apo seed 1: kept already"
    assert (root / "docs" / "runs" / "apo-seed1.json").read_text() == before
    with pytest.raises(SystemExit) as done:
        experiment.main(["--reproduce", "apo-seed1"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "apo-seed1: reproduced, 3 evaluations equal to the committed ones" in out and "kept under" not in out
    # a kept file whose numbers were changed by hand is caught
    kept = json.loads(before)
    kept["eval"][2]["accuracy"] += 0.5
    kept["versions"]["torch"] = "1.0"
    (root / "docs" / "runs" / "apo-seed1.json").write_text(json.dumps(kept))
    with pytest.raises(SystemExit) as done:
        experiment.main(["--reproduce", "apo-seed1"])
    out = capsys.readouterr().out
    assert done.value.code == 1 and "differs at step 2: accuracy" in out
    assert "kept under {'python'" in out and "'torch': '1.0'" in out  # and says under what it was kept
    with pytest.raises(SystemExit, match="--reproduce: no kept run apo-seed7"):
        experiment.main(["--reproduce", "apo-seed7"])


def test_the_committed_summary_is_computed_from_the_committed_runs(tmp_path):
    """docs/experiment holds a kept file for every arm and seed of the sweep, and its summary is what --report
    computes from them (a summary whose runs were not committed, or were changed after it, fails here)."""
    import shutil

    from tools import experiment
    committed = experiment.REPO / "docs" / "experiment"  # (not experiment.OUT: the sweep fixture may patch it)
    kept = sorted(p.stem for p in (committed / "runs").glob("*.json"))
    assert kept == sorted(f"{a}-seed{s}" for a in experiment.ARMS for s in range(10))
    stacks = {json.dumps(json.loads(p.read_text())["versions"]) for p in (committed / "runs").glob("*.json")}
    assert len(stacks) == 1  # the whole sweep under one python, torch and transformers
    shutil.copytree(committed / "runs", tmp_path / "runs")
    patch = pytest.MonkeyPatch()
    patch.setattr(experiment, "KEPT", tmp_path / "runs")
    patch.setattr(experiment, "OUT", tmp_path)
    try:
        experiment.report()
    finally:
        patch.undo()
    for name in ("summary.json", "summary.md"):
        assert (tmp_path / name).read_text() == (committed / name).read_text(), name
