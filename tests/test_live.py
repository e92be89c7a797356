"""--report-to tensorboard,wandb, read back from the files each backend writes: TensorBoard's event files
(tensorboard's EventAccumulator) and W&B's offline run (its .wandb record log, parsed here), for a run killed (SIGKILL)
after step 2 and resumed from its checkpoint at step 2: every metric of metrics.jsonl and evaluation of eval.jsonl
under its grouped name, at its step, with its value, and the samples, each step once. Neither package is imported
unless asked for; under torchrun rank 0 alone writes (tests/test_parallel.py)."""
import json
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from plumbing import pictures
from conftest import PAUSED, REPO, TIMING_KEYS, Processes, read_jsonl, wait_for
from test_run_folder import toy_args

pytestmark = pytest.mark.slow  # whole runs in processes of their own: the full suite only

WANDB_OFFLINE = dict(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_CONSOLE="off", WANDB_PROJECT="apo-tests")


@pytest.fixture(scope="module")
def killed_and_resumed(toy_dir, tmp_path_factory):
    """The toy's starting model (its rewards differ within groups: every metric has a value), 4 steps, checkpoints
    every 2, evaluations at 0, 2 and 4. Killed while it waits at step 3's rollout (steps 0-2 logged,
    checkpoint-000002 saved), then resumed: it redoes step 2 and goes on to the end."""
    out = tmp_path_factory.mktemp("live") / "run"
    args = toy_args(toy_dir, out, "--steps", "4", "--save-every", "2", "--eval-every", "2", "--eval-limit", "4",
                    "--report-to", "tensorboard,wandb")
    marker = out.parent / "waiting"
    run = Processes([sys.executable, str(PAUSED), "3", "0", str(marker), str(REPO / "apo.py"), *args],
                    **WANDB_OFFLINE)
    wait_for(marker, run)
    state = json.loads((out / "live.json").read_text())
    run.procs[0].send_signal(signal.SIGKILL)
    run.finish(check=False)
    assert state["tensorboard_written"] == {"eval": 2, "metrics": 2, "samples": 2}
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == [0, 1, 2]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-000002"]
    Processes([sys.executable, str(REPO / "apo.py"), *args, "--resume"], **WANDB_OFFLINE).finish()
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == [0, 1, 2, 3]  # step 2 was done again
    assert [e["step"] for e in read_jsonl(out / "eval.jsonl")] == [0, 2, 4]
    return out, state["wandb_id"]


def expected_scalars(out: Path) -> dict:
    """{(name, step): value} that the JSON lines hold: metrics as train/… or apo/…, evaluations as eval/…"""
    found = {}
    for log in ("metrics", "eval"):
        for row in read_jsonl(out / f"{log}.jsonl"):
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    found[(pictures.live_tag(log, key), row["step"])] = value
    assert ("train/reward", 3) in found and ("apo/dads_weight_pos_mean", 0) in found
    assert ("eval/accuracy", 4) in found and ("train/seconds_rollout", 2) in found
    return found


def assert_logged(got: list, expected: dict):
    """got: [(name, step, value)], each sent value. Every expected (name, step) once, nothing else; the values
    equal (as float32: TensorBoard's), except the timings of step 2, which the resumed run measured anew."""
    keys = [(name, step) for name, step, _ in got]
    assert len(keys) == len(set(keys)), "a step was logged twice"
    assert set(keys) == set(expected)
    for name, step, value in got:
        if not (step == 2 and name.removeprefix("train/") in TIMING_KEYS):
            assert value == pytest.approx(expected[(name, step)], rel=1e-6, abs=1e-12), (name, step)


def test_tensorboard_holds_every_metric_evaluation_and_sample_once_at_its_step(killed_and_resumed):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out, _ = killed_and_resumed
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2  # the first run's, the resumed one's
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    got = [(tag, e.step, e.value) for tag in events.Tags()["scalars"] for e in events.Scalars(tag)]
    assert_logged(got, expected_scalars(out))
    texts = events.Tensors("samples/text_summary")
    assert [t.step for t in texts] == [0, 1, 2, 3]
    samples = read_jsonl(out / "samples.jsonl")
    for text in texts:  # each step's table: its logged groups (the first prompt, one drawn at random), in order
        table = text.tensor_proto.string_val[0].decode().splitlines()
        groups = [s for s in samples if s["step"] == text.step]
        assert [s["chosen"] for s in groups] == ["first", "random"]
        assert table[0] == "problem | answer | response | reward | advantage"
        assert len(table) == 2 + sum(len(s["responses"]) for s in groups)
        cells = [(r, a) for s in groups for r, a in zip(s["rewards"], s["advantages"])]
        assert [line.endswith(f"| {r} | {a}") for line, (r, a) in zip(table[2:], cells)] == [True] * len(cells)


def wandb_records(path: Path):
    """The records of a .wandb file: a ':W&B' header (7 bytes), then LevelDB's log format (32 KiB blocks of
    records, each with a 7-byte header: CRC-32, length, and type: 1 whole, 2 first, 3 middle, 4 last part), each
    record a W&B `Record` protobuf message."""
    from wandb.proto import wandb_internal_pb2
    data, position, pending = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a header is padding
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_wandb_offline_continues_the_same_run_with_each_row_at_its_step(killed_and_resumed):
    """Both offline folders are the one run (the id kept in live.json). The resumed one holds exactly what the
    resumed run produced (steps 2 and 3, the evaluation at 4, the samples of 2 and 3), at their steps, with their
    values; the killed one a part of steps 0-2 (W&B writes its file every 15 s: a hard kill loses what is newer).
    That W&B keeps one value per step when it syncs them is its own rule (a resumed run ignores steps below its
    last one), which needs its server: not tested here."""
    out, run_id = killed_and_resumed
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(f"-{run_id}") for r in runs)
    expected = expected_scalars(out)
    logged = []
    for run in runs:
        records = list(wandb_records(run / f"run-{run_id}.wandb"))
        ids = [r.run.run_id for r in records if r.WhichOneof("record_type") == "run"]
        assert ids == [run_id] or (run is runs[0] and ids == [])  # (the killed run's may all be lost)
        got, tables = [], []
        for r in records:
            if r.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                got += [(k, items["_step"], v) for k, v in items.items() if "/" in k and not k.startswith("samples/")]
                tables += [items["_step"]] if items.get("samples/_type") == "table-file" else []
        logged.append((got, tables))
    (killed, killed_tables), (resumed, resumed_tables) = logged
    assert_logged(resumed, {k: v for k, v in expected.items() if k[1] >= 3 or (k[1] == 2 and k[0][:5] != "eval/")})
    assert resumed_tables == [2, 3]
    assert_logged(killed, {k: v for k, v in expected.items() if (k[0], k[1]) in {(n, s) for n, s, _ in killed}})
    assert {step for _, step, _ in killed} <= {0, 1, 2} and set(killed_tables) <= {0, 1, 2}
    table = json.loads(next((runs[1] / "files" / "media" / "table").glob("samples_2_*.table.json")).read_text())
    step_two = [s for s in read_jsonl(out / "samples.jsonl") if s["step"] == 2]
    assert table["columns"] == ["problem", "answer", "response", "reward", "advantage"]
    assert [row[2] for row in table["data"]] == [r for s in step_two for r in s["responses"]]


def test_no_live_logging_imports_neither_package(tmp_path):
    """--report-to none (the default) imports neither tensorboard nor wandb (nor peft without --lora-rank); an
    unknown backend is an error at once."""
    code = ("import sys, apo; from plumbing import pictures; from pathlib import Path; args = apo.parse_args([]); "
            "live = pictures.LiveLog(Path(sys.argv[1]), args.report_to, {}); live.log('metrics', [{'step': 0}]); "
            "live.close(); print(sorted(m for m in sys.modules if m.split('.')[0] in ('wandb', 'tensorboard', "
            "'peft') or m == 'torch.utils.tensorboard'))")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
    assert not (tmp_path / "live.json").exists()
    with pytest.raises(SystemExit, match="--report-to takes tensorboard, wandb"):
        pictures.LiveLog(tmp_path, "tensorbord", {})
