"""Shared fixtures: a tiny random Qwen2.5-VL built locally, geo3k-layout data from the real sample problems, and
processes started as a user (or torchrun) starts them, each with a deadline."""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests never reach the Hub
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402

GEO3K_SAMPLE = Path(__file__).resolve().parent / "data" / "geo3k_sample"  # ten real problems (its README)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: whole runs, several processes, the notebook (README: the fast tier "
                                       "is `-m \"not slow\"`)")


def geo3k_rows() -> list:
    """The real geometry3k sample in the Hub's row format: images, '<image>' + problem text, the right choice's text."""
    rows = []
    for folder in sorted(GEO3K_SAMPLE.iterdir(), key=lambda p: p.name):
        if not (folder / "data.json").exists():
            continue
        meta = json.loads((folder / "data.json").read_text())
        rows.append({"images": [{"bytes": (folder / "img_diagram.png").read_bytes(), "path": None}],
                     "problem": "<image>" + meta["problem_text"],
                     "answer": meta["choices"][ord(meta["answer"]) - ord("A")], "id": meta["id"]})
    assert len(rows) == 10, f"the geometry3k sample at {GEO3K_SAMPLE} is incomplete"  # a fixture never skips
    return rows


def write_hub_layout(folder: Path, splits: dict) -> Path:
    """A local folder laid out like a Hub dataset repo: data/<split>-00000-of-00001.parquet."""
    import datasets
    features = datasets.Features({"images": datasets.Sequence(datasets.Image()), "problem": datasets.Value("string"),
                                  "answer": datasets.Value("string"), "id": datasets.Value("int64")})
    (folder / "data").mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        datasets.Dataset.from_list(rows, features=features).to_parquet(
            str(folder / "data" / f"{split}-00000-of-00001.parquet"))
    return folder


def png_bytes(color="white", size=(56, 56), image=None) -> bytes:
    """A PNG of one colour, or of `image`."""
    from PIL import Image
    buffer = io.BytesIO()
    (image or Image.new("RGB", size, color)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from plumbing import toy
    return toy.build_model_folder(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def toy_dir(tmp_path_factory) -> Path:
    """The toy task in the Hub layout, small: 64 training images, 16 held-out ones. Runs on it use the toy's
    starting model (`--model toy`), which writes the format and guesses letters: rewards differ within groups, so
    every update moves the weights (a random model earns nothing, and nothing would move)."""
    from plumbing import toy
    toy.starting_model()  # built once, before any run (or two processes at once) needs it
    rows = lambda split, n: [dict(r, images=[{"bytes": png_bytes(image=r["images"][0]), "path": None}], id=i)  # noqa
                             for i, r in enumerate(toy.toy_rows(split, seed=0)[:n])]
    return write_hub_layout(tmp_path_factory.mktemp("toy") / "toy", {"train": rows("train", 64),
                                                                      "test": rows("test", 16)})


@pytest.fixture(scope="session")
def geo3k_dir(tmp_path_factory) -> Path:
    rows = geo3k_rows()
    return write_hub_layout(tmp_path_factory.mktemp("geo3k") / "geometry3k", {"train": rows[:8], "test": rows[8:]})


# ------------------------------------------------------------------------------------------------ gradients
class KeepGradients:
    """An optimizer for apo.update_policy that takes no step: at each step it keeps a copy of the gradients."""

    def __init__(self, params):
        self.params = list(params)
        self.param_groups = [{"params": self.params, "lr": 0.0}]
        self.grads = []

    def zero_grad(self, set_to_none: bool = True):
        for p in self.params:
            p.grad = None

    def step(self):
        self.grads.append([None if p.grad is None else p.grad.clone() for p in self.params])


def minibatch_gradients(model, batch: dict, rows: list, args) -> dict:
    """The gradient of the APO loss over the responses `rows` of a rollout batch, as apo.update_policy computes it
    for one mini-batch (its micro-batches and normalizers; on many processes, `rows` are this one's share), left in
    the parameters' .grad (unclipped, no optimizer step). Returns the update's stats."""
    import dataclasses
    import math

    import apo
    import rollout
    from plumbing import parallel

    keep = KeepGradients(model.parameters())
    settings = dataclasses.replace(args, mini_batch_size=len(rows) * parallel.world(), grad_clip=math.inf)
    stats = apo.update_policy(model, rollout.select(batch, rows), keep, settings, [0.0])
    for p, grad in zip(keep.params, keep.grads[0]):
        p.grad = grad
    return {k: v for k, v in stats.items() if k not in ("finite", "grad_norm")}


# ------------------------------------------------------------------------------------------------ processes
REPO = Path(__file__).resolve().parents[1]
DEADLINE_S = 900  # a hung process fails its test with its output, instead of hanging the suite
PAUSED = REPO / "tests" / "paused_run.py"  # apo.py that waits for a signal before a given step
TIMING_KEYS = {"seconds_rollout", "seconds_reward", "seconds_logprobs", "seconds_update"}  # metrics.jsonl's


def read_jsonl(path) -> list:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def without_timings(rows: list) -> list:
    """Log rows without their timings (TIMING_KEYS, and eval.jsonl's "seconds"): the same in two runs that agree."""
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS | {"seconds"}} for r in rows]


class Processes:
    """`world` processes of `command` with the environment torchrun gives its workers (RANK, WORLD_SIZE, ...).

    The rendezvous store is served by this process, as torchrun's agent serves it
    (TORCHELASTIC_USE_AGENT_STORE): it holds its port from the start, so no other program can take the port
    between its choice and the ranks' connecting (binding port 0, closing, and handing the number on could)."""

    def __init__(self, command: list, world: int = 1, **env):
        self.store = None
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **env)
        if world > 1:
            from torch.distributed import TCPStore
            self.store = TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False)
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(self.store.port), WORLD_SIZE=str(world),
                       TORCHELASTIC_USE_AGENT_STORE="True", OMP_NUM_THREADS="1")
        self.procs = [subprocess.Popen(command, env=dict(env, **({"RANK": str(r), "LOCAL_RANK": str(r)}
                                                                  if world > 1 else {})),
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
                      for r in range(world)]

    def finish(self, check: bool = True) -> list:
        """Every process's output, once all have exited (0 unless check=False) within DEADLINE_S."""
        outputs = []
        for p in self.procs:
            try:
                outputs.append(p.communicate(timeout=DEADLINE_S)[0])
            except subprocess.TimeoutExpired:
                for q in self.procs:
                    q.kill()
                raise AssertionError(f"a process ran past {DEADLINE_S} s: {p.args}\n{p.communicate()[0][-4000:]}")
        if check:
            for p, output in zip(self.procs, outputs):
                assert p.returncode == 0, output[-4000:]
        return outputs


def wait_for(path: Path, processes: Processes):
    """Until `path` exists; a process exiting first fails the test with its output (and so does the deadline)."""
    import time
    deadline = time.monotonic() + DEADLINE_S
    while not path.exists():
        for p in processes.procs:
            assert p.poll() is None, p.communicate()[0][-4000:]
        assert time.monotonic() < deadline, f"{path} did not appear within {DEADLINE_S} s"
        time.sleep(0.02)
