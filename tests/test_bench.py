"""tools/bench.py: the memory plan of Qwen2.5-VL-3B from its shapes (full parameters and LoRA, against the published
parameter count and peft's own count), and a real apo_step timed on the tiny model."""
import json

import pytest

import torch

from plumbing import models


def test_bench_dry_run_plan(tmp_path):
    """The plan counts Qwen2.5-VL-3B's parameters on the meta device (3,754,622,976, the published count) and adds
    up its components as written: moments 8 bytes per weight, KV cache 2 (K, V) · 2 kv heads · 128 · 2 bytes ·
    36 layers per token of each of the 128 sequences."""
    from tools import bench
    out = tmp_path / "plan.json"
    bench.main(["--config", "3b", "--dry-run", "--out", str(out)])
    plan = json.loads(out.read_text())
    N, GiB = 3_754_622_976, 2 ** 30
    assert plan["parameters"] == N
    assert plan["components_gib"]["adam_moments"] == round(8 * N / GiB, 2)
    tokens = plan["assumptions"]["prompt_tokens"] + 1024
    assert plan["components_gib"]["kv_cache"] == round(128 * tokens * 36 * 2 * 2 * 128 * 2 / GiB, 2)
    assert plan["peak_memory_gib"] == max(plan["phases_gib"].values())
    assert plan["phases_gib"]["optimizer"] >= round(14 * N / GiB, 2)  # weights ×2, moments, gradients: 14 B each

    with pytest.raises(SystemExit, match="config.json"):
        bench.main(["--config", "3b", "--dry-run", "--config-file", str(tmp_path / "missing.json"), "--out",
                    str(tmp_path / "x.json")])


def test_bench_dry_run_lora_plan(tmp_path):
    """--lora-rank 16 on Qwen2.5-VL-3B: the plan counts r·(in + out) per adapted layer from the config, and peft,
    wrapping the model built on the meta device, counts as many trainable parameters (29,933,568); no reference copy;
    fp32 adapters, gradients and Adam moments (16 bytes each) for them alone; at --generation-batch-size 64 even
    the longest admissible prompt fits 22 GiB (README, 'Smaller GPUs'). The vision tower's adapters (--lora-vision),
    counted on the tiny config, agree with peft's too."""
    import apo
    from tools import bench

    from peft import get_peft_model
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    out = tmp_path / "plan.json"
    bench.main(["--config", "3b", "--dry-run", "--lora-rank", "16", "--generation-batch-size", "64", "--out", str(out)])
    plan = json.loads(out.read_text())
    N, n, GiB = 3_754_622_976, 29_933_568, 2 ** 30
    H, I, kv, L = 2048, 11008, 256, 36
    assert n == 16 * L * ((H + H) + 2 * (H + kv) + (H + H) + 2 * (H + I) + (I + H))  # q, k and v, o, gate and up, down
    config = Qwen2_5_VLConfig(**json.loads(bench.QWEN_3B_CONFIG.read_text()))
    with torch.device("meta"):
        meta = Qwen2_5_VLForConditionalGeneration(config)
    lora = models.lora_config(16, 0, 0.0, "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", False)
    assert sum(p.numel() for p in get_peft_model(meta, lora).parameters() if p.requires_grad) == n
    assert plan["parameters"] == N and plan["trained_parameters"] == n
    c = plan["components_gib"]
    assert c["reference_weights"] == 0 and c["policy_weights"] == round((2 * N + 4 * n) / GiB, 2)
    assert c["adam_moments"] == round(8 * n / GiB, 2) and c["gradients"] == round(4 * n / GiB, 2)
    assert plan["target_gib"] == 22 and plan["fits"] and plan["peak_memory_gib"] == max(plan["phases_gib"].values())
    assert plan["longest_prompt"]["fits"] and plan["longest_prompt"]["peak_memory_gib"] <= 22
    bench.main(["--config", "3b", "--dry-run", "--out", str(tmp_path / "full.json")])
    full = json.loads((tmp_path / "full.json").read_text())
    assert plan["peak_memory_gib"] < full["peak_memory_gib"] - 2 * N / GiB  # at least the reference's 7 GiB less

    from plumbing import toy
    processor = toy.build_processor()
    small = bench.memory_plan(toy.tiny_config(processor.tokenizer), {"parameters": 1, "largest_parameter": 1},
                              apo.Args(lora_rank=4, lora_vision=True), 100, 16)
    model = Qwen2_5_VLForConditionalGeneration(toy.tiny_config(processor.tokenizer))
    lora = models.lora_config(4, 0, 0.0, apo.Args.lora_targets, True)
    assert small["trained_parameters"] == sum(p.numel() for p in get_peft_model(model, lora).parameters()
                                              if p.requires_grad)


def test_bench_tiny_cpu_step(tmp_path):
    from tools import bench
    out = tmp_path / "bench.json"
    bench.main(["--config", "tiny", "--device", "cpu", "--steps", "1", "--prompts-per-step", "2", "--group-size", "4",
                "--max-new-tokens", "5", "--mini-batch-size", "4", "--micro-batch-size", "2", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["response_tokens"] == 2 * 4 * 5 and result["decode_steps"] == 5 - 1  # every response full length
    assert set(result["seconds"]) == set(result["peak_memory_gib_by_phase"]) == {
        "rollout", "reward", "logprobs", "update", "optimizer"}
    assert result["step_seconds"] > 0 and result["peak_memory_gib"] > 0
    assert result["rollout_tokens_per_s"] > 0 and result["train_tokens_per_s"] > 0
    # and with LoRA adapters (the reference: the model with them off)
    bench.main(["--config", "tiny", "--device", "cpu", "--steps", "1", "--prompts-per-step", "2", "--group-size", "4",
                "--max-new-tokens", "5", "--mini-batch-size", "4", "--micro-batch-size", "2", "--lora-rank", "2",
                "--out", str(out)])
    assert json.loads(out.read_text())["response_tokens"] == 2 * 4 * 5


def test_bench_toy_times_apo_step_in_both_layouts(tmp_path):
    """--config toy: the toy's own starting model, data and preset; the shared layout forwards each of the 8
    prompts once per pass (8 rows), a copy per response 64, the same responses either way."""
    from tools import bench
    results = {}
    for layout in ("--share-prompt", "--no-share-prompt"):
        bench.main(["--config", "toy", "--steps", "1", "--threads", "1", layout, "--out", str(tmp_path / "t.json")])
        results[layout] = json.loads((tmp_path / "t.json").read_text())
    shared, alone = results["--share-prompt"], results["--no-share-prompt"]
    assert shared["response_tokens"] == alone["response_tokens"] < 64 * 32  # EOS ends them: not full length
    assert (shared["tokens_per_pass"]["rows"], alone["tokens_per_pass"]["rows"]) == (8, 64)
    assert shared["tokens_per_pass"]["prompt"] * 8 == alone["tokens_per_pass"]["prompt"]
    assert set(shared["seconds"]) == {"rollout", "reward", "logprobs", "update", "optimizer"}
