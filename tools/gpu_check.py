"""Everything a GPU session measures, in one call of at most ~8 minutes: the 3B step's memory and speed against
the plan, the layouts and caches side by side, LoRA's 24 GB plan, and real apo.py steps on CUDA.

On the GPU machine (docs/PERF.md; ../shared/DEVICE.md says how the wheels travel):

    python3 -m pip install -q --no-index --no-deps --target .site .whl/*.whl && export PYTHONPATH=$PWD/.site
    python3 tools/gpu_check.py --out $OUT            # writes $OUT/*.json, $OUT/*.log and $OUT/summary.json

Here, on the CPU, the same sequence at the tiny config (what the tests run):

    python tools/gpu_check.py --cpu --out /tmp/gpu_check

Each check is a subprocess with a time limit of its own, so that one that fails or hangs costs its share and the
others still run; summary.json says, per check, its status, seconds and main figures.
"""
import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def checks(cpu: bool, work: Path) -> list:
    """(name, argv, seconds allowed). GPU: Qwen2.5-VL-3B's shapes at the defaults, then variants at 256 new tokens
    (a random model rarely ends a response: every one runs to the limit); CPU: the tiny config, a few tokens."""
    bench = [sys.executable, "tools/bench.py", "--steps", "2"]
    if cpu:
        size = ["--config", "tiny", "--device", "cpu", "--threads", "1", "--prompts-per-step", "2",
                "--group-size", "4", "--max-new-tokens", "6", "--mini-batch-size", "4", "--micro-batch-size", "2"]
        short = []
    else:
        config = [f"--config-file={REPO / '.device' / 'qwen2_5_vl_3b_config.json'}"] \
            if (REPO / ".device" / "qwen2_5_vl_3b_config.json").exists() else []
        size, short = ["--config", "3b", "--device", "cuda", *config], ["--max-new-tokens", "256"]
    # 2 steps, then final/ (weights, and the trainer state with the Adam moments: 35 GB for 3B; one save only, for
    # the disk)
    run = [sys.executable, "apo.py", "--model", str(work / "model"), "--data", str(work / "data"), "--steps", "2",
           "--save-every", "1000", "--eval-every", "2", "--eval-limit", "4", "--prompts-per-step", "4",
           "--group-size", "4", "--mini-batch-size", "8", "--max-new-tokens", "6" if cpu else "128",
           *(["--device", "cpu", "--micro-batch-size", "2"] if cpu else [])]
    return [
        ("plan_3b", [sys.executable, "tools/bench.py", "--config", "3b", "--dry-run"], 120),
        ("bench", bench + size, 200),                                       # the defaults, the shared layout
        ("bench_unshared", bench + size + short + ["--no-share-prompt"], 90),
        ("bench_shared_short", bench + size + short, 90),                    # the pair of the line above
        ("bench_static_cache", bench + size + short + ["--cache-implementation", "static"], 120),
        ("bench_lora", bench + size + short + ["--lora-rank", "16", "--generation-batch-size", "64"], 90),
        ("plan_lora", [sys.executable, "tools/bench.py", "--config", "3b", "--dry-run", "--lora-rank", "16",
                       "--generation-batch-size", "64"], 60),
        ("apo_full", run + ["--out", str(work / "run_full")], 150),           # the code a user runs, saves included
        ("apo_lora", run + ["--lora-rank", "16", "--out", str(work / "run_lora")], 120),
    ]


def make_run_inputs(work: Path, cpu: bool):
    """A random-weight model folder of the real architecture (3B's config with the toy tokenizer's special-token
    ids, or the tiny one) and geometry3k-sized synthetic data in the Hub layout (train, test), for apo.py."""
    import datasets
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    sys.path.insert(0, str(REPO))
    from plumbing import toy
    from tools import bench

    processor = toy.build_processor(min_pixels=3136, max_pixels=401408)
    if cpu:
        toy.build_model_folder(work / "model")
    else:
        config_file = REPO / ".device" / "qwen2_5_vl_3b_config.json"
        a = argparse.Namespace(config="3b", config_file=str(config_file) if config_file.exists() else None)
        with torch.device("cuda"):
            model = Qwen2_5_VLForConditionalGeneration._from_config(bench.load_config(a, processor.tokenizer),
                                                                     dtype=torch.bfloat16)
        model.save_pretrained(work / "model")
        processor.save_pretrained(work / "model")
        del model
    features = datasets.Features({"images": datasets.Sequence(datasets.Image()), "problem": datasets.Value("string"),
                                  "answer": datasets.Value("string")})
    (work / "data" / "data").mkdir(parents=True, exist_ok=True)
    size = (56, 56) if cpu else bench.IMAGE_SIZE["3b"]
    for split, n in (("train", 16), ("test", 4)):
        rows = []
        for e in bench.synthetic_examples(n, size, seed=len(split)):
            buffer = io.BytesIO()
            e["images"][0].save(buffer, format="PNG")
            rows.append({"images": [{"bytes": buffer.getvalue(), "path": None}], "problem": e["problem"],
                         "answer": e["answer"]})
        datasets.Dataset.from_list(rows, features=features).to_parquet(
            str(work / "data" / "data" / f"{split}-00000-of-00001.parquet"))


def headline(name: str, result: dict) -> dict:
    """The figures of a check that summary.json shows."""
    if name.startswith("plan"):
        return {"peak_memory_gib": result["peak_memory_gib"], "longest_prompt_gib":
                result["longest_prompt"]["peak_memory_gib"]}
    keys = ("step_seconds", "seconds", "peak_memory_gib", "peak_memory_gib_by_phase", "peak_reserved_gib",
            "decode_ms_per_token_step", "decode_floor_ms", "rollout_tokens_per_s", "train_tokens_per_s", "mfu",
            "tokens_per_pass")
    return {k: result.get(k) for k in keys} | {"plan_gib": (result.get("memory_plan") or {}).get("peak_memory_gib")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for every result")
    p.add_argument("--cpu", action="store_true", help="the tiny config on the CPU (the tests)")
    p.add_argument("--only", nargs="+", help="these checks only")
    p.add_argument("--work", default="", help="folder for the model and data it makes (default: a temporary one, "
                   "outside --out: a 3B run's final/ is 35 GB)")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(a.work or tempfile.mkdtemp(prefix="gpu_check_"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    summary = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "cpu": a.cpu, "checks": {}}
    try:
        import torch
        import transformers
        summary["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                               "cuda": torch.version.cuda,
                               "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    except Exception as err:  # noqa: BLE001 (a broken environment is itself the finding)
        summary["versions"] = repr(err)
    start = time.perf_counter()
    try:
        make_run_inputs(work, a.cpu)
        summary["run_inputs_seconds"] = round(time.perf_counter() - start, 1)
    except Exception as err:  # noqa: BLE001
        summary["run_inputs"] = repr(err)
    for name, argv_, limit in checks(a.cpu, work):
        if a.only and name not in a.only:
            continue
        result_file, t = out / f"{name}.json", time.perf_counter()
        if "tools/bench.py" in argv_:
            argv_ = argv_ + ["--out", str(result_file)]
        try:
            done = subprocess.run(argv_, cwd=REPO, env=env, timeout=limit, capture_output=True, text=True)
            status = "ok" if done.returncode == 0 else f"exit {done.returncode}"
            log = done.stdout + done.stderr
        except subprocess.TimeoutExpired as err:
            status, log = f"timed out after {limit} s", (err.stdout or b"").decode(errors="replace") + \
                (err.stderr or b"").decode(errors="replace")
        (out / f"{name}.log").write_text(log)
        entry = {"status": status, "wall_seconds": round(time.perf_counter() - t, 1)}
        if status == "ok" and result_file.exists():
            entry.update(headline(name, json.loads(result_file.read_text())))
        elif status == "ok" and name.startswith("apo"):
            run = work / ("run_full" if name == "apo_full" else "run_lora")
            entry["metrics"] = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            entry["final_saved"] = (run / "final" / "config.json").exists()
        else:
            entry["log_tail"] = log[-2000:]
        summary["checks"][name] = entry
        print(name, json.dumps(entry)[:300], flush=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    summary["seconds"] = round(time.perf_counter() - start, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


if __name__ == "__main__":
    main()
