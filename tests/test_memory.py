"""The memory-saving pieces against independent routes: adamw.AdamW (fp32: torch.optim.AdamW; bf16: the fp32 update in
expectation, through stochastic rounding) and rollout.response_logprobs' chunked vocabulary projection (the naive
full-logits log-softmax, values and gradients; and its peak memory)."""
import json
import math
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

import adamw
import rollout

Z = 5  # statistical tests: |z| < 5 fails a correct implementation with probability 6e-7 (and the seeds are fixed)


# ------------------------------------------------------------------------------------------------------ AdamW
def test_adamw_fp32_equals_torch_adamw(monkeypatch):
    """fp32 weights: the same numbers as torch.optim.AdamW, bit for bit, over several steps, with weight decay and
    gradients of very different scales; slices smaller than a parameter change nothing."""
    monkeypatch.setattr(adamw.AdamW, "slice_size", 100)  # the 64×33 and 1000-long parameters span several slices
    gen = torch.Generator().manual_seed(0)
    shapes = [(64, 33), (1000,), (7, 5, 3), (1,)]
    init = [torch.randn(s, generator=gen) for s in shapes]
    ours = [torch.nn.Parameter(x.clone()) for x in init]
    theirs = [torch.nn.Parameter(x.clone()) for x in init]
    kwargs = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opt_ours, opt_theirs = adamw.AdamW(ours, **kwargs), torch.optim.AdamW(theirs, foreach=False, **kwargs)
    for _ in range(6):
        for a, b in zip(ours, theirs):
            g = torch.randn(a.shape, generator=gen) * 10.0 ** torch.randint(-6, 2, a.shape, generator=gen)
            a.grad, b.grad = g.clone(), g.clone()
        opt_ours.step()
        opt_theirs.step()
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
        assert torch.equal(opt_ours.state[a]["exp_avg"], opt_theirs.state[b]["exp_avg"])
        assert torch.equal(opt_ours.state[a]["exp_avg_sq"], opt_theirs.state[b]["exp_avg_sq"])


def test_adamw_bf16_small_lr_moves_weights_as_fp32_in_expectation(monkeypatch):
    """bf16 weights, lr 1e-6, one step. The weights lie in one binade, (2^-6, 2^-5), where bf16 values are
    s = 2^-13 ≈ 1.2e-4 apart, and all gradients are positive: Adam's first step moves each weight down by
    u_i = lr·g_i/(|g_i| + ε) ≈ 1e-6 = s/122. Round-to-nearest keeps every weight (u < s/2). Stochastic rounding
    moves weight i one spacing down with probability u_i/s, so its change Δ_i ∈ {0, −s} has mean −u_i and variance
    u_i(s − u_i): Σ Δ_i must lie within Z standard deviations of −Σ u_i (5σ is ±5% of the mean update here)."""
    monkeypatch.setattr(adamw.AdamW, "slice_size", 1 << 18)  # four slices
    n, lr, eps, s = 1 << 20, 1e-6, 1e-8, 2.0 ** -13
    gen = torch.Generator().manual_seed(1)
    magnitude = 2.0 ** -6 + s + torch.rand(n, generator=gen) * (2.0 ** -6 - 2 * s)  # away from the binade's edges
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    w0 = (sign * magnitude).to(torch.bfloat16)
    weight = torch.nn.Parameter(w0.clone())
    weight.grad = (1e-3 + torch.rand(n, generator=gen)).to(torch.bfloat16)  # positive: every weight moves down
    adamw.AdamW([weight], lr=lr, eps=eps).step()

    g = weight.grad.double()
    u = lr * g / (g.abs() + eps)                                 # the fp32 (exact) update, float64 here
    assert torch.equal((w0.double() - u).to(torch.bfloat16), w0)  # round-to-nearest would change no weight at all
    delta = weight.detach().double() - w0.double()
    assert ((delta == 0) | (delta == -s)).all()                  # one of the two neighbours, never further
    changed = int((delta != 0).sum())
    assert changed > 0
    z = (delta.sum() + u.sum()) / (u * (s - u)).sum().sqrt()
    assert abs(z.item()) < Z, (changed, z.item())


# ----------------------------------------------------------------------------------------- stochastic rounding
def bf16_neighbours(x: torch.Tensor):
    """The bf16 values just below and above each x (equal when x is a bf16 value), by torch's own round-to-nearest
    conversion and nextafter: independent of the bit arithmetic of adamw.stochastic_round_to_bf16."""
    nearest = x.to(torch.bfloat16)
    down = torch.nextafter(nearest, torch.full_like(nearest, -math.inf))
    up = torch.nextafter(nearest, torch.full_like(nearest, math.inf))
    exact = nearest.float() == x
    lo = torch.where(exact | (nearest.float() < x), nearest, down)
    hi = torch.where(exact | (nearest.float() > x), nearest, up)
    return lo, hi


def test_stochastic_rounding_lands_on_a_neighbour():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(200_000, generator=gen) * 10.0 ** torch.randint(-30, 30, (200_000,), generator=gen).float()
    x = torch.cat([x, torch.tensor([0.0, -0.0, 1.0, -2.5, 1e-40, -3e-39, 3.0e38])])  # exact values, subnormals
    out = adamw.stochastic_round_to_bf16(x)
    lo, hi = bf16_neighbours(x)
    assert out.dtype == torch.bfloat16
    assert ((out == lo) | (out == hi)).all()
    representable = x.to(torch.bfloat16).float() == x
    assert representable.sum() >= 6 and torch.equal(out[representable].float(), x[representable])
    special = torch.tensor([math.inf, -math.inf, math.nan])
    assert torch.equal(adamw.stochastic_round_to_bf16(special)[:2].float(), special[:2])
    assert adamw.stochastic_round_to_bf16(special)[2].isnan()


@pytest.mark.parametrize("lo_value, fraction", [(1.0, 0.1), (1.0, 0.5), (-3.0, 0.9), (2.0 ** -100, 0.3),
                                                (1e-39, 0.7)])  # the last in the subnormal range
def test_stochastic_rounding_is_unbiased(lo_value, fraction):
    """x at a known fraction of the way between two bf16 neighbours lo < hi (or hi < lo for negative numbers):
    the share rounded away from lo is Binomial(K, fraction)/K, and so the mean of the results is x."""
    lo = torch.tensor([lo_value], dtype=torch.bfloat16)
    hi = torch.nextafter(lo, torch.tensor([math.copysign(math.inf, lo_value)], dtype=torch.bfloat16))
    x = lo.double() + fraction * (hi.double() - lo.double())
    K = 200_000
    torch.manual_seed(3)
    out = adamw.stochastic_round_to_bf16(x.float().expand(K).contiguous())
    assert ((out == lo) | (out == hi)).all()
    away = (out == hi).sum().item()
    p = ((x.float().double() - lo.double()) / (hi.double() - lo.double())).item()  # x as fp32 (it is rounded once)
    assert abs(away - K * p) < Z * math.sqrt(K * p * (1 - p))


def test_stochastic_rounding_mean_error_is_zero():
    """Over many different x, Σ (round(x) − x) has mean 0 and variance Σ (x − lo)(hi − x)."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1_000_000, generator=gen) * 0.02
    torch.manual_seed(5)
    err = adamw.stochastic_round_to_bf16(x).double() - x.double()
    lo, hi = bf16_neighbours(x)
    variance = ((x.double() - lo.double()) * (hi.double() - x.double())).sum()
    assert abs(err.sum() / variance.sqrt()).item() < Z
    nearest_err = (x.to(torch.bfloat16).double() - x.double()).abs().sum()
    assert err.abs().sum() > nearest_err  # (it is noisier than round-to-nearest: the price of being unbiased)


# --------------------------------------------------------------------------------------- chunked log-probs
TEMPERATURE = 0.7


@pytest.fixture(scope="module")
def tiny64(tiny_model_dir):
    """The tiny model in float64: the only rounding the two routes do differently is then that of the logits to
    fp32 (both compute the log-softmax in fp32, as rollout does), so they agree to a few fp32 ulps (2^-23 each)."""
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float64)
    return model, AutoProcessor.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def rollout_batch(tiny64):
    """Two prompts of different lengths (left padding), two responses each, of 9, 4, 7 and 1 tokens then padding."""
    _, processor = tiny64
    prompts = rollout.encode_prompts(processor, [Image.new("RGB", (56, 84), "red"), Image.new("RGB", (40, 40))],
                                     ["<image>How many sides?", "Find x, the length of the side opposite B."],
                                     28 * 28, 112 * 112)
    batch = rollout.select(prompts, [0, 0, 1, 1])
    gen = torch.Generator().manual_seed(6)
    lengths = torch.tensor([9, 4, 7, 1])
    mask = (torch.arange(9)[None] < lengths[:, None]).long()                   # [4, 9]
    pad = processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    response = torch.where(mask.bool(), torch.randint(0, 400, (4, 9), generator=gen), pad)  # no special tokens
    batch.update(input_ids=torch.cat([batch["input_ids"], response], 1),
                 attention_mask=torch.cat([batch["attention_mask"], mask], 1),
                 mm_token_type_ids=torch.cat([batch["mm_token_type_ids"], torch.zeros_like(response)], 1),
                 response_mask=mask, prompt_len=prompts["input_ids"].shape[1])
    return batch


def naive_logprobs(model, batch):
    """Full-vocabulary logits of every position at once (HF's own forward), fp32 log-softmax, gather."""
    P = batch["prompt_len"]
    logits = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values",
                                            "image_grid_thw")}).logits[:, P - 1:-1].float() / TEMPERATURE
    logp_all = logits.log_softmax(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp_all.gather(-1, batch["input_ids"][:, P:, None])[..., 0], entropy


def gradients(model, logp, weights) -> dict:
    model.zero_grad(set_to_none=True)
    (logp * weights).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return {**grads, "lm_head.weight": model.lm_head.weight.grad.clone()}  # (tied to the embedding)


@pytest.mark.parametrize("chunk", [1, 5, 7, 36, 1024])  # 36 = n·T; 5 and 7 do not divide it; 1024: one chunk
def test_chunked_logprobs_equal_naive_values_and_gradients(tiny64, rollout_batch, chunk):
    model, _ = tiny64
    weights = torch.randn(4, 9, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    weights = weights * rollout_batch["response_mask"]
    expected, expected_entropy = naive_logprobs(model, rollout_batch)
    expected_grads = gradients(model, expected, weights)
    logp, entropy = rollout.response_logprobs(model, rollout_batch, TEMPERATURE, chunk_tokens=chunk)
    torch.testing.assert_close(logp, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(entropy, expected_entropy.detach(), rtol=1e-6, atol=1e-6)
    assert not entropy.requires_grad
    grads = gradients(model, logp, weights)
    assert grads.keys() == expected_grads.keys(), set(grads) ^ set(expected_grads)
    for name in grads:
        torch.testing.assert_close(grads[name], expected_grads[name], rtol=1e-6, atol=1e-9, msg=name)
    model.zero_grad(set_to_none=True)


def test_batched_logprobs_equal_naive_across_micro_batches_of_different_lengths(tiny64, rollout_batch):
    """No gradients, micro-batches whose longest responses differ (select() trims each to its own length)."""
    model, _ = tiny64
    with torch.no_grad():
        expected, _ = naive_logprobs(model, rollout_batch)
    mask = rollout_batch["response_mask"].bool()
    for micro in (1, 3):
        logp, _ = rollout.batched_logprobs(model, rollout_batch, TEMPERATURE, micro, chunk_tokens=5)
        assert logp.shape == expected.shape
        torch.testing.assert_close(logp[mask], expected[mask], rtol=1e-6, atol=1e-6)


def test_chunked_logprobs_peak_memory():
    """Peak memory of forward + backward through the vocabulary projection, counted tensor by tensor (torch's
    MemTracker: exact, no timing), with bf16 weights as on a GPU. A stand-in model returns fixed hidden states, so
    that the projection is all there is; its vocabulary (20,000) makes a [1, V] fp32 row (80 kB) big next to the
    rest. With a fixed chunk, the peak must not grow with the micro-batch's token count by even an eighth of a row
    per token (what does grow: hidden states and per-token outputs, ~100 bytes per token); with a single chunk of
    all n·T positions (what the naive route holds), it grows by one to five rows per token (the log-softmax kept
    for backward, its gradient, log_softmax's exp and result, the bf16 logits)."""
    from torch.distributed._tools import mem_tracker  # (a private module of torch: an import error says so)
    n, P, H, V = 4, 3, 16, 20_000
    gen = torch.Generator().manual_seed(8)
    weight = torch.randn(V, H, generator=gen).to(torch.bfloat16).requires_grad_()

    def peak(T: int, chunk: int) -> int:
        hidden = torch.randn(n, P + T, H, generator=gen).to(torch.bfloat16).requires_grad_()
        def stand_in(**inputs):  # the model's forward, asked for its hidden states
            return SimpleNamespace(hidden_states=(hidden * 1,))
        stand_in.device, stand_in.lm_head = torch.device("cpu"), SimpleNamespace(weight=weight)
        batch = {"input_ids": torch.randint(0, V, (n, P + T), generator=gen), "prompt_len": P,
                 **{k: torch.zeros(1) for k in ("attention_mask", "mm_token_type_ids", "pixel_values",
                                                "image_grid_thw")}}
        tracker = mem_tracker.MemTracker()
        with tracker:
            logp, _ = rollout.response_logprobs(stand_in, batch, TEMPERATURE, chunk_tokens=chunk)
            logp.sum().backward()
        weight.grad = None
        return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]

    row, added = V * 4, n * (9 - 2)  # an fp32 vocabulary row; tokens added going from T = 2 to T = 9
    assert peak(9, chunk=3) - peak(2, chunk=3) < added * row / 8
    assert added * row <= peak(9, chunk=n * 9) - peak(2, chunk=n * 2) <= 5 * added * row


# ---------------------------------------------------------------------------------------------------- bench.py
def test_bench_dry_run_plan(tmp_path):
    """The plan counts Qwen2.5-VL-3B's parameters on the meta device (3,754,622,976, the published count) and adds
    up its components as written: moments 8 bytes per weight, KV cache 2 (K, V) · 2 kv heads · 128 · 2 bytes ·
    36 layers per token of each of the 128 sequences."""
    import bench
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
    import bench
    import run_folder
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
    lora = run_folder.lora_config(16, 0, 0.0, "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", False)
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

    import toy
    processor = toy.build_processor()
    small = bench.memory_plan(toy.tiny_config(processor.tokenizer), {"parameters": 1, "largest_parameter": 1},
                              apo.Args(lora_rank=4, lora_vision=True), 100, 16)
    model = Qwen2_5_VLForConditionalGeneration(toy.tiny_config(processor.tokenizer))
    lora = run_folder.lora_config(4, 0, 0.0, apo.Args.lora_targets, True)
    assert small["trained_parameters"] == sum(p.numel() for p in get_peft_model(model, lora).parameters()
                                              if p.requires_grad)


def test_bench_tiny_cpu_step(tmp_path):
    import bench
    out = tmp_path / "bench.json"
    bench.main(["--config", "tiny", "--device", "cpu", "--steps", "1", "--prompts-per-step", "2", "--group-size", "4",
                "--max-new-tokens", "5", "--mini-batch-size", "4", "--micro-batch-size", "2", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["response_tokens"] == 2 * 4 * 5 and result["decode_steps"] == 5 - 1  # every response full length
    assert set(result["seconds"]) == set(result["peak_memory_gib_by_phase"]) == {
        "rollout", "advantages", "logprobs", "update", "optimizer"}
    assert result["step_seconds"] > 0 and result["peak_memory_gib"] > 0
    assert result["rollout_tokens_per_s"] > 0 and result["train_tokens_per_s"] > 0
    # and with LoRA adapters (the reference: the model with them off)
    bench.main(["--config", "tiny", "--device", "cpu", "--steps", "1", "--prompts-per-step", "2", "--group-size", "4",
                "--max-new-tokens", "5", "--mini-batch-size", "4", "--micro-batch-size", "2", "--lora-rank", "2",
                "--out", str(out)])
    assert json.loads(out.read_text())["response_tokens"] == 2 * 4 * 5
