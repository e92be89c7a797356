"""A user's mistakes, as a new user makes them: a bad flag stops before anything loads (argparse's message, exit 2);
a model or data source that cannot be found or read stops in one line that names it and says what to do (exit 1);
neither leaves a traceback, nor a run folder. The project's own errors keep their tracebacks."""
import json
import sys

import datasets
import pytest

import apo
from plumbing import data, flags, models, run_folder
from tools import bench
import eval as evaluate
from conftest import REPO, Processes, png_bytes

# ------------------------------------------------------------------------------------------------------- flags
# (argv, the message after "error: "): every entry of flags.RANGES fails here at least once (checked below)
BAD_FLAGS = [
    (["--mini-batch-size", "0"], "argument --mini-batch-size: must be >= 1, got 0"),
    (["--prompts-per-step", "0"], "argument --prompts-per-step: must be >= 1, got 0"),
    (["--temperature", "0"], "argument --temperature: must be > 0 (responses are sampled), got 0.0"),
    (["--max-new-tokens", "0"], "argument --max-new-tokens: must be >= 1, got 0"),
    (["--lr", "-1"], "argument --lr: must be > 0, got -1.0"),
    (["--kl-beta", "-1"], "argument --kl-beta: must be >= 0 (0: no reference model), got -1.0"),
    (["--steps", "-1"], "argument --steps: must be >= 0 (0: --epochs passes over the data), got -1"),
    (["--group-size", "1"], "argument --group-size: must be >= 2 (advantages are relative to the group), got 1"),
    (["--lora-rank", "-8"], "argument --lora-rank: must be >= 0 (0: all parameters, no LoRA), got -8"),
    (["--lora-alpha", "-1"], "argument --lora-alpha: must be >= 0 (0: twice the rank), got -1.0"),
    (["--lora-dropout", "1"], "argument --lora-dropout: must be in [0, 1), got 1.0"),
    (["--report-to", "mlflow"], "argument --report-to: must be tensorboard, wandb, both (comma-separated) or none, "
                                "got 'mlflow'"),
    (["--clip-eps", "0"], "argument --clip-eps: must be > 0, got 0.0"),
    (["--stcr-base", "0.99"], "argument --stcr-base: must be >= 1 (1: no STCR weight; below 1 it would favour "
                              "long wrong answers), got 0.99"),
    (["--min-lr", "-0.1"], "argument --min-lr: must be >= 0, got -0.1"),
    (["--min-lr", "1e-5"], "argument --min-lr: must be <= --lr (1e-06), got 1e-05"),
    # a value the preset set, not the user, is named as the preset's (the toy's rate is constant: min_lr = lr)
    (["--data", "toy", "--lr", "5e-4"], "argument --min-lr: must be <= --lr (0.0005), got 0.001 (--min-lr is the "
                                        "preset's: give it too)"),
    (["--data", "toy", "--min-lr=2e-3"], "argument --min-lr: must be <= --lr (0.001), got 0.002 (--lr is the "
                                         "preset's: give it too)"),
    (["--warmup-ratio", "1"], "argument --warmup-ratio: must be in [0, 1), got 1.0"),
    (["--adam-betas", "0.9", "1"], "argument --adam-betas: must be two numbers in [0, 1), got (0.9, 1.0)"),
    (["--weight-decay", "-0.1"], "argument --weight-decay: must be >= 0, got -0.1"),
    (["--grad-clip", "0"], "argument --grad-clip: must be > 0, got 0.0"),
    (["--loss-agg", "median"], "argument --loss-agg: must be 'token' or 'sequence', got 'median'"),
    (["--top-p", "0"], "argument --top-p: must be in (0, 1], got 0.0"),
    (["--top-p", "1.5"], "argument --top-p: must be in (0, 1], got 1.5"),
    (["--epochs", "0"], "argument --epochs: must be >= 1, got 0"),
    (["--seed", str(2 ** 70)], f"argument --seed: must be an integer in (-2^62, 2^62), got {2 ** 70}"),
    (["--model", ""], "argument --model: must be a Hub id or a folder, got ''"),
    (["--data", ""], "argument --data: must be a data set: geo3k, toy, a Hub id, a folder or a file, got ''"),
    (["--max-prompt-tokens", "0"], "argument --max-prompt-tokens: must be >= 1, got 0"),
    (["--min-pixels", "0"], "argument --min-pixels: must be >= 1, got 0"),
    (["--max-pixels", "0"], "argument --max-pixels: must be >= 1, got 0"),
    (["--min-pixels", "500000"], "argument --min-pixels: must be <= --max-pixels (401408), got 500000"),
    (["--out", ""], "argument --out: must be a folder name, got ''"),
    (["--eval-every", "-1"], "argument --eval-every: must be >= 0 (0: never), got -1"),
    (["--eval-limit", "-1"], "argument --eval-limit: must be >= 0 (0: all), got -1"),
    (["--save-every", "0"], "argument --save-every: must be >= 1, got 0"),
    (["--keep-last", "-1"], "argument --keep-last: must be >= 0 (0: all), got -1"),
    (["--log-samples", "-1"], "argument --log-samples: must be >= 0, got -1"),
    (["--log-random-samples", "-2"], "argument --log-random-samples: must be >= 0, got -2"),
    (["--device", "tpu"], "argument --device: must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'tpu'"),
    (["--device", "cuda:x"], "argument --device: must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'cuda:x'"),
    (["--dtype", "float16"], "argument --dtype: must be 'auto', 'bfloat16' or 'float32', got 'float16'"),
    (["--micro-batch-size", "0"], "argument --micro-batch-size: must be >= 1, got 0"),
    (["--generation-batch-size", "-1"], "argument --generation-batch-size: must be >= 0 (0: all B·G at once), "
                                        "got -1"),
    (["--logprob-chunk", "0"], "argument --logprob-chunk: must be >= 1, got 0"),
    (["--max-bad-updates", "0"], "argument --max-bad-updates: must be >= 1, got 0"),
    (["--lr", "inf"], "argument --lr: must be a finite number, got inf"),
    (["--kl-beta", "nan"], "argument --kl-beta: must be a finite number, got nan"),
    (["--data", "toy", "--lr", "0"], "argument --lr: must be > 0, got 0.0"),  # a preset's values are checked too
    (["--preset", "paper"], "argument --preset: must be one of authors, toy, toy-graded, toy-lora, got 'paper'"),
]


@pytest.mark.parametrize("argv, message", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_a_bad_flag_stops_with_argparses_kind_of_message(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        apo.parse_args(argv)
    assert stop.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(f": error: {message}")


def test_every_numeric_flag_has_a_range_and_every_range_can_fail():
    """A new numeric field of Args needs its line in RANGES; a line naming no field would never be checked."""
    numeric = {f.name for f in apo.dataclasses.fields(apo.Args) if f.type in (int, float, tuple)}
    ranged = [name for name, _, _ in flags.RANGES]
    assert numeric <= set(ranged) <= {f.name for f in apo.dataclasses.fields(apo.Args)}
    assert len(ranged) == len(set(ranged))
    failing = {message.split()[1].rstrip(":") for _, message in BAD_FLAGS}
    assert {"--" + name.replace("_", "-") for name in ranged} <= failing


def test_the_edges_of_each_range_are_allowed():
    args = apo.parse_args(["--kl-beta", "0", "--stcr-base", "1", "--min-lr", "1e-6", "--warmup-ratio", "0",
                           "--adam-betas", "0", "0.999", "--weight-decay", "0", "--top-p", "1", "--steps", "0",
                           "--seed", "-1", "--eval-every", "0", "--eval-limit", "0", "--keep-last", "0",
                           "--log-samples", "0", "--log-random-samples", "0", "--generation-batch-size", "0", "--min-pixels", "401408",
                           "--device", "cuda:1", "--mini-batch-size", "1", "--prompts-per-step", "1"])
    assert (args.kl_beta, args.min_lr, args.adam_betas, args.seed, args.device) == (0, 1e-6, (0, 0.999), -1,
                                                                                      "cuda:1")
    for preset in apo.PRESETS:  # the presets' own values are in range
        apo.parse_args(["--preset", preset])


@pytest.mark.parametrize("argv, message", [
    (["--samples", "-1"], "argument --samples: must be >= 0 (0: none), got -1"),
    (["--samples", "4", "--temperature", "0"], "argument --temperature: must be > 0 (responses are sampled), got 0.0"),
    (["--max-new-tokens", "-1"], "argument --max-new-tokens: must be >= 0 (0: the default), got -1"),
    (["--max-pixels", "-1"], "argument --max-pixels: must be >= 0 (0: training's), got -1"),
    (["--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (["--limit", "-1"], "argument --limit: must be >= 0 (0: all), got -1"),
    (["--device", "gpu"], "argument --device: must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
    (["--dtype", "fp16"], "argument --dtype: must be 'auto', 'bfloat16' or 'float32', got 'fp16'"),
    (["--seed", str(-2 ** 63)], f"argument --seed: must be an integer in (-2^62, 2^62), got {-2 ** 63}"),
])
def test_a_bad_flag_of_eval_stops_before_anything_loads(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(evaluate.data, "load_table", lambda *a, **k: pytest.fail("the data loaded"))
    with pytest.raises(SystemExit) as stop:
        evaluate.main(argv)
    assert stop.value.code == 2 and capsys.readouterr().err.splitlines()[-1].endswith(f": error: {message}")


def test_eval_temperature_matters_only_with_samples(monkeypatch):
    """--temperature 0 without --samples is never used: not an error (the run goes on to load the data)."""
    class Loading(Exception):
        pass
    monkeypatch.setattr(evaluate, "load_examples", lambda *a, **k: (_ for _ in ()).throw(Loading()))
    with pytest.raises(Loading):
        evaluate.main(["--temperature", "0", "--data", "toy", "--device", "cpu"])


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "argument --steps: must be >= 1 (the last is reported), got 0"),
    (["--threads", "0"], "argument --threads: must be >= 1, got 0"),
    (["--image-size", "0", "28"], "argument --image-size: must be two sizes >= 1, got (0, 28)"),
    (["--target-gib", "0"], "argument --target-gib: must be > 0, got 0.0"),
    (["--target-gib", "-1"], "argument --target-gib: must be > 0, got -1.0"),
    (["--mini-batch-size", "0"], "argument --mini-batch-size: must be >= 1, got 0"),  # training's flags, its ranges
    (["--kl-beta", "-1"], "argument --kl-beta: must be >= 0 (0: no reference model), got -1.0"),
    (["--min-pixels", "4000"], "argument --min-pixels: must be <= --max-pixels (3136), got 4000"),  # tiny's max
    (["--seed", str(2 ** 62)], f"argument --seed: must be an integer in (-2^62, 2^62), got {2 ** 62}"),
])
def test_a_bad_flag_of_bench_stops_before_anything_runs(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        bench.parse_args(["--config", "tiny", "--out", "b.json", *argv])
    assert stop.value.code == 2 and capsys.readouterr().err.splitlines()[-1].endswith(f": error: {message}")


def test_each_range_of_bench_names_a_flag_it_has():
    known = vars(bench.parse_args(["--config", "tiny", "--out", "b.json"])[0])
    assert {name for name, _, _ in bench.RANGES} <= set(known)


# ------------------------------------------------------------------------------------------- missing resources
@pytest.fixture(scope="module")
def sources(tmp_path_factory, tiny_model_dir):
    """Models and data as users get them wrong."""
    root = tmp_path_factory.mktemp("wrong")
    (root / "no_config").mkdir()
    (root / "no_weights").mkdir()
    (root / "no_weights" / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    (root / "llama").mkdir()
    config = json.loads((tiny_model_dir / "config.json").read_text())
    (root / "llama" / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    row = {"images": [{"bytes": png_bytes(), "path": None}], "problem": "<image>Find x.", "answer": "3"}
    (root / "broken.jsonl").write_text('{"problem": "Find x.", "answer": "3"}\n{"problem": "Find y.", "answer": 3\n')
    (root / "broken.json").write_text('[{"problem": "Find x.",\n  "answer": "3"},\n {"problem" "Find y."}]')
    (root / "empty.jsonl").write_text("")
    (root / "blank.jsonl").write_text("\n  \n")
    (root / "fake.parquet").write_text("problem,answer\nFind x.,3\n")
    (root / "rows.csv").write_text("problem,answer\nFind x.,3\n")
    (root / "empty").mkdir()
    datasets.Dataset.from_list([{"image": row["images"], "question": "Find x.", "answer": "3"}]).to_parquet(
        str(root / "renamed.parquet"))
    return root


def train_args(model, data_source, out, *extra):
    return apo.parse_args(["--model", str(model), "--data", str(data_source), "--out", str(out), "--device", "cpu",
                           "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "4", *extra])


MISSING = [  # (--model, --data, extra flags, what the message says); {root}: the `sources` folder
    ("{root}/nowhere", "{geo}", [], "model {root}/nowhere: no such folder"),
    ("{root}/no_config", "{geo}", [], "model {root}/no_config: not a checkpoint folder (no config.json in it)"),
    ("{root}/llama", "{geo}", [], "model {root}/llama: a 'llama' checkpoint; this project trains Qwen2.5-VL"),
    ("{root}/no_weights", "{geo}", [], "model {root}/no_weights: Error no file named model.safetensors found"),
    ("Qwen/Qwen2.5-VL-3B-Instruct", "{geo}", [], "model Qwen/Qwen2.5-VL-3B-Instruct: no such folder, and the Hub "
     "cannot be reached to download it (HF_HUB_OFFLINE is set): pass a local folder with --model PATH, or connect "
     "to the Hub"),
    ("{tiny}", "geo3k", [], "hiyouga/geometry3k: not a local file or folder, and the Hub cannot be reached "
     "(HF_HUB_OFFLINE is set) to download this data set, nor does its cache hold it. Pass a local copy with --data: "
     "a folder in the Hub layout (data/train-*.parquet; `hf download hiyouga/geometry3k --repo-type dataset "
     "--local-dir DIR` makes one where the Hub can be reached), or a .parquet or .jsonl file"),
    ("{tiny}", "{root}/nowhere.jsonl", [], "{root}/nowhere.jsonl: no such file"),
    ("{tiny}", "{root}/nowhere/geo3k", [], "{root}/nowhere/geo3k: no such file or folder"),
    ("{tiny}", "{root}/empty", [], "{root}/empty: no data files in this folder (the Hub layout: "
     "data/train-*.parquet, ...)"),
    ("{tiny}", "{root}/broken.jsonl", [], "{root}/broken.jsonl: not JSON at line 2, column 35 (Expecting ',' "
     "delimiter)"),
    ("{tiny}", "{root}/broken.json", [], "{root}/broken.json: not JSON at line 3, column 13 (Expecting ':' "
     "delimiter)"),
    ("{tiny}", "{root}/empty.jsonl", [], "{root}/empty.jsonl: the file is empty"),
    ("{tiny}", "{root}/blank.jsonl", [], "{root}/blank.jsonl: the file is empty"),
    ("{tiny}", "{root}/fake.parquet", [], "{root}/fake.parquet: not a parquet file"),
    ("{tiny}", "{root}/rows.csv", [], "{root}/rows.csv: a file, but not .parquet, .json or .jsonl"),
    ("{tiny}", "{root}/renamed.parquet", [], "{root}/renamed.parquet: column(s) ['images', 'problem'] not found; "
     "it has ['image', 'question', 'answer']. Name the right ones with --image-column"),
    ("{tiny}", "{geo}", ["--split", "validation"], "{geo}: no split 'validation' (Unknown split"),
    ("{tiny}", "toy", ["--split", "validation"], "toy: no split 'validation'; it has train, test"),
    ("{tiny}", "{geo}", ["--epochs", "1", "--prompts-per-step", "9"], "--epochs 1 over the 8 rows of {geo} make no "
     "step of --prompts-per-step 9: pass --steps N"),
    ("{tiny}", "{geo}", ["--eval-data", "{root}/nowhere"], "{root}/nowhere: no such file or folder"),
]


@pytest.mark.parametrize("model, source, extra, message", MISSING, ids=[m.format(root="", geo="", tiny="")[:60]
                                                                         for *_, m in MISSING])
def test_a_missing_resource_stops_in_one_line_and_makes_no_run_folder(model, source, extra, message, sources,
                                                                      tiny_model_dir, geo3k_dir, tmp_path):
    where = dict(root=sources, geo=geo3k_dir, tiny=tiny_model_dir)
    with pytest.raises(SystemExit) as stop:
        apo.train(train_args(model.format(**where), source.format(**where), tmp_path / "run",
                             *[e.format(**where) for e in extra]))
    assert isinstance(stop.value.code, str) and "\n" not in stop.value.code  # one line, exit status 1
    assert stop.value.code.startswith(message.format(**where)), stop.value.code
    assert not (tmp_path / "run").exists()


def test_the_out_folder_and_the_device(tiny_model_dir, geo3k_dir, tmp_path, monkeypatch):
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(SystemExit, match=f"--out {tmp_path}/taken: a file, not a folder"):
        apo.train(train_args(tiny_model_dir, geo3k_dir, tmp_path / "taken"))
    monkeypatch.setattr(run_folder.torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SystemExit, match=r"--device cuda:1: 1 CUDA GPU\(s\) found; pass --device cpu"):
        models.resolve_device("cuda:1", "auto", "toy", "toy")


def test_a_hub_model_that_does_not_exist(monkeypatch):
    """With the Hub reachable, a wrong id: transformers' OSError raised from huggingface_hub's RepositoryNotFoundError
    (as it raises it; the Hub itself is not reached in the tests)."""
    import httpx
    import transformers
    from huggingface_hub.errors import RepositoryNotFoundError

    def not_found(name, **kwargs):
        response = httpx.Response(404, request=httpx.Request("GET", f"https://huggingface.co/{name}"))
        try:
            raise RepositoryNotFoundError("404 Client Error: Repository Not Found", response=response)
        except RepositoryNotFoundError as err:
            raise OSError(f"{name} is not a local folder and is not a valid model identifier") from err
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", not_found)
    with pytest.raises(SystemExit, match="model Qwen/Qwen2.5-VL-3B-Instruc: no such folder, nor a model on the Hub "
                                         r"that this login may read \(a private or gated one needs `hf auth login`"):
        models.model_config("Qwen/Qwen2.5-VL-3B-Instruc")


def test_other_errors_keep_their_tracebacks(monkeypatch, geo3k_dir):
    """Only the mistakes named are turned into messages: an error of another kind goes through as it was raised."""
    import transformers
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("No space left on device")))
    with pytest.raises(OSError, match="No space left"):
        models.model_config("Qwen/Qwen2.5-VL-3B-Instruct")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: (_ for _ in ()).throw(ValueError("a bug")))
    with pytest.raises(ValueError, match="a bug"):
        data.read_dataset(str(geo3k_dir))


def test_no_such_split_skips_the_held_out_evaluation(geo3k_dir):
    said = []
    assert data.held_out_examples(str(geo3k_dir), "validation", data.COLUMNS, 0, None, 784, 3136, 1024,
                                  said.append) == []
    assert said == [f"no held-out evaluation: {geo3k_dir}: no split 'validation' (Unknown split \"validation\". "
                    "Should be one of ['train', 'test'].)"]


def test_eval_names_a_missing_model_or_run_folder_before_it_loads_anything(tiny_model_dir, monkeypatch, tmp_path):
    monkeypatch.setattr(evaluate, "load_examples", lambda *a, **k: pytest.fail("the data loaded"))
    with pytest.raises(SystemExit, match=f"model {tmp_path}/baseline: no such folder"):
        evaluate.main(["--model", str(tiny_model_dir), "--baseline", str(tmp_path / "baseline"), "--device", "cpu"])
    with pytest.raises(SystemExit, match=f"--plot {tmp_path}: not a run folder \\(no metrics.jsonl in it\\)"):
        evaluate.main(["--plot", str(tmp_path), "--out", str(tmp_path / "c.png")])


# ------------------------------------------------------------------------------------ a run that never started
def test_a_run_that_fails_before_its_first_step_does_not_block_a_retry(tiny_model_dir, geo3k_dir, tmp_path,
                                                                       monkeypatch):
    """It fails after the step-0 evaluation (here a bug: its traceback stays): the retry, in the same folder, is a
    new run, whose logs are its own (its own step-0 evaluation: of 2 problems, not the 1 of the failed run)."""
    def bug(*args, **kwargs):
        raise RuntimeError("a bug in the first step")
    args = ["--steps", "1", "--eval-every", "1", "--mini-batch-size", "4"]
    with monkeypatch.context() as patch:
        patch.setattr(apo, "apo_step", bug)
        with pytest.raises(RuntimeError, match="a bug in the first step"):
            apo.train(train_args(tiny_model_dir, geo3k_dir, tmp_path / "run", *args, "--eval-limit", "1"))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["args.json", "eval.jsonl"]
    apo.train(train_args(tiny_model_dir, geo3k_dir, tmp_path / "run", *args))
    lines = lambda name: [json.loads(line) for line in (tmp_path / "run" / f"{name}.jsonl").read_text().splitlines()]
    assert [(e["step"], e["problems"]) for e in lines("eval")] == [(0, 2), (1, 2)] and len(lines("metrics")) == 1
    with pytest.raises(SystemExit, match="already holds a run: pass --resume"):  # one step done: a run, kept
        apo.train(train_args(tiny_model_dir, geo3k_dir, tmp_path / "run", *args))


# ---------------------------------------------------------------------------------------- as a user runs them
@pytest.mark.slow
def test_the_scripts_exit_with_the_message_and_no_traceback(tiny_model_dir, tmp_path):
    """The scripts as a user starts them (HF_HUB_OFFLINE=1, as `Processes` sets): exit status 2 for a bad
    flag, 1 for a missing resource; the message is stderr's last line, and there is no traceback. (A handful: each
    process spends seconds importing torch; the tests above check the rest in this process.)"""
    cases = [  # (script and flags, exit status, stderr's last line)
        (["apo.py", "--lr", "-1"], 2, "apo.py: error: argument --lr: must be > 0, got -1.0"),
        (["apo.py", "--model", str(tiny_model_dir), "--data", "geo3k", "--device", "cpu", "--out",
          str(tmp_path / "run")], 1, "hiyouga/geometry3k: not a local file or folder, and the Hub cannot be reached"),
        (["eval.py", "--model", "Qwen/Qwen2.5-VL-3B-Instruct", "--device", "cpu"], 1,
         "model Qwen/Qwen2.5-VL-3B-Instruct: no such folder, and the Hub cannot be reached"),
    ]
    runs = [Processes([sys.executable, str(REPO / script), *flags]) for (script, *flags), _, _ in cases]  # at once
    for run, (command, status, last_line) in zip(runs, cases):
        output = run.finish(check=False)[0]  # stdout and stderr, in the order written
        assert run.procs[0].returncode == status and "Traceback" not in output, (command, output[-2000:])
        assert output.strip().splitlines()[-1].startswith(last_line), (command, output[-2000:])
    assert not (tmp_path / "run").exists()
