"""Many processes (parallel.py), on the CPU: gloo, 2 ranks started as torchrun starts them. Each result is compared
with one process doing the same work on all the responses."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import apo
import parallel_worker

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "parallel_worker.py"
TIMING_KEYS = {"seconds_rollout", "seconds_reward", "seconds_logprobs", "seconds_update", "seconds"}


def start(command: list, world: int = 2) -> list:
    """`world` processes of `command`, with the environment torchrun gives its workers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [subprocess.Popen(command, env=dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world),
                                               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HF_HUB_OFFLINE="1",
                                               PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]


def finish(processes: list) -> list:
    outputs = [p.communicate()[0] for p in processes]
    for p, output in zip(processes, outputs):
        assert p.returncode == 0, output[-4000:]
    return outputs


def run_worker(task, model_dir, out, **options):
    out.mkdir(parents=True, exist_ok=True)
    finish(start([sys.executable, str(WORKER), task, str(model_dir), str(out), json.dumps(options)]))


@pytest.fixture(scope="module")
def single(tiny_model_dir):
    """The single-process route: the tiny model and the shared batch, in this process."""
    torch.set_num_threads(1)
    model, processor = apo.load_model(str(tiny_model_dir), torch.float32, torch.device("cpu"))
    return model, processor, parallel_worker.make_batch(model, processor)


@pytest.mark.parametrize("agg, micro, checkpointing", [("token", 3, True), ("sequence", 3, True)])
def test_two_ranks_give_the_gradient_of_one_process(tiny_model_dir, single, tmp_path, agg, micro, checkpointing):
    """Each rank holds half of a mini-batch of 8 responses (14 and 15 tokens); the gradients summed over the ranks
    equal the gradient of one process on all 8, for both loss aggregations, with micro-batches and checkpointing."""
    model, processor, batch = single
    run_worker("gradients", tiny_model_dir, tmp_path, agg=agg, micro=micro, checkpointing=checkpointing)
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    model.zero_grad(set_to_none=True)
    args = parallel_worker.args_for({"agg": agg, "micro": micro})
    expected_stats = apo.minibatch_gradients(model, batch, list(range(8)), args)
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
            assert got["stats"][k] == pytest.approx(v, rel=1e-6, abs=1e-9), k


def test_bf16_replicas_stay_bit_identical(tiny_model_dir, tmp_path):
    """Three bf16 updates with stochastic rounding: both ranks' weights are the same to the bit (the rounding draws
    from a generator seeded alike on every rank), and they did move."""
    run_worker("updates", tiny_model_dir, tmp_path, bf16=True, steps=3)
    digests = [(tmp_path / f"digest-{r}.txt").read_text() for r in (0, 1)]
    assert digests[0] == digests[1]
    start_model, _ = apo.load_model(str(tiny_model_dir), torch.bfloat16, torch.device("cpu"))
    assert digests[0] != parallel_worker.weights_digest(start_model)


def test_fsdp_update_equals_the_unsharded_one(tiny_model_dir, single, tmp_path):
    """One optimizer step with FSDP2 (weights, gradients and Adam moments sharded over 2 ranks, the batch split,
    gradient checkpointing on) gives the weights of one process updating on the whole batch (fp32)."""
    run_worker("updates", tiny_model_dir, tmp_path, fsdp=True, steps=1, checkpointing=True)
    model, processor = apo.load_model(str(tiny_model_dir), torch.float32, torch.device("cpu"))
    model.train()
    batch = parallel_worker.make_batch(model, processor)
    model.train()
    apo.update_policy(model, batch, apo.AdamW(model.parameters(), lr=1e-3, seed=0),
                      parallel_worker.args_for({}), [1e-3])
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
    import toy
    return toy.starting_model()  # built once here, not by two ranks at once


def run_args(out, *extra):
    return ["--data", "toy", "--out", str(out), "--prompts-per-step", "2", "--group-size", "4",
            "--max-new-tokens", "20", "--mini-batch-size", "4", "--micro-batch-size", "3", "--log-samples", "1",
            "--eval-every", "2", "--eval-limit", "4", *extra]


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def strip(rows):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def test_two_rank_run_stopped_by_a_signal_to_one_rank_resumes_exactly(toy_model, tmp_path):
    """A 2-rank run: SIGINT to rank 1 alone after the first step; both ranks finish the step, save, exit 0. Resumed,
    it writes the metrics, samples and evaluations of an uninterrupted 2-rank run."""
    steps = ["--steps", "6", "--save-every", "100"]  # (room for the signal to land before the run ends)
    command = lambda out: [sys.executable, str(REPO / "apo.py"), *run_args(out, *steps)]  # noqa: E731
    finish(start(command(tmp_path / "full")))
    metrics = read_jsonl(tmp_path / "full" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(6)) and all(m["world_size"] == 2 for m in metrics)
    assert [e["step"] for e in read_jsonl(tmp_path / "full" / "eval.jsonl")] == [0, 2, 4, 6]

    cut = start(command(tmp_path / "cut"))
    metrics_file = tmp_path / "cut" / "metrics.jsonl"
    while not (metrics_file.exists() and metrics_file.read_text().count("\n") >= 1):
        assert all(p.poll() is None for p in cut)
        time.sleep(0.05)
    cut[1].send_signal(signal.SIGINT)
    outputs = finish(cut)
    assert "stopped by signal to another process" in outputs[0]
    saved = sorted((tmp_path / "cut").glob("checkpoint-*"))
    assert len(saved) == 1 and int(saved[0].name.split("-")[1]) < 6
    assert len(torch.load(saved[0] / "trainer_state.pt", weights_only=True)["rng"]) == 2  # RNG streams per rank

    finish(start(command(tmp_path / "cut") + ["--resume"]))
    for name in ("metrics", "eval"):
        assert strip(read_jsonl(tmp_path / "cut" / f"{name}.jsonl")) == strip(read_jsonl(tmp_path / "full" /
                                                                                          f"{name}.jsonl")), name
    assert read_jsonl(tmp_path / "cut" / "samples.jsonl") == read_jsonl(tmp_path / "full" / "samples.jsonl")


def test_fsdp_run_saves_shards_resumes_exactly_and_writes_a_plain_final(toy_model, tmp_path):
    steps = ["--steps", "2", "--save-every", "1", "--fsdp"]
    command = [sys.executable, str(REPO / "apo.py"), *run_args(tmp_path / "run", *steps)]
    finish(start(command))
    run = tmp_path / "run"
    assert (run / "checkpoint-000001" / "sharded" / ".metadata").exists()
    assert not (run / "checkpoint-000001" / "model.safetensors").exists()  # the weights are in sharded/
    first = read_jsonl(run / "metrics.jsonl")
    final, _ = apo.load_model(str(run / "final"), torch.float32, torch.device("cpu"))  # a plain HF folder
    start_model, _ = apo.load_model(str(toy_model), torch.float32, torch.device("cpu"))
    assert not all(torch.equal(a, b) for a, b in zip(final.state_dict().values(), start_model.state_dict().values()))

    import shutil
    shutil.rmtree(run / "final")  # as if killed before the end: the resume starts from checkpoint-000001's shards
    shutil.rmtree(run / "checkpoint-000002")
    finish(start(command + ["--resume"]))
    assert strip(read_jsonl(run / "metrics.jsonl")) == strip(first)
    again, _ = apo.load_model(str(run / "final"), torch.float32, torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), final.state_dict().values()))


def test_prompts_that_do_not_split_evenly_are_a_clear_error(toy_model, tmp_path):
    processes = start([sys.executable, str(REPO / "apo.py"), *run_args(tmp_path / "run", "--prompts-per-step", "3")])
    outputs = [p.communicate()[0] for p in processes]
    assert all(p.returncode != 0 for p in processes)
    assert all("must divide by the number of processes (2)" in o for o in outputs)
