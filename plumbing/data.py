"""Training data for apo.py: where rows come from, what a usable row is, and in which order the steps read them.

- Sources (`load_table`): 'geo3k' (hiyouga/geometry3k), 'toy' and 'toy-graded' (toy.py), any Hub dataset id, a local folder laid out
  like one, a .parquet or .jsonl/.json file with the geo3k columns (images, problem with its '<image>' mark, answer),
  or a .json/.jsonl file in the authors' format (a 'message' chat list with image paths, plus 'answer'). Every source
  goes through `datasets`, so a local folder in the Hub layout and the Hub id take the same path. Data that cannot be
  found or read (no such file, a broken JSON line, the Hub offline) stops in one line that says what to do
  (`read_dataset`: SystemExit, exit status 1, no traceback).
- Rows (`usable_example`): one image, a problem, a gold that reward.py can read, and a prompt that fits
  --max-prompt-tokens. A row that is none of these is a `BadRow`: the loop skips it, counts it and names it once.
  A missing column or a column of the wrong type is an error at start, not a bad row.
- Order (`take_examples`): pass k over the data is a permutation seeded by seed + k (or the file order), so the
  order depends on nothing but the seed and a resumed run picks up at the same row.
"""

import functools
import io
import json
import os
import sys
from pathlib import Path

import torch
from PIL import Image

import reward
import rollout

HUB_ALIASES = {"geo3k": "hiyouga/geometry3k"}
COLUMNS = ("images", "problem", "answer")  # the geo3k columns: image(s), problem text, gold answer


class BadRow(ValueError):
    """A row that cannot be trained on (missing image, empty problem, unparseable gold): skipped and counted."""


class NoSplit(SystemExit):
    """The data has no such split, or it is empty: training stops with this message, held-out evaluation is skipped."""


def load_table(data: str, split: str = "train", columns: tuple = COLUMNS) -> tuple:
    """The rows of `data` (split `split`) as an indexable table, the folder that relative image paths are resolved
    against, and the table's (image, problem, answer) column names: `columns`, or the geo3k ones for data in the
    authors' format, which is converted to them. Data that cannot be found or read, or lacks a column, stops here in
    one line (SystemExit, `read_dataset`)."""
    if data in ("toy", "toy-graded"):
        from plumbing import toy
        sizes = toy.SPLIT_SIZES if data == "toy" else toy.GRADED_SIZES
        if split not in sizes:
            raise NoSplit(f"{data}: no split {split!r}; it has {', '.join(sizes)}")
        return toy.toy_dataset(split, task=data), None, COLUMNS  # the same images whatever --seed
    name = HUB_ALIASES.get(data, data)
    path = Path(name)
    table = read_dataset(name, split)
    base = path.resolve().parent if path.suffix in FILE_BUILDERS else path.resolve() if path.is_dir() else None
    if path.suffix in (".json", ".jsonl") and "message" in table.column_names:
        # the authors' format: a chat list (often JSON-encoded) + answer
        table = table.map(from_authors_format, remove_columns=table.column_names,
                          fn_kwargs={"answer_column": columns[2]})
        columns = COLUMNS
    image_column, problem_column, answer_column = columns
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        sys.exit(f"{data}: column(s) {missing} not found; it has {table.column_names}. "
                 "Name the right ones with --image-column / --problem-column / --answer-column.")
    if len(table) == 0:
        raise NoSplit(f"{data} ({split}) has no rows")
    first = table[0]
    if not isinstance(first[problem_column], str):
        sys.exit(f"{data}: column {problem_column!r} must hold text, found {type(first[problem_column]).__name__}")
    if not isinstance(first[image_column], (list, dict, str, bytes, Image.Image)):
        sys.exit(f"{data}: column {image_column!r} must hold images, paths or bytes, "
                 f"found {type(first[image_column]).__name__}")
    return table, base, columns


FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}  # file suffix -> datasets builder


def read_dataset(source: str, split: str = "train", config: str | None = None):
    """datasets.load_dataset of a .parquet/.json/.jsonl file (its rows), a local folder in the Hub layout or a Hub
    id (split `split` of config `config`). A user's mistake stops here in one line that names the culprit
    (SystemExit; NoSplit for a split it lacks): no such file or folder, a file that is not what its name says (the
    line where a JSON file breaks), a Hub id while the Hub cannot be reached. Any other error goes through."""
    import datasets
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    path = Path(source)
    if path.suffix in FILE_BUILDERS:
        if not path.is_file():
            sys.exit(f"{source}: no such file")
        if path.suffix == ".parquet" and not is_parquet(path):
            sys.exit(f"{source}: not a parquet file (it lacks parquet's PAR1 marks at its start and end)")
        if path.stat().st_size == 0:
            sys.exit(f"{source}: the file is empty")
        try:
            return datasets.load_dataset(FILE_BUILDERS[path.suffix], data_files=str(path), split="train")
        except (datasets.exceptions.DatasetGenerationError, ValueError):  # (ValueError: pyarrow's, pandas')
            if FILE_BUILDERS[path.suffix] != "json":
                raise
            if not path.read_text(errors="replace").strip():
                sys.exit(f"{source}: the file is empty")
            where = json_error(path)
            if where is None:  # not a mistake this can name
                raise
            sys.exit(f"{source}: not JSON at {where}")
    if path.is_file():
        sys.exit(f"{source}: a file, but not .parquet, .json or .jsonl")
    if not path.exists():
        try:
            validate_repo_id(source)
        except HFValidationError:  # '/x/y', 'a/b/c', './x': a path, not a Hub id
            sys.exit(f"{source}: no such file or folder")
    try:
        return datasets.load_dataset(source, config, split=split)  # (datasets 5 never runs a dataset's own code)
    except ConnectionError:  # datasets' "Couldn't reach ... on the Hub" (HF_HUB_OFFLINE, or no network)
        import huggingface_hub
        why = "HF_HUB_OFFLINE is set" if huggingface_hub.constants.HF_HUB_OFFLINE else "no network?"
        sys.exit(f"{source}: not a local file or folder, and the Hub cannot be reached ({why}) to download this "
                 "data set, nor does its cache hold it. Pass a local copy with --data: a folder in the Hub layout "
                 f"(data/{split}-*.parquet; `hf download {source} --repo-type dataset --local-dir DIR` makes one "
                 "where the Hub can be reached), or a .parquet or .jsonl file")
    except FileNotFoundError as err:  # a folder without data files; a Hub id the Hub does not know
        if path.is_dir():
            sys.exit(f"{source}: no data files in this folder (the Hub layout: data/{split}-*.parquet, ...)")
        sys.exit(f"{source}: {str(err).strip().splitlines()[0]}")  # (datasets: "... doesn't exist on the Hub")
    except ValueError as err:
        if not str(err).startswith("Unknown split"):  # datasets: 'Unknown split "x". Should be one of [...]'
            raise
        raise NoSplit(f"{source}: no split {split!r} ({err})") from None


def is_parquet(path: Path) -> bool:
    """A parquet file starts and ends with b'PAR1'."""
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(max(0, path.stat().st_size - 4))
        return head == f.read(4) == b"PAR1"


def json_error(path: Path) -> str | None:
    """Where a JSON file breaks, "line N, column C (the reason)"; None if it does not. A .json file may hold one
    document or, as a .jsonl, one per line (datasets reads both)."""
    text = path.read_text(errors="replace")
    if path.suffix == ".json":
        try:
            json.loads(text)
            return None
        except json.JSONDecodeError as err:
            if err.msg != "Extra data":  # (extra data: more than one document, so JSON lines)
                return f"line {err.lineno}, column {err.colno} ({err.msg})"
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                json.loads(line)
            except json.JSONDecodeError as err:
                return f"line {number}, column {err.colno} ({err.msg})"
    return None


def from_authors_format(row: dict, answer_column: str = "answer") -> dict:
    """{'message': [{'role': 'user', 'content': [{'type': 'image', 'image': 'file:///x.jpg'}, {'type': 'text', ...}]}],
    'answer': ...} -> the geo3k columns {'images': [path], 'problem': text, 'answer': text}."""
    messages = json.loads(row["message"]) if isinstance(row["message"], str) else row["message"]
    parts = [p for m in messages if m.get("role") == "user" for p in
             (m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}])]
    images = [p.get("image", p.get("image_url", "")).removeprefix("file://") for p in parts if p.get("type") == "image"]
    text = "\n".join(p["text"] for p in parts if p.get("type") == "text")
    return {"images": images, "problem": text, "answer": str(row.get(answer_column, ""))}


def open_image(image, base: Path | None = None) -> Image.Image:
    """An image as a table holds it (PIL, {'bytes', 'path'}, bytes, or a path relative to `base`) -> PIL RGB;
    BadRow if there is none or it does not decode."""
    if isinstance(image, dict):  # an undecoded datasets Image: {'bytes': ..., 'path': ...}
        image = image.get("bytes") or image.get("path")
    if not isinstance(image, (bytes, str, Image.Image)):
        raise BadRow(f"no image ({type(image).__name__})")
    try:
        if isinstance(image, bytes):
            image = Image.open(io.BytesIO(image))
        elif isinstance(image, str):
            # A relative path is relative to the data file, not to wherever the command was started.
            image = Image.open(base / image if base is not None and not os.path.isabs(image) else image)
        image.load()
        return image.convert("RGB")
    except (OSError, ValueError) as err:
        raise BadRow(f"unreadable image: {err}") from None


def prepare_example(row: dict, columns: tuple = COLUMNS, base: Path | None = None) -> dict:
    """One table row -> {'images': [PIL RGB], 'problem': str, 'answer': str}, or BadRow with the reason."""
    image_column, problem_column, answer_column = columns
    image = row.get(image_column)
    image = open_image((image or [None])[0] if isinstance(image, list) else image, base)  # training keeps one
    problem, answer = row.get(problem_column), row.get(answer_column)
    if not isinstance(problem, str) or not problem.replace("<image>", "").strip():
        raise BadRow("empty problem")
    answer = "" if answer is None else str(answer)
    if reward.parse_gold(answer) is None:  # APO_SPEC §1 Decision: a data error, not a free reward
        raise BadRow(f"unparseable gold answer {answer[:60]!r}")
    return {"images": [image], "problem": problem, "answer": answer}


def usable_example(row: dict, columns: tuple, base: Path | None, processor, min_pixels: int, max_pixels: int,
                   max_prompt_tokens: int) -> dict:
    """prepare_example, and a prompt that fits `max_prompt_tokens`; BadRow otherwise."""
    example = prepare_example(row, columns, base)
    n_tokens = rollout.encode_prompts(processor, [example["images"]], [example["problem"]], min_pixels,
                                      max_pixels)["input_ids"].shape[1]
    if n_tokens > max_prompt_tokens:
        raise BadRow(f"prompt of {n_tokens} tokens > --max-prompt-tokens {max_prompt_tokens}")
    return example


# ------------------------------------------------------------------------------------------------------- order
def data_order(n_rows: int, position: int, seed: int, shuffle: bool) -> int:
    """Row index at global `position` (positions run on across passes): pass k is a permutation seeded by seed+k,
    so the order depends on nothing but the seed, and a resumed run picks up at the same row."""
    epoch, offset = divmod(position, n_rows)
    return permutation(n_rows, seed + epoch)[offset] if shuffle else offset


@functools.lru_cache(maxsize=2)
def permutation(n: int, seed: int) -> list:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def take_examples(table, n: int, position: int, seed: int, shuffle: bool, usable) -> tuple:
    """The next `n` usable rows from data position `position` on (`usable`: row -> example, or BadRow), each
    example with its "row" index. Returns (examples, the position after the last row read, [(row index, reason)]
    for each row skipped). (Reading a row decodes its image: a corrupt one fails right here.)"""
    examples, skipped = [], []
    while len(examples) < n:
        index = data_order(len(table), position, seed, shuffle)
        position += 1
        try:
            examples.append({**usable(table[index]), "row": index})
        except (BadRow, OSError) as err:
            skipped.append((index, err))
            if len(skipped) > len(table):
                raise SystemExit(f"no usable row in a whole pass over the data: check it ({err})")
    return examples, position, skipped


def held_out_examples(data: str, split: str, columns: tuple, limit: int, processor, min_pixels: int,
                      max_pixels: int, max_prompt_tokens: int, say=print, is_training_data: bool = False,
                      breakdown: str = "") -> list:
    """The problems evaluated during training: the usable rows of `data` in `split`, up to `limit` of them (0: all);
    [] when there is no such split, or it is empty. A single file has no splits: named as held-out data
    (--eval-data) all its rows are, while the training file itself gives none. `say` tells the log which, and why.
    `breakdown`: a column whose value each example carries in its "groups" (eval.jsonl reports accuracy per value).
    Other mistakes (no such data, a missing column) stop the run, as they do for the training data."""
    if is_training_data and Path(data).suffix in FILE_BUILDERS:
        say(f"no held-out evaluation: {data} has no {split} split (name one with --eval-data)")
        return []
    try:
        table, base, columns = load_table(data, split, columns)
    except NoSplit as err:
        say(f"no held-out evaluation: {err.code}")
        return []
    if breakdown and breakdown not in table.column_names:
        sys.exit(f"--eval-breakdown {breakdown}: no such column in {data} ({split}); it has {table.column_names}")
    examples, skipped = [], 0
    for index in range(len(table)):
        if limit and len(examples) == limit:
            break
        try:
            row = table[index]
            example = usable_example(row, columns, base, processor, min_pixels, max_pixels, max_prompt_tokens)
        except (BadRow, OSError):
            skipped += 1
            continue
        examples.append({**example, "groups": {breakdown: str(row[breakdown])}} if breakdown else example)
    say(f"held-out evaluation: {len(examples)} problems of {data} ({split}; {skipped} bad rows skipped), at step 0, "
        "every --eval-every steps and at the end")
    return examples
