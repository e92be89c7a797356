"""The training loop on a tiny Qwen2.5-VL: the update, checkpoints, the run folder, bad input, faults and resumes."""
import json
import signal
import sys
from pathlib import Path

import pytest
import torch

from plumbing import adamw, data, models, run_folder, toy
import apo
import rollout
from conftest import (PAUSED, REPO, TIMING_KEYS, Processes, png_bytes, read_jsonl, wait_for, without_timings,
                      write_hub_layout)


def tiny_args(model_dir, data_dir, out, *extra):
    return ["--model", str(model_dir), "--data", str(data_dir), "--out", str(out), "--device", "cpu",
            "--prompts-per-step", "2", "--group-size", "4", "--max-new-tokens", "8", "--mini-batch-size", "4",
            "--micro-batch-size", "3", "--max-pixels", "3136", "--lr", "1e-3", "--log-samples", "1", *extra]


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    return models.load_model(str(tiny_model_dir), torch.float32, torch.device("cpu"))


def rollout_with_rewards(model, processor, rewards, correct):
    """A real rollout of the tiny model with rewards set by hand (a random model never earns any)."""
    from PIL import Image
    prompts = rollout.encode_prompts(processor, [Image.new("RGB", (56, 56), c) for c in ("red", "blue")],
                                     ["Find x.", "How many sides?"], 784, 3136)
    torch.manual_seed(0)
    batch = rollout.sample_responses(model, processor, prompts, 4, rollout.generation_config(processor, 6, 1.0, 1.0))
    lengths = batch["lengths"].view(2, 4)
    advantages = apo.stcr_multiplier(correct, lengths) * apo.grpo_advantages(rewards)
    batch["advantages"] = advantages.flatten()
    batch["kl_weights"] = apo.dads_kl_weights(advantages, correct).flatten()
    return batch


@pytest.mark.parametrize("mini_batch_size", [8, 3])  # on-policy (one step), and off-policy (3 steps, ℓ_old used)
def test_one_update_changes_every_trainable_parameter(tiny_model_dir, mini_batch_size):
    model, processor = models.load_model(str(tiny_model_dir), torch.float32, torch.device("cpu"))
    reference, _ = models.load_model(str(tiny_model_dir), torch.float32, torch.device("cpu"))
    args = apo.parse_args(["--mini-batch-size", str(mini_batch_size), "--micro-batch-size", "2", "--lr", "1e-4"])
    rewards = torch.tensor([[1.5, 0.5, 0.0, 0.5], [0.0, 1.0, 1.5, 0.0]])
    batch = rollout_with_rewards(model, processor, rewards, rewards >= 1.0)
    batch["ref_logp"], _ = rollout.batched_logprobs(reference, batch, 1.0, 4)
    if mini_batch_size < 8:
        batch["old_logp"], _ = rollout.batched_logprobs(model, batch, 1.0, 4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = adamw.AdamW(model.parameters(), lr=1e-4)
    n_steps = -(-8 // mini_batch_size)
    stats = apo.update_policy(model, batch, optimizer, args, [1e-4] * n_steps)
    assert stats["finite"] == [True] * n_steps
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert unchanged == []
    assert stats["grad_norm"] > 0 and stats["entropy"] > 0


def test_non_finite_update_is_skipped(policy):
    model, processor = models.load_model(policy[0].name_or_path, torch.float32, torch.device("cpu"))
    rewards = torch.tensor([[1.5, 0.5, 0.0, 0.5], [0.0, 1.0, 1.5, 0.0]])
    batch = rollout_with_rewards(model, processor, rewards, rewards >= 1.0)
    batch["advantages"][3] = float("nan")
    batch["ref_logp"] = None
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = adamw.AdamW(model.parameters(), lr=1e-3)
    stats = apo.update_policy(model, batch, optimizer, apo.parse_args(["--mini-batch-size", "8"]), [1e-3])
    assert stats["finite"] == [False]
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert not optimizer.state  # the Adam moments were not touched either


def test_checkpoint_reloads_with_identical_outputs(policy, tmp_path):
    model, processor = policy
    norm = model.model.language_model.norm.weight
    saved = norm.detach().clone()
    with torch.no_grad():
        norm.mul_(1.5)  # not the initial weights: the reload must carry them
    try:
        run_folder.save_checkpoint(tmp_path, "checkpoint-000001", model, processor, {"state": {"step": 1}})
        assert not list(tmp_path.glob(".tmp-*")) and (tmp_path / "checkpoint-000001" / "model.safetensors").exists()
        reloaded, reprocessor = models.load_model(str(tmp_path / "checkpoint-000001"), torch.float32,
                                               torch.device("cpu"))
        from PIL import Image
        inputs = rollout.encode_prompts(processor, [Image.new("RGB", (56, 56), "red")], ["Find x."], 784, 3136)
        again = rollout.encode_prompts(reprocessor, [Image.new("RGB", (56, 56), "red")], ["Find x."], 784, 3136)
        assert all(torch.equal(inputs[k], again[k]) for k in inputs)
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, reloaded(**inputs).logits)
            assert not torch.equal(reloaded.model.language_model.norm.weight, saved)
    finally:  # the model is shared by this module's tests: put it back, pass or fail
        with torch.no_grad():
            norm.copy_(saved)


def test_keep_last_and_atomic_final(policy, tmp_path):
    model, processor = policy
    for step in (1, 2, 3):
        run_folder.save_checkpoint(tmp_path, f"checkpoint-{step:06d}", model, processor, {"state": {"step": step}},
                            keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-000002", "checkpoint-000003"]
    # a save killed halfway leaves only a hidden temporary folder (here with a state that claims step 4): a resume
    # takes the last complete checkpoint, whole
    (tmp_path / ".tmp-checkpoint-000004").mkdir()
    (tmp_path / ".tmp-checkpoint-000004" / "trainer_state.json").write_text(json.dumps({"step": 4}))
    assert run_folder.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-000003"
    assert (tmp_path / "checkpoint-000003" / "model.safetensors").exists()
    run_folder.save_checkpoint(tmp_path, "final", model, processor)
    run_folder.save_checkpoint(tmp_path, "final", model, processor)  # rewriting final/ replaces it whole
    assert (tmp_path / "final" / "config.json").exists() and not list(tmp_path.glob(".old-*"))


@pytest.fixture(scope="module")
def toy_geo_dir(tmp_path_factory):
    """Six good geo3k-schema rows drawn with PIL, and three bad ones (corrupt image, empty problem, bad gold)."""
    good = [{"images": [{"bytes": png_bytes(c), "path": None}], "problem": f"<image>Find x if x = {i}.",
             "answer": str(i), "id": i} for i, c in enumerate(["red", "blue", "green", "white", "black", "gray"])]
    bad = [{"images": [{"bytes": b"broken", "path": None}], "problem": "Find x.", "answer": "1", "id": 90},
           {"images": [{"bytes": png_bytes(), "path": None}], "problem": "<image>", "answer": "1", "id": 91},
           {"images": [{"bytes": png_bytes(), "path": None}], "problem": "Find x.", "answer": "\\frac{", "id": 92}]
    rows = good[:2] + bad[:1] + good[2:4] + bad[1:] + good[4:]
    return write_hub_layout(tmp_path_factory.mktemp("data") / "geo", {"train": rows})


def test_run_folder_metrics_samples_and_bad_rows(tiny_model_dir, toy_geo_dir, tmp_path, capsys):
    out = apo.train(apo.parse_args(tiny_args(tiny_model_dir, toy_geo_dir, tmp_path / "run", "--steps", "3",
                                             "--save-every", "2", "--no-shuffle")))
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [0, 1, 2]
    required = {"reward", "accuracy", "format_rate", "response_length", "response_length_correct",
                "response_length_wrong", "kl", "entropy", "clip_fraction", "dads_weight_pos_mean",
                "stcr_mult_neg_mean", "stcr_mult_neg_max", "equal_reward_groups", "lr", "bad_rows"} | TIMING_KEYS
    assert required <= set(metrics[0])
    # in file order, 3 steps of 2 prompts read all 9 rows: the 3 bad ones are skipped, counted and named once
    assert metrics[-1]["bad_rows"] == 3
    log = capsys.readouterr()
    assert sum("skipping row" in line for line in (log.out + log.err).splitlines()) == 3
    samples = read_jsonl(out / "samples.jsonl")
    # per step of 2 prompts: the first (--log-samples 1) and the other, drawn at random (--log-random-samples 2)
    assert [(s["step"], s["chosen"]) for s in samples] == [(k, c) for k in range(3) for c in ("first", "random")]
    assert len(samples[0]["responses"]) == 4 and len(samples[0]["advantages"]) == len(samples[0]["format"]) == 4
    # a random model rarely ends within 8 tokens: cut responses are those of 8 tokens with no end
    flags = [(t, n) for s in samples for t, n in zip(s["truncated"], s["lengths"])]
    assert any(t for t, _ in flags) and all(n == 8 for t, n in flags if t)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["checkpoint-000002", "final"]
    state = torch.load(out / "checkpoint-000002" / "trainer_state.pt", weights_only=False)
    assert state["state"]["step"] == 2 and state["optimizer"]["state"]
    with pytest.raises(SystemExit, match="already holds a run"):
        apo.train(apo.parse_args(tiny_args(tiny_model_dir, toy_geo_dir, tmp_path / "run", "--steps", "3")))


def test_repeated_non_finite_updates_stop_after_a_checkpoint(tiny_model_dir, toy_geo_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(apo, "grpo_advantages", lambda rewards: torch.full_like(rewards, float("nan")))
    with pytest.raises(SystemExit, match="3 updates in a row had a non-finite"):
        apo.train(apo.parse_args(tiny_args(tiny_model_dir, toy_geo_dir, tmp_path / "run", "--steps", "10",
                                                 "--mini-batch-size", "8")))  # one update per step
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [m["skipped_updates"] for m in metrics] == [1, 2, 3]
    assert (tmp_path / "run" / "checkpoint-000003" / "trainer_state.pt").exists()


def toy_args(data, out, *extra):
    """A run on the toy's starting model (rewards differ within groups: every update moves the weights and the Adam
    moments), 2 optimizer steps per rollout."""
    return ["--model", "toy", "--data", str(data), "--out", str(out), "--prompts-per-step", "2", "--group-size",
            "4", "--max-new-tokens", "20", "--mini-batch-size", "4", "--micro-batch-size", "3", "--log-samples", "1",
            "--eval-every", "0", "--lr", "1e-3", *extra]


def final_state(out: Path) -> tuple:
    """The weights of out/final and its optimizer state (Adam moments, step counts) and rounding generator."""
    from safetensors.torch import load_file
    saved = torch.load(out / "final" / "trainer_state.pt", weights_only=True)
    return load_file(out / "final" / "model.safetensors"), saved["optimizer"]["state"], saved["rng"][0]["rounding"]


def assert_same_state(a: tuple, b: tuple):
    (weights_a, moments_a, rounding_a), (weights_b, moments_b, rounding_b) = a, b
    assert weights_a.keys() == weights_b.keys() and all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert moments_a.keys() == moments_b.keys()
    for k in moments_a:
        assert moments_a[k]["step"] == moments_b[k]["step"]
        assert torch.equal(moments_a[k]["exp_avg"], moments_b[k]["exp_avg"]), k
        assert torch.equal(moments_a[k]["exp_avg_sq"], moments_b[k]["exp_avg_sq"]), k
    assert torch.equal(rounding_a, rounding_b)


def run_logs(out: Path) -> dict:
    """What two runs that agree write alike: metrics.jsonl (timings aside) and samples.jsonl."""
    return {"metrics": without_timings(read_jsonl(out / "metrics.jsonl")), "samples": read_jsonl(out / "samples.jsonl")}


def resume_after_step_2(out: Path, args: list):
    """The 4-step run `args` in `out` (checkpoints every 2) as if killed after step 2, then resumed: final/ and
    checkpoint-000004 removed, the same command again with --resume."""
    import shutil
    shutil.rmtree(out / "final")
    shutil.rmtree(out / "checkpoint-000004")
    apo.train(apo.parse_args(args + ["--resume"]))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_resumed_run_ends_with_the_weights_and_adam_moments_of_an_uninterrupted_one(toy_dir, tmp_path, dtype):
    """4 steps, checkpoints every 2. Resumed from checkpoint-000002 (final/ and checkpoint-000004 removed, as if
    killed after step 2), the run ends with the weights, Adam moments and rounding generator of the uninterrupted
    run, bit for bit, in fp32 and in bf16 (where the stochastic rounding draws from the optimizer's generator),
    and writes the same metrics and samples."""
    args = toy_args(toy_dir, tmp_path / "run", "--steps", "4", "--save-every", "2", "--dtype", dtype)
    out = apo.train(apo.parse_args(args))
    uninterrupted = final_state(out)
    logs = run_logs(out)
    start, _ = models.load_model("toy", getattr(torch, dtype), torch.device("cpu"))
    end, _ = models.load_model(str(out / "final"), getattr(torch, dtype), torch.device("cpu"))
    moved = [n for (n, a), b in zip(start.named_parameters(), end.parameters()) if not torch.equal(a, b)]
    assert len(moved) > 0.9 * len(list(start.parameters()))  # the weights moved, and the moments are not zero
    assert all(m["exp_avg"].abs().sum() > 0 for m in uninterrupted[1].values())

    resume_after_step_2(out, args)
    assert_same_state(final_state(out), uninterrupted)
    assert run_logs(out) == logs


@pytest.mark.slow
def test_sigint_then_resume_reproduces_an_uninterrupted_run(toy_dir, tmp_path):
    """Same seed, same command: a run stopped by SIGINT, then resumed, writes exactly the metrics and samples of
    one that never stopped (timings aside) and ends with its weights and Adam moments. The signal comes while the
    run waits before step 2's rollout (tests/paused_run.py), so it always lands before the run could end."""
    steps = ["--steps", "4", "--save-every", "100"]
    full = apo.train(apo.parse_args(toy_args(toy_dir, tmp_path / "full", *steps)))

    marker = tmp_path / "waiting"
    cut = Processes([sys.executable, str(PAUSED), "2", "0", str(marker), str(REPO / "apo.py"),
                     *toy_args(toy_dir, tmp_path / "cut", *steps)])
    wait_for(marker, cut)
    cut.procs[0].send_signal(signal.SIGINT)
    output = cut.finish()[0]
    assert "stopped by signal" in output
    assert [p.name for p in (tmp_path / "cut").glob("checkpoint-*")] == ["checkpoint-000003"]  # after step 2

    Processes([sys.executable, str(REPO / "apo.py"), *toy_args(toy_dir, tmp_path / "cut", *steps),
               "--resume"]).finish()
    assert run_logs(tmp_path / "cut") == run_logs(full)
    assert_same_state(final_state(tmp_path / "cut"), final_state(full))


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(toy_dir, tmp_path):
    marker = tmp_path / "waiting"
    run = Processes([sys.executable, str(PAUSED), "1", "0", str(marker), str(REPO / "apo.py"),
                     *toy_args(toy_dir, tmp_path / "run", "--steps", "50", "--save-every", "100")])
    wait_for(marker, run)
    run.procs[0].send_signal(signal.SIGTERM)
    output = run.finish()[0]
    assert f"stopped by signal {int(signal.SIGTERM)}" in output, output[-2000:]
    assert [p.name for p in (tmp_path / "run").glob("checkpoint-*")] == ["checkpoint-000002"]
    assert len(read_jsonl(tmp_path / "run" / "metrics.jsonl")) == 2


def test_no_gpu_stops_the_3b_default_with_a_clear_message(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="No CUDA GPU found.*--device cpu"):
        models.resolve_device("auto", "auto", "Qwen/Qwen2.5-VL-3B-Instruct", "geo3k")
    assert models.resolve_device("cpu", "auto", "Qwen/Qwen2.5-VL-3B-Instruct", "geo3k") == (
        torch.device("cpu"), torch.float32)


@pytest.mark.slow
def test_a_finished_run_can_be_extended(toy_dir, tmp_path, capsys):
    """`--resume` with a larger --steps continues a run that finished: from final/, with its weights, optimizer,
    RNG streams and data position; the learning rate then follows the schedule of a run planned for the new step
    count."""
    args = toy_args(toy_dir, tmp_path / "run", "--save-every", "100", "--no-shuffle")
    out = apo.train(apo.parse_args(args + ["--steps", "2"]))
    assert not list(out.glob("checkpoint-*"))  # only final/: the case that could not be resumed
    assert json.loads((out / "final" / "trainer_state.json").read_text())["step"] == 2
    after_two = final_state(out)
    apo.train(apo.parse_args(args + ["--steps", "2", "--resume"]))  # nothing left to do: said, nothing rewritten
    assert "nothing to do" in capsys.readouterr().out and len(read_jsonl(out / "metrics.jsonl")) == 2
    assert_same_state(final_state(out), after_two)

    apo.train(apo.parse_args(args + ["--steps", "4", "--resume"]))
    assert "the learning rate follows the 4-step schedule" in capsys.readouterr().out
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [0, 1, 2, 3]
    # 8 responses in mini-batches of 4: 2 optimizer steps per rollout; the lr logged is the last one's
    for m in metrics[2:]:
        assert m["lr"] == apo.cosine_schedule(2 * m["step"] + 1, 4 * 2, 0.03, 1e-3, 1e-7)
    assert json.loads((out / "final" / "trainer_state.json").read_text())["step"] == 4
    # Adam went on from the finished run's moments: 4 more optimizer steps on top of its 4
    weights, moments, _ = final_state(out)
    assert {m["step"] for m in moments.values()} == {8}
    assert {m["step"] for m in after_two[1].values()} == {4}
    assert any(not torch.equal(weights[k], after_two[0][k]) for k in weights)
    # it read on in the data where the first run stopped (2 prompts a step, file order; samples.jsonl holds each
    # step's first prompt, then the other one as the one drawn at random): rows 0, 1, 2, 3, then 4, 5, 6, 7
    samples = read_jsonl(out / "samples.jsonl")
    answers = [r["answer"] for r in toy.toy_rows("train", seed=0)]
    assert [(s["step"], s["chosen"]) for s in samples] == [(k // 2, ("first", "random")[k % 2]) for k in range(8)]
    assert [s["answer"] for s in samples] == answers[:8]


@pytest.mark.slow
def test_held_out_evaluation_during_training(tiny_model_dir, geo3k_dir, tmp_path):
    """--eval-every: greedy accuracy and format rate on the test split at step 0, every N steps and at the end, one
    line per evaluation in eval.jsonl, also across a resume that redoes steps."""
    args = tiny_args(tiny_model_dir, geo3k_dir, tmp_path / "run", "--steps", "3", "--save-every", "2",
                     "--eval-every", "2", "--max-new-tokens", "6")
    out = apo.train(apo.parse_args(args))
    evals = read_jsonl(out / "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 2, 3] and all(e["problems"] == 2 for e in evals)  # the 2 test rows
    # the last line, recomputed by hand from the trained model's greedy answers to the two test problems
    model, processor = models.load_model(str(out / "final"), torch.float32, torch.device("cpu"))
    cfg = apo.parse_args(args)
    table, base, columns = data.load_table(str(geo3k_dir), "test")
    examples = [data.prepare_example(table[i], columns, base) for i in range(2)]
    prompts = rollout.encode_prompts(processor, [e["images"] for e in examples], [e["problem"] for e in examples],
                                     cfg.min_pixels, cfg.max_pixels)
    greedy = rollout.sample_responses(model, processor, prompts, 1,
                                      rollout.generation_config(processor, 6, 1.0, 1.0, do_sample=False))
    import reward
    assert evals[-1]["format_rate"] == sum(reward.format_reward(t) > 0 for t in greedy["texts"]) / 2
    assert evals[-1]["accuracy"] == sum(reward.accuracy_reward(t, e["answer"]) for t, e in
                                        zip(greedy["texts"], examples)) / 2
    assert evals[-1]["response_length"] == greedy["lengths"].float().mean().item()

    # a kill after step 3's evaluation, before final/ was written: the resume from checkpoint-2 redoes step 3
    import shutil
    shutil.rmtree(out / "final")
    apo.train(apo.parse_args(args + ["--resume"]))
    assert [e["step"] for e in read_jsonl(out / "eval.jsonl")] == [0, 2, 3]
    apo.train(apo.parse_args(args[:-8] + ["--steps", "4", "--save-every", "2", "--eval-every", "2",
                                          "--max-new-tokens", "6", "--resume"]))  # extended: evaluated at its end
    assert [e["step"] for e in read_jsonl(out / "eval.jsonl")] == [0, 2, 3, 4]


def test_no_held_out_split_means_no_evaluation(tiny_model_dir, toy_geo_dir, tmp_path, capsys):
    out = apo.train(apo.parse_args(tiny_args(tiny_model_dir, toy_geo_dir, tmp_path / "run", "--steps", "1")))
    assert "no held-out evaluation" in capsys.readouterr().out and not (out / "eval.jsonl").exists()
