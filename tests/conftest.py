"""Shared fixtures: a tiny random Qwen2.5-VL built locally, and geo3k-layout data from the real sample problems."""
import io
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests never reach the Hub
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402

GEO3K_SAMPLE = Path(__file__).resolve().parent / "data" / "geo3k_sample"  # ten real problems (its README)


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


def png_bytes(color="white", size=(56, 56)) -> bytes:
    from PIL import Image
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    import toy
    return toy.build_model_folder(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def geo3k_dir(tmp_path_factory) -> Path:
    rows = geo3k_rows()
    return write_hub_layout(tmp_path_factory.mktemp("geo3k") / "geometry3k", {"train": rows[:8], "test": rows[8:]})
