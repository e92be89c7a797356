"""tools/gpu_check.py, the script a GPU session runs, in its CPU mode: every check runs and reports."""
import json
import sys

import pytest

from conftest import REPO, Processes


@pytest.mark.slow
def test_gpu_check_runs_every_check_on_the_cpu(tmp_path):
    """The same sequence as on a GPU at the tiny config: the plans, apo_step timed in both layouts, with a static
    cache and with LoRA, and two real apo.py runs (all parameters and LoRA) that save their final/."""
    out = Processes([sys.executable, str(REPO / "tools" / "gpu_check.py"), "--cpu", "--out", str(tmp_path / "out"),
                     "--work", str(tmp_path / "work")]).finish()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert set(summary["checks"]) == {"plan_3b", "bench", "bench_unshared", "bench_shared_short",
                                      "bench_static_cache", "bench_lora", "plan_lora", "apo_full", "apo_lora"}, out
    for name, check in summary["checks"].items():
        assert check["status"] == "ok", (name, check.get("log_tail"))
    assert summary["checks"]["bench"]["tokens_per_pass"]["rows"] < summary["checks"]["bench_unshared"][
        "tokens_per_pass"]["rows"]
    assert summary["checks"]["apo_full"]["final_saved"] and len(summary["checks"]["apo_lora"]["metrics"]) == 2
    assert summary["checks"]["plan_lora"]["peak_memory_gib"] < 22 < summary["checks"]["plan_3b"]["peak_memory_gib"]
