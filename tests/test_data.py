"""Data sources: the Hub id, a local folder in the Hub layout, parquet, jsonl, the authors' JSON format; bad input."""
import json

import datasets
import pytest
from PIL import Image

from plumbing import data
import reward
from conftest import geo3k_rows, png_bytes


def test_local_folder_in_hub_layout_loads_like_the_hub(geo3k_dir, monkeypatch):
    """`--data geo3k` and a local folder take the same call: datasets.load_dataset(id or folder, split=...)."""
    calls = []
    real = datasets.load_dataset

    def recording(path, *a, **kw):
        calls.append((path, kw.get("split")))
        return real(str(geo3k_dir) if path == "hiyouga/geometry3k" else path, *a, **kw)
    monkeypatch.setattr(datasets, "load_dataset", recording)

    from_hub, _, _ = data.load_table("geo3k")
    from_folder, base, columns = data.load_table(str(geo3k_dir))
    assert calls == [("hiyouga/geometry3k", "train"), (str(geo3k_dir), "train")]
    assert len(from_hub) == len(from_folder) == 8 and base == geo3k_dir.resolve() and columns == data.COLUMNS
    test_split, _, _ = data.load_table(str(geo3k_dir), "test")
    assert len(test_split) == 2


def test_real_geo3k_rows_prepare_and_their_golds_parse(geo3k_dir):
    table, base, columns = data.load_table(str(geo3k_dir))
    expected = geo3k_rows()[:8]
    for i in range(len(table)):
        example = data.prepare_example(table[i], columns, base)
        assert example["images"][0].mode == "RGB" and example["images"][0].size[0] > 50
        assert example["problem"] == expected[i]["problem"] and example["answer"] == expected[i]["answer"]
        # the right choice, boxed or in answer tags, is correct; reward.py reads the gold as a whole expression
        response = f"<think>…</think><answer>{example['answer']}</answer>"
        assert reward.accuracy_reward(response, example["answer"]) == 1.0


def test_parquet_and_jsonl_with_relative_image_paths(tmp_path, monkeypatch):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (60, 40), "green").save(tmp_path / "imgs" / "a.png")
    rows = [{"images": ["imgs/a.png"], "problem": "<image>Find x.", "answer": "5"},
            {"images": ["imgs/a.png"], "problem": "Find y.", "answer": "\\frac { 1 } { 2 }"}]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "data.parquet"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative image paths resolve against the data file, not the working directory
    for name in ("data.jsonl", "data.parquet"):
        table, base, columns = data.load_table(str(tmp_path / name))
        examples = [data.prepare_example(table[i], columns, base) for i in range(len(table))]
        assert [e["answer"] for e in examples] == ["5", "\\frac { 1 } { 2 }"]
        assert examples[0]["images"][0].size == (60, 40)


def test_a_single_file_is_held_out_data_only_when_named_so(tmp_path, tiny_model_dir):
    """A file has no splits: as --eval-data, all its usable rows are evaluated; as the training data, none."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    rows = [{"images": [png_bytes()], "problem": f"<image>Find x{i}.", "answer": str(i)} for i in range(3)]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "held_out.parquet"))
    said = []
    held_out = data.held_out_examples(str(tmp_path / "held_out.parquet"), "test", data.COLUMNS, 0, processor,
                                      784, 3136, 1024, said.append)
    assert [e["answer"] for e in held_out] == ["0", "1", "2"] and said[-1].startswith("held-out evaluation: 3 problems")
    assert data.held_out_examples(str(tmp_path / "held_out.parquet"), "test", data.COLUMNS, 0, processor, 784, 3136,
                                  1024, said.append, is_training_data=True) == []
    assert said[-1] == f"no held-out evaluation: {tmp_path}/held_out.parquet has no test split (name one with --eval-data)"


def test_authors_json_format(tmp_path):
    Image.new("RGB", (30, 30), "red").save(tmp_path / "p.jpg")
    message = [{"role": "user", "content": [{"type": "image", "image": "file://p.jpg"},
                                            {"type": "text", "text": "How many points in the photo?"}]}]
    rows = [{"message": json.dumps(message), "answer": "$42$"},           # the README's form: a JSON-encoded string
            {"message": message, "answer": "$7$"}]                       # and an already-decoded list
    (tmp_path / "train.json").write_text(json.dumps(rows))
    table, base, columns = data.load_table(str(tmp_path / "train.json"), columns=("img", "question", "answer"))
    assert columns == data.COLUMNS  # converted to the geo3k columns, whatever the flags named
    examples = [data.prepare_example(table[i], columns, base) for i in range(len(table))]
    assert [e["problem"] for e in examples] == ["How many points in the photo?"] * 2
    assert [e["answer"] for e in examples] == ["$42$", "$7$"]
    assert examples[0]["images"][0].size == (30, 30)


def test_schema_errors_are_clear(tmp_path):
    rows = [{"image": [png_bytes()], "question": "Find x.", "answer": "3"}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    with pytest.raises(SystemExit, match=r"\['images', 'problem'\] not found.*--image-column"):
        data.load_table(str(tmp_path / "d.parquet"))
    table, _, _ = data.load_table(str(tmp_path / "d.parquet"), columns=("image", "question", "answer"))
    assert len(table) == 1  # renamed columns work
    datasets.Dataset.from_list([{"images": [png_bytes()], "problem": 3, "answer": "3"}]).to_parquet(
        str(tmp_path / "e.parquet"))
    with pytest.raises(SystemExit, match="must hold text"):
        data.load_table(str(tmp_path / "e.parquet"))
    datasets.Dataset.from_list([{"images": 7, "problem": "Find x.", "answer": "3"}]).to_parquet(
        str(tmp_path / "f.parquet"))
    with pytest.raises(SystemExit, match="must hold images, paths or bytes, found int"):
        data.load_table(str(tmp_path / "f.parquet"))


@pytest.mark.parametrize("row, reason", [
    ({"images": [], "problem": "Find x.", "answer": "3"}, "no image"),
    ({"images": [b"not a png"], "problem": "Find x.", "answer": "3"}, "unreadable image"),
    ({"images": ["missing.png"], "problem": "Find x.", "answer": "3"}, "unreadable image"),
    ({"images": [png_bytes()], "problem": "<image>  ", "answer": "3"}, "empty problem"),
    ({"images": [png_bytes()], "problem": "Find x.", "answer": "\\frac{"}, "unparseable gold"),
    ({"images": [png_bytes()], "problem": "Find x.", "answer": None}, "unparseable gold"),
])
def test_bad_rows_are_named(tmp_path, row, reason):
    with pytest.raises(data.BadRow, match=reason):
        data.prepare_example(row, data.COLUMNS, tmp_path)


def test_data_order_is_a_seeded_permutation_per_pass():
    first = [data.data_order(5, p, seed=3, shuffle=True) for p in range(5)]
    second = [data.data_order(5, p, seed=3, shuffle=True) for p in range(5, 10)]
    assert sorted(first) == sorted(second) == list(range(5)) and first != second
    assert first == [data.data_order(5, p, seed=3, shuffle=True) for p in range(5)]
    assert [data.data_order(5, p, seed=3, shuffle=False) for p in range(7)] == [0, 1, 2, 3, 4, 0, 1]



def test_take_examples_skips_bad_rows_and_reads_on_from_its_position():
    """Rows 1 and 3 of five are bad: two steps of 2 read rows 0, 2 then 4 and (a new pass) 0, naming the bad ones."""
    def usable(row):
        if row["bad"]:
            raise data.BadRow(f"row {row['i']} is bad")
        return {"problem": f"problem {row['i']}"}
    table = [{"i": i, "bad": i in (1, 3)} for i in range(5)]
    examples, position, skipped = data.take_examples(table, 2, 0, seed=0, shuffle=False, usable=usable)
    assert examples == [{"problem": "problem 0", "row": 0}, {"problem": "problem 2", "row": 2}]  # row: its index
    assert (position, [(i, str(e)) for i, e in skipped]) == (3, [(1, "row 1 is bad")])
    examples, position, skipped = data.take_examples(table, 2, position, seed=0, shuffle=False, usable=usable)
    assert ([e["row"] for e in examples], position, [i for i, _ in skipped]) == ([4, 0], 6, [3])
    with pytest.raises(SystemExit, match="no usable row"):
        data.take_examples([{"i": 0, "bad": True}], 1, 0, seed=0, shuffle=False, usable=usable)
