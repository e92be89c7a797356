"""The command line: apo.py's flags made from the fields of its Args dataclass (`parse`), the range of every flag,
and the check that stops at a value outside it, as argparse stops (its usage, then "error: argument --lr: must be
> 0, got -1.0", exit 2), before anything loads. `RANGES` names apo.py's flags (apo.Args' fields); eval.py and
bench.py check their flags of the same names against it, and their own with small tables of the same form. A new
flag: one line.
"""
import argparse
import ast
import dataclasses
import inspect
import math
import re
import sys

# Each flag's meaningful range: (Args field, test, the range in words).
RANGES = [
    ("group_size", lambda v: v >= 2, ">= 2 (advantages are relative to the group)"),
    ("kl_beta", lambda v: v >= 0, ">= 0 (0: no reference model)"),
    ("clip_eps", lambda v: v > 0, "> 0"),
    ("stcr_base", lambda v: v >= 1, ">= 1 (1: no STCR weight; below 1 it would favour long wrong answers)"),
    ("lr", lambda v: v > 0, "> 0"),
    ("min_lr", lambda v: v >= 0, ">= 0"),
    ("warmup_ratio", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("adam_betas", lambda v: all(0 <= b < 1 for b in v), "two numbers in [0, 1)"),
    ("weight_decay", lambda v: v >= 0, ">= 0"),
    ("grad_clip", lambda v: v > 0, "> 0"),
    ("loss_agg", lambda v: v in ("token", "sequence"), "'token' or 'sequence'"),
    ("temperature", lambda v: v > 0, "> 0 (responses are sampled)"),
    ("top_p", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("prompts_per_step", lambda v: v >= 1, ">= 1"),
    ("mini_batch_size", lambda v: v >= 1, ">= 1"),
    ("max_new_tokens", lambda v: v >= 1, ">= 1"),
    ("steps", lambda v: v >= 0, ">= 0 (0: --epochs passes over the data)"),
    ("epochs", lambda v: v >= 1, ">= 1"),
    ("seed", lambda v: abs(v) < 2 ** 62, "an integer in (-2^62, 2^62)"),  # torch seeds are 64-bit
    ("model", lambda v: v != "", "a Hub id or a folder"),
    ("data", lambda v: v != "", "a data set: geo3k, toy, a Hub id, a folder or a file"),
    ("max_prompt_tokens", lambda v: v >= 1, ">= 1"),
    ("min_pixels", lambda v: v >= 1, ">= 1"),
    ("max_pixels", lambda v: v >= 1, ">= 1"),
    ("out", lambda v: v != "", "a folder name"),
    ("eval_every", lambda v: v >= 0, ">= 0 (0: never)"),
    ("eval_limit", lambda v: v >= 0, ">= 0 (0: all)"),
    ("save_every", lambda v: v >= 1, ">= 1"),
    ("keep_last", lambda v: v >= 0, ">= 0 (0: all)"),
    ("log_samples", lambda v: v >= 0, ">= 0"),
    ("log_random_samples", lambda v: v >= 0, ">= 0"),
    ("device", lambda v: re.fullmatch(r"auto|cpu|cuda(:\d+)?", v), "'auto', 'cpu', 'cuda' or 'cuda:N'"),
    ("dtype", lambda v: v in ("auto", "bfloat16", "float32"), "'auto', 'bfloat16' or 'float32'"),
    ("micro_batch_size", lambda v: v >= 1, ">= 1"),
    ("generation_batch_size", lambda v: v >= 0, ">= 0 (0: all B·G at once)"),
    ("logprob_chunk", lambda v: v >= 1, ">= 1"),
    ("max_bad_updates", lambda v: v >= 1, ">= 1"),
    ("lora_rank", lambda v: v >= 0, ">= 0 (0: all parameters, no LoRA)"),
    ("lora_alpha", lambda v: v >= 0, ">= 0 (0: twice the rank)"),
    ("lora_dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("report_to", lambda v: {b.strip() for b in v.split(",")} <= {"none", "tensorboard", "wandb"},
     "tensorboard, wandb, both (comma-separated) or none"),
]
ORDERED = [("min_lr", "lr"), ("min_pixels", "max_pixels")]  # (low, high): low <= high


def check_ranges(parser, values: dict, ranges: list = RANGES, ordered: list = ORDERED, preset: frozenset = frozenset()):
    """Stop as argparse does (its usage, then "error: argument --lr: must be > 0, got -1.0", exit 2) at the first
    of `values` (field -> value; absent or None: not checked) outside its range, or a low above its high. A float
    must also be finite: no range means inf or nan. `preset`: the fields whose value a preset set, not a flag (the error then
    says so: `--data toy --lr 1e-4` meets the toy's --min-lr, which the user did not type)."""
    flag = lambda name: "--" + name.replace("_", "-")  # noqa: E731
    for name, test, allowed in ranges:
        value = values.get(name)
        if value is None:
            continue
        numbers = value if isinstance(value, tuple) else (value,)
        if not all(math.isfinite(x) for x in numbers if isinstance(x, float)):
            parser.error(f"argument {flag(name)}: must be a finite number, got {value!r}")
        if not test(value):
            parser.error(f"argument {flag(name)}: must be {allowed}, got {value!r}")
    for low, high in ordered:
        if values.get(low) is not None and values.get(high) is not None and values[low] > values[high]:
            unseen = [flag(k) for k in (low, high) if k in preset]  # one at most: a preset is consistent
            origin = f" ({unseen[0]} is the preset's: give it too)" if unseen else ""
            parser.error(f"argument {flag(low)}: must be <= {flag(high)} ({values[high]!r}), got "
                         f"{values[low]!r}{origin}")


def parse(fields_class, presets: dict, argv=None, description: str = ""):
    """An instance of the dataclass `fields_class` (apo.Args) from the command line `argv`: one flag per field,
    its help being the docstring under the field; `--preset NAME` (or `--data toy`, `--data toy-graded`: that preset; with --lora-rank,
    'NAME-lora' where there is one) replaces the defaults with presets[NAME], and flags given explicitly still
    win; every value checked against RANGES (a bad one stops here, exit 2)."""
    source = ast.parse(inspect.getsource(fields_class)).body[0].body
    docs = {a.target.id: b.value.value for a, b in zip(source, source[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr)}
    parser = argparse.ArgumentParser(description=description)
    for f in dataclasses.fields(fields_class):
        # argparse %-formats help strings (for %(default)s): a literal % in a docstring must be written %%
        flag, help_ = "--" + f.name.replace("_", "-"), " ".join(docs[f.name].split()).replace("%", "%%")
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_)
        elif f.type is tuple:
            parser.add_argument(flag, type=float, nargs=len(f.default), default=f.default, help=help_)
        else:
            parser.add_argument(flag, type=f.type, default=f.default, help=help_)
    # A preset (or --data toy) changes the defaults; flags given explicitly still win.
    known, _ = parser.parse_known_args(argv)
    preset = known.preset or (known.data if known.data in ("toy", "toy-graded") else "")
    preset += "-lora" if known.lora_rank and f"{preset}-lora" in presets else ""
    if preset not in ("", *presets):
        parser.error(f"argument --preset: must be one of {', '.join(presets)}, got {preset!r}")
    parser.set_defaults(**presets.get(preset, {}))
    args = fields_class(**vars(parser.parse_args(argv)))
    args.adam_betas = tuple(args.adam_betas)
    typed = {a.split("=")[0] for a in (sys.argv[1:] if argv is None else argv) if a.startswith("--")}
    from_preset = {k for k in presets.get(preset, {}) if "--" + k.replace("_", "-") not in typed}
    check_ranges(parser, dataclasses.asdict(args), preset=from_preset)  # every value in its range (RANGES)
    return args
