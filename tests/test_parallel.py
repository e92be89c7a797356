"""Many processes (parallel.py), on the CPU: gloo, 2 ranks started as torchrun starts them. Each result is compared
with one process doing the same work on all the responses."""
import json
import signal
import sys
from pathlib import Path

import pytest
import torch

from plumbing import adamw, models
import apo
import parallel_worker
from conftest import minibatch_gradients, PAUSED, REPO, Processes, read_jsonl, wait_for, without_timings

pytestmark = pytest.mark.slow  # whole runs in processes of their own: the full suite only

WORKER = Path(__file__).resolve().parent / "parallel_worker.py"


def run_worker(task, model_dir, out, **options):
    out.mkdir(parents=True, exist_ok=True)
    Processes([sys.executable, str(WORKER), task, str(model_dir), str(out), json.dumps(options)], world=2).finish()


@pytest.fixture(scope="module")
def single(tiny_model_dir):
    """The single-process route: the tiny model and the shared batch, in this process."""
    torch.set_num_threads(1)
    model, processor = models.load_model(str(tiny_model_dir), torch.float32, torch.device("cpu"))
    return model, processor, parallel_worker.make_batch(model, processor)


@pytest.mark.parametrize("agg, micro, checkpointing", [("token", 3, True), ("sequence", 3, True)])
def test_two_ranks_give_the_gradient_of_one_process(tiny_model_dir, single, tmp_path, agg, micro, checkpointing):
    """Each rank holds half of a mini-batch of 8 responses (14 and 15 tokens), each prompt once per micro-batch; the
    gradients summed over the ranks equal the gradient of one process on all 8 with a copy of the prompt per
    response, for both loss aggregations, with micro-batches and checkpointing."""
    model, processor, batch = single
    run_worker("gradients", tiny_model_dir, tmp_path, agg=agg, micro=micro, checkpointing=checkpointing)
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    model.zero_grad(set_to_none=True)
    args = parallel_worker.args_for({"agg": agg, "micro": micro, "share": False})  # a copy per response
    expected_stats = minibatch_gradients(model, batch, list(range(8)), args)
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    if checkpointing:
        model.activation_checkpointing_disable()
    assert sum(parallel_worker.LENGTHS[:4]) != sum(parallel_worker.LENGTHS[4:])  # ranks hold different token counts
    for rank in (0, 1):
        got = torch.load(tmp_path / f"gradients-{rank}.pt", weights_only=True)
        assert got["grads"].keys() == expected.keys()
        for name, grad in expected.items():
            torch.testing.assert_close(got["grads"][name], grad, rtol=0, atol=1e-6, msg=name)
        for k, v in expected_stats.items():  # the loss terms are global values too
            if k == "kl_per_response":  # ... except each response's KL_i: this rank's block of the 8, one value
                v = v[rank * 4:(rank + 1) * 4]  # each, not a sum over many (fp32 rounding of the shared layout: 2e-7)
                assert got["stats"][k] == pytest.approx(v, rel=0, abs=1e-6), k
            else:
                assert got["stats"][k] == pytest.approx(v, rel=1e-6, abs=1e-9), k


def test_bf16_replicas_stay_bit_identical(tiny_model_dir, tmp_path):
    """Three bf16 updates with stochastic rounding, the ranks' global random streams seeded differently (as in
    training): both ranks' weights are the same to the bit (the rounding draws from a generator seeded alike on
    every rank, never from the global stream), and they did move."""
    run_worker("updates", tiny_model_dir, tmp_path, bf16=True, steps=3)
    digests = [(tmp_path / f"digest-{r}.txt").read_text() for r in (0, 1)]
    assert digests[0] == digests[1]
    start_model, _ = models.load_model(str(tiny_model_dir), torch.bfloat16, torch.device("cpu"))
    assert digests[0] != parallel_worker.weights_digest(start_model)


def test_fsdp_update_equals_the_unsharded_one(tiny_model_dir, single, tmp_path):
    """One optimizer step with FSDP2 (weights, gradients and Adam moments sharded over 2 ranks, the batch split,
    gradient checkpointing on, each prompt once per micro-batch) gives the weights of one process updating on the
    whole batch with a copy of the prompt per response (fp32)."""
    run_worker("updates", tiny_model_dir, tmp_path, fsdp=True, steps=1, checkpointing=True)
    model, processor = models.load_model(str(tiny_model_dir), torch.float32, torch.device("cpu"))
    model.train()
    batch = parallel_worker.make_batch(model, processor)
    model.train()
    apo.update_policy(model, batch, adamw.AdamW(model.parameters(), lr=1e-3, seed=0),
                      parallel_worker.args_for({"share": False}), [1e-3])  # a copy of the prompt per response
    got = torch.load(tmp_path / "weights.pt", weights_only=True)["weights"]
    expected = model.state_dict()
    assert set(got) == set(expected)
    moved = 0
    for name, weight in expected.items():
        # Adam's first step is lr·g/(|g| + ε): where |g| is near ε = 1e-8, the summation order of the gradients
        # (two ranks' halves, then a reduce-scatter) moves it by ~1e-6. 1e-5 is 1% of lr; a wrong sign would be 2e-3.
        torch.testing.assert_close(got[name], weight, rtol=0, atol=1e-5, msg=name)
        moved += not torch.equal(weight, single[0].state_dict()[name])
    assert moved > 10  # the step changed the weights


# --- whole runs ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy_model():
    """Whole runs use the toy task: its starting model writes the format and guesses letters, so rewards differ
    within groups and every update moves the weights (a random model earns nothing, and nothing would move)."""
    from plumbing import toy
    return toy.starting_model()  # built once here, not by two ranks at once


def run_args(out, *extra):
    # 2 prompts × 4 responses in one mini-batch of 8: each rank holds one prompt's group, and the update is that
    # of one process on both (several mini-batches per rollout would shuffle within each rank's share). Rank 0
    # logs its own groups: those drawn at random come from its share, so only the first are the same in both.
    return ["--data", "toy", "--out", str(out), "--prompts-per-step", "2", "--group-size", "4",
            "--max-new-tokens", "20", "--mini-batch-size", "8", "--micro-batch-size", "3", "--log-samples", "1",
            "--log-random-samples", "0",
            "--eval-every", "2", "--eval-limit", "4", *extra]


def assert_close_rows(got: list, expected: list, rel: float = 1e-4, abs_: float = 1e-6):
    """Row by row, key by key: counts and texts equal, floats within rel (or abs_ near 0)."""
    assert len(got) == len(expected)
    for a, b in zip(without_timings(got), without_timings(expected)):
        assert a.keys() == b.keys()
        for k in a:
            if isinstance(b[k], float):
                assert a[k] == pytest.approx(b[k], rel=rel, abs=abs_), (k, a[k], b[k])
            elif isinstance(b[k], list) and b[k] and isinstance(b[k][0], float):
                assert a[k] == pytest.approx(b[k], rel=rel, abs=abs_), (k, a[k], b[k])
            elif k != "world_size":
                assert a[k] == b[k], (k, a[k], b[k])


def test_a_two_rank_run_equals_one_process_and_resumes_exactly_after_a_signal_to_one_rank(toy_model, tmp_path):
    """A 2-rank run writes the metrics, samples and evaluations of one process doing the whole step (each rank
    samples its prompt's responses with the keys one process gives them; the gradients are summed), to a stated
    tolerance: floats within 1e-4 relative (the two ranks' halves of a sum are added in another order), counts
    and texts equal. Stopped by SIGINT to rank 1 alone, while that rank waits at step 2's rollout (so the signal
    lands before the run can end): both ranks finish step 2, save, exit 0; resumed, it writes exactly the lines of
    the uninterrupted 2-rank run."""
    steps = ["--steps", "4", "--save-every", "100"]
    command = [sys.executable, str(REPO / "apo.py"), *run_args(tmp_path / "full", *steps)]
    Processes(command, world=2).finish()
    full = {name: read_jsonl(tmp_path / "full" / f"{name}.jsonl") for name in ("metrics", "samples", "eval")}
    assert [m["step"] for m in full["metrics"]] == list(range(4)) and all(m["world_size"] == 2 for m in
                                                                         full["metrics"])
    assert [e["step"] for e in full["eval"]] == [0, 2, 4]
    assert all(m["response_tokens"] >= 8 for m in full["metrics"])  # 8 responses of the step, each counted once

    one = apo.train(apo.parse_args(run_args(tmp_path / "one", *steps)))  # the same run on one process
    for name in ("metrics", "samples", "eval"):
        assert_close_rows(read_jsonl(one / f"{name}.jsonl"), full[name])
    assert len({m["kl"] for m in full["metrics"]}) > 1 and full["metrics"][-1]["kl"] > 0  # the runs did move

    marker = tmp_path / "rank-1-waits"
    cut = Processes([sys.executable, str(PAUSED), "2", "1", str(marker), str(REPO / "apo.py"),
                     *run_args(tmp_path / "cut", *steps)], world=2)
    wait_for(marker, cut)
    cut.procs[1].send_signal(signal.SIGINT)
    outputs = cut.finish()
    assert "stopped by signal to another process" in outputs[0]
    saved = sorted((tmp_path / "cut").glob("checkpoint-*"))
    assert [p.name for p in saved] == ["checkpoint-000003"]  # step 2 finished, then the stop
    assert len(torch.load(saved[0] / "trainer_state.pt", weights_only=True)["rng"]) == 2  # RNG streams per rank

    Processes([sys.executable, str(REPO / "apo.py"), *run_args(tmp_path / "cut", *steps), "--resume"],
              world=2).finish()
    for name in ("metrics", "eval"):
        assert without_timings(read_jsonl(tmp_path / "cut" / f"{name}.jsonl")) == without_timings(full[name]), name
    assert read_jsonl(tmp_path / "cut" / "samples.jsonl") == full["samples"]


def test_fsdp_run_saves_shards_resumes_exactly_and_writes_a_plain_final(toy_model, tmp_path):
    steps = ["--steps", "2", "--save-every", "1", "--fsdp"]
    command = [sys.executable, str(REPO / "apo.py"), *run_args(tmp_path / "run", *steps)]
    Processes(command, world=2).finish()
    run = tmp_path / "run"
    assert (run / "checkpoint-000001" / "sharded" / ".metadata").exists()
    assert not (run / "checkpoint-000001" / "model.safetensors").exists()  # the weights are in sharded/
    first = read_jsonl(run / "metrics.jsonl")
    final, _ = models.load_model(str(run / "final"), torch.float32, torch.device("cpu"))  # a plain HF folder
    start_model, _ = models.load_model(str(toy_model), torch.float32, torch.device("cpu"))
    assert not all(torch.equal(a, b) for a, b in zip(final.state_dict().values(), start_model.state_dict().values()))

    import shutil
    shutil.rmtree(run / "final")  # as if killed before the end: the resume starts from checkpoint-000001's shards
    shutil.rmtree(run / "checkpoint-000002")
    Processes(command + ["--resume"], world=2).finish()
    assert without_timings(read_jsonl(run / "metrics.jsonl")) == without_timings(first)
    again, _ = models.load_model(str(run / "final"), torch.float32, torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), final.state_dict().values()))


def test_prompts_that_do_not_split_evenly_are_a_clear_error(toy_model, tmp_path):
    processes = Processes([sys.executable, str(REPO / "apo.py"), *run_args(tmp_path / "run", "--prompts-per-step",
                                                                          "3")], world=2)
    outputs = processes.finish(check=False)
    assert all(p.returncode != 0 for p in processes.procs)
    assert all("must divide by the number of processes (2)" in o for o in outputs)


def test_a_two_rank_lora_run_equals_one_process_and_rank_0_alone_logs_live(toy_model, tmp_path):
    """--lora-rank under torchrun: the adapters start alike on both ranks (seeded), their gradients are summed, and
    the run writes the metrics, samples and evaluations of one process doing the whole step (to the tolerance of the
    2-rank test above), and ends with its adapters; --report-to tensorboard: one writer, rank 0's."""
    from safetensors.torch import load_file
    steps = ["--steps", "2", "--save-every", "100", "--lora-rank", "4", "--lr", "5e-3", "--report-to", "tensorboard"]
    Processes([sys.executable, str(REPO / "apo.py"), *run_args(tmp_path / "two", *steps)], world=2).finish()
    one = apo.train(apo.parse_args(run_args(tmp_path / "one", *steps)))
    for name in ("metrics", "samples", "eval"):
        assert_close_rows(read_jsonl(tmp_path / "two" / f"{name}.jsonl"), read_jsonl(one / f"{name}.jsonl"))
    adapters = [load_file(run / "final" / "adapter" / "adapter_model.safetensors") for run in (tmp_path / "two", one)]
    assert adapters[0].keys() == adapters[1].keys() and all("lora_" in k for k in adapters[0])
    for k in adapters[0]:  # (Adam's first steps amplify the summation order, as in the FSDP test above)
        torch.testing.assert_close(adapters[0][k], adapters[1][k], rtol=0, atol=1e-5, msg=k)
    assert any("lora_B" in k and adapters[0][k].abs().sum() > 0 for k in adapters[0])  # B moved from 0
    assert len(list((tmp_path / "two" / "tensorboard").glob("events.out.tfevents.*"))) == 1
