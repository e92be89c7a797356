"""eval.py on the paper's five benchmarks, offline: fixture rows with the real column names and types (real question
texts from ../shared/BENCHMARKS.md, images drawn with PIL), written as local copies in the Hub layout, then mapped
(`benchmark_example`), scored (`score`) and evaluated end to end on the tiny model."""
import html
import json
from html.parser import HTMLParser

import datasets
import pytest
from PIL import Image, ImageDraw

import eval as evaluate
import reward
from conftest import GEO3K_SAMPLE, geo3k_rows

Img = datasets.Image()
S = datasets.Value("string")


def picture(colour: str, size=(84, 56)) -> Image.Image:
    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).ellipse((8, 8, size[0] - 8, size[1] - 8), fill=colour)
    return image


MATHVISTA_HINT = "Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end."
MATHVISTA = [  # pid 5, 2 and 1 of testmini (BENCHMARKS.md §1); metadata trimmed to a few of its fields
    {"pid": "5", "question": "Find $m\\angle H$", "image": "images/5.jpg", "decoded_image": picture("red"),
     "choices": ["97", "102", "107", "122"], "unit": None, "precision": None, "answer": "97",
     "question_type": "multi_choice", "answer_type": "text",
     "metadata": {"category": "math-targeted-vqa", "source": "Geometry3K", "language": "english"},
     "query": f"{MATHVISTA_HINT}\nQuestion: Find $m\\angle H$\nChoices:\n(A) 97\n(B) 102\n(C) 107\n(D) 122"},
    {"pid": "2", "question": "what is the total volume of the measuring cup?", "image": "images/2.jpg",
     "decoded_image": picture("blue"), "choices": None, "unit": "g", "precision": None, "answer": "1000",
     "question_type": "free_form", "answer_type": "integer",
     "metadata": {"category": "general-vqa", "source": "VQA-AS", "language": "english"},
     "query": "Hint: Please answer the question requiring an integer answer and provide the final value, e.g., 1, 2, "
              "3, at the end.\nQuestion: what is the total volume of the measuring cup? (Unit: g)"},
    {"pid": "1", "question": "When a spring does work on an object, we cannot find the work by simply multiplying "
                             "the spring force by the object's displacement. ... What is the work?",
     "image": "images/1.jpg", "decoded_image": picture("green"), "choices": None, "unit": None, "precision": 1.0,
     "answer": "1.2", "question_type": "free_form", "answer_type": "float",
     "metadata": {"category": "math-targeted-vqa", "source": "SciBench", "language": "english"},
     "query": "Hint: Please answer the question requiring a floating-point number with one decimal place and "
              "provide the final value, e.g., 1.2, 1.3, 1.4, at the end.\nQuestion: ... What is the work?"},
]
MATHVISTA_FEATURES = datasets.Features({
    "pid": S, "question": S, "image": S, "decoded_image": Img, "choices": datasets.Sequence(S), "unit": S,
    "precision": datasets.Value("float64"), "answer": S, "question_type": S, "answer_type": S,
    "metadata": {"category": S, "source": S, "language": S}, "query": S})

COT = "please first conduct reasoning, and then answer the question and provide the final value, e.g., 1, 2.5, 300, " \
      "at the end."
MATHVERSE = [  # problem 685 in two of its versions, and a GeoQA multiple-choice problem (BENCHMARKS.md §2)
    {"sample_index": "3422", "problem_index": "685", "problem_version": "Text Lite",
     "question": "The radius is 3 cm. Find L.", "image": picture("gray"), "answer": "14", "question_type": "free-form",
     "metadata": {"split": "testmini", "source": "Geo3D", "subject": "Solid Geometry"},
     "query_wo": "Please directly answer the question and provide the final value, e.g., 1, 2.5, 300.\nQuestion: "
                 "The radius is 3 cm. Find L.",
     "query_cot": "Please first conduct reasoning, and then answer the question and provide the final value, e.g., "
                  "1, 2.5, 300, at the end.\nQuestion: The radius is 3 cm. Find L.",
     "question_for_eval": "The radius is 3 cm. Find L."},
    {"sample_index": "3425", "problem_index": "685", "problem_version": "Vision Only", "question": "",
     "image": picture("black"), "answer": "14", "question_type": "free-form",
     "metadata": {"split": "testmini", "source": "Geo3D", "subject": "Solid Geometry"},
     "query_wo": "According to the question shown in the image, please directly answer the question and provide the "
                 "final value, e.g., 1, 2.5, 300.",
     "query_cot": f"According to the question shown in the image, {COT}",
     "question_for_eval": "The radius is 3 cm. Find L."},
    {"sample_index": "1", "problem_index": "1", "problem_version": "Text Dominant",
     "question": "As shown in the figure, AB ∥ CD, ... then the size of angle CED is ()\nChoices:\nA:40°\nB:60°\n"
                 "C:120°\nD:140°", "image": picture("yellow"), "answer": "D", "question_type": "multi-choice",
     "metadata": {"split": "testmini", "source": "GeoQA", "subject": "Plane Geometry"},
     "query_wo": "Please directly answer the question and provide the correct option letter, e.g., A, B, C, D.",
     "query_cot": "Please first conduct reasoning, and then answer the question and provide the correct option "
                  "letter, e.g., A, B, C, D, at the end.\nQuestion: ... the size of angle CED is ()\nChoices:\nA:40°\n"
                  "B:60°\nC:120°\nD:140°",
     "question_for_eval": "... then the size of angle CED is ()"},
]
MATHVERSE_FEATURES = datasets.Features({
    "sample_index": S, "problem_index": S, "problem_version": S, "question": S, "image": Img, "answer": S,
    "question_type": S, "metadata": {"split": S, "source": S, "subject": S}, "query_wo": S, "query_cot": S,
    "question_for_eval": S})

MMK12 = [  # no verbatim test row is public (BENCHMARKS.md §3): rows in its format, options inline as "A. …"
    {"id": "0b3f3c86-5a4e-4d43-9d1c-3f0f6a1b2c01", "image": picture("red"), "subject": "physics", "answer": "B",
     "question": "The graph shows the velocity of a cart. What is its acceleration?\nA. 1 m/s²\nB. 2 m/s²\n"
                 "C. 3 m/s²\nD. 4 m/s²"},
    {"id": "7c9d1e22-8f0a-4b6e-a1c2-5d6e7f8a9b02", "image": picture("blue"), "subject": "biology", "answer": "C",
     "question": "Which structure in the diagram makes proteins?\nA. nucleus\nB. vacuole\nC. ribosome\nD. cell wall"},
]
MMK12_FEATURES = datasets.Features({"id": S, "question": S, "answer": S, "subject": S, "image": Img})

MMSTAR = [  # index 0 and 2 (BENCHMARKS.md §4)
    {"index": 0, "question": "Which option describe the object relationship in the image correctly?\nOptions: A: The "
     "suitcase is on the book., B: The suitcase is beneath the cat., C: The suitcase is beneath the bed., D: The "
     "suitcase is beneath the book.", "image": picture("green"), "answer": "A", "category": "coarse perception",
     "l2_category": "image scene and topic", "meta_info": {"source": "MMBench", "split": "dev", "image_path": "0.jpg"}},
    {"index": 2, "question": "What seems to be the theme of the image?\nOptions: A: Hanging Posters, B: Music, C: Home "
     "decoration, D: Playing guitar", "image": picture("yellow"), "answer": "D", "category": "coarse perception",
     "l2_category": "image scene and topic",
     "meta_info": {"source": "SEEDBench_IMG", "split": "test", "image_path": "2.jpg"}},
]
MMSTAR_FEATURES = datasets.Features({
    "index": datasets.Value("int64"), "question": S, "image": Img, "answer": S, "category": S, "l2_category": S,
    "meta_info": {"source": S, "split": S, "image_path": S}})


def mmmu_row(id_, question, options, answer, question_type, images):
    row = {"id": id_, "question": question, "options": str(options), "explanation": "", "img_type": "['Diagrams']",
           "answer": answer, "topic_difficulty": "Medium", "question_type": question_type, "subfield": "Geometry"}
    return {**row, **{f"image_{k}": images.get(k) for k in range(1, 8)}}


MMMU = {  # validation rows (BENCHMARKS.md §5): Math_1, Math_2, Math_3 (options are images), Math_15 (open, 2 golds)
    "Math": [
        mmmu_row("validation_Math_1", "<image 1> Is the limit of the function as x approaches 0?", ["1", "2",
                 "Not exist"], "C", "multiple-choice", {1: picture("red")}),
        mmmu_row("validation_Math_2", "<image 1> How many attendants are needed?", ["1 attendant", "2 attendants",
                 "3 attendants", "4 attendants"], "B", "multiple-choice", {1: picture("blue")}),
        mmmu_row("validation_Math_3", "Which graph is the derivative of <image 4>?", ["<image 1>", "<image 2>",
                 "<image 3>"], "B", "multiple-choice", {k: picture(c, (56, 56)) for k, c in
                                                        enumerate(["red", "green", "blue", "gray"], 1)}),
        mmmu_row("validation_Math_15", "<image 1> What is the expected waiting time?", [], "['24/7', '3.429']",
                 "open", {1: picture("black")}),
    ],
    "Chemistry": [
        mmmu_row("validation_Chemistry_30", "<image 1> Name the compound.", [], "['$MgS$', 'MgS']", "open",
                 {1: picture("yellow")}),
    ],
}
MMMU_FEATURES = datasets.Features({
    "id": S, "question": S, "options": S, "explanation": S, **{f"image_{k}": Img for k in range(1, 8)},
    "img_type": S, "answer": S, "topic_difficulty": S, "question_type": S, "subfield": S})


def hub_folder(folder, configs: dict, features, split: str):
    """A local folder in the layout of a Hub dataset repo: one parquet per config and split, and a README whose
    `configs` YAML declares them, as the Hub repos of MathVerse, MMStar and MMMU do."""
    folder.mkdir(parents=True)
    yaml = ["---", "configs:"]
    for config, rows in configs.items():
        (folder / config).mkdir()
        datasets.Dataset.from_list(rows, features=features).to_parquet(str(folder / config / f"{split}.parquet"))
        yaml += [f"- config_name: {config}", "  data_files:", f"  - split: {split}", f"    path: {config}/{split}-*"]
        (folder / config / f"{split}.parquet").rename(folder / config / f"{split}-00000-of-00001.parquet")
    (folder / "README.md").write_text("\n".join(yaml + ["---", ""]))
    return folder


@pytest.fixture(scope="module")
def local_copies(tmp_path_factory):
    """Each benchmark as a local copy, laid out as on the Hub (MathVista and MMK12 as one parquet file each)."""
    root = tmp_path_factory.mktemp("benchmarks")
    datasets.Dataset.from_list(MATHVISTA, features=MATHVISTA_FEATURES).to_parquet(str(root / "mathvista.parquet"))
    datasets.Dataset.from_list(MMK12, features=MMK12_FEATURES).to_parquet(str(root / "mmk12.parquet"))
    return {"mathvista": root / "mathvista.parquet", "mmk12": root / "mmk12.parquet",
            "mathverse": hub_folder(root / "MathVerse", {"testmini": MATHVERSE}, MATHVERSE_FEATURES, "testmini"),
            "mmstar": hub_folder(root / "MMStar", {"val": MMSTAR}, MMSTAR_FEATURES, "val"),
            "mmmu": hub_folder(root / "MMMU", MMMU, MMMU_FEATURES, "validation")}


def examples_of(name, local_copies):
    examples, skipped = evaluate.load_examples(name, str(local_copies[name]))
    assert skipped == 0
    return examples


# --- rows -> examples ---------------------------------------------------------------------------------------------
def test_mathvista_rows(local_copies):
    mc, integer, decimal = examples_of("mathvista", local_copies)
    assert (mc["answer"], mc["kind"], mc["choices"]) == ("A", "letter", ["97", "102", "107", "122"])  # 97 is choice A
    assert mc["problem"] == MATHVISTA[0]["query"] and len(mc["images"]) == 1 and mc["images"][0].mode == "RGB"
    assert mc["groups"] == {"question_type": "multi_choice", "answer_type": "text"}
    assert (integer["answer"], integer["kind"], integer["precision"], integer["unit"]) == ("1000", "number", 0, "g")
    assert (decimal["answer"], decimal["kind"], decimal["precision"]) == ("1.2", "number", 1)


def test_mathverse_rows(local_copies):
    lite, vision_only, choice = examples_of("mathverse", local_copies)
    assert lite["problem"] == MATHVERSE[0]["query_cot"] and lite["kind"] == "math" and lite["answer"] == "14"
    assert vision_only["problem"].startswith("According to the question shown in the image")  # text in the image
    assert vision_only["groups"] == {"problem_version": "Vision Only"}
    assert (choice["kind"], choice["answer"], choice["choices"]) == ("letter", "D", ["40°", "60°", "120°", "140°"])


def test_mmk12_and_mmstar_rows(local_copies):
    physics, biology = examples_of("mmk12", local_copies)
    assert physics["choices"] == ["1 m/s²", "2 m/s²", "3 m/s²", "4 m/s²"]
    assert physics["groups"] == {"subject": "physics"}
    assert biology["answer"] == "C" and biology["choices"][2] == "ribosome"
    relation, theme = examples_of("mmstar", local_copies)
    assert relation["choices"] == ["The suitcase is on the book.", "The suitcase is beneath the cat.",
                                   "The suitcase is beneath the bed.", "The suitcase is beneath the book."]
    assert theme["choices"] == ["Hanging Posters", "Music", "Home decoration", "Playing guitar"]
    assert (theme["answer"], theme["kind"], theme["groups"]) == ("D", "letter", {"category": "coarse perception"})


def test_mmmu_rows_carry_every_referenced_image_in_order(local_copies):
    by_id = {e["problem"].split("?")[0]: e for e in examples_of("mmmu", local_copies)}
    assert len(by_id) == 5  # both subject configs of the local copy
    derivative = by_id["Which graph is the derivative of <image 4>"]
    # the question names image 4 first, then the options images 1, 2, 3: four images in that order
    colours = [im.getpixel((28, 28)) for im in derivative["images"]]
    assert colours == [(128, 128, 128), (255, 0, 0), (0, 128, 0), (0, 0, 255)]
    assert derivative["problem"].endswith("\n(A) <image 1>\n(B) <image 2>\n(C) <image 3>")
    assert (derivative["answer"], derivative["kind"]) == ("B", "letter")
    waiting = by_id["<image 1> What is the expected waiting time"]
    assert (waiting["kind"], waiting["answer"], waiting["choices"]) == ("math", ["24/7", "3.429"], None)
    assert waiting["groups"] == {"subject": "Math"} and len(waiting["images"]) == 1


def test_a_row_that_cannot_be_used_is_skipped_and_counted(tmp_path):
    rows = [dict(MATHVISTA[0], answer="96"), dict(MATHVISTA[1], decoded_image=None), MATHVISTA[2]]
    path = tmp_path / "mathvista.parquet"
    datasets.Dataset.from_list(rows, features=MATHVISTA_FEATURES).to_parquet(str(path))
    examples, skipped = evaluate.load_examples("mathvista", str(path))
    assert skipped == 2 and [e["answer"] for e in examples] == ["1.2"]


# --- score ------------------------------------------------------------------------------------------------------
def R(answer):
    return f"<think>Reading the figure.</think><answer>{answer}</answer>"


LETTER = {"kind": "letter", "answer": "B", "choices": ["The suitcase is on the book.",
                                                        "The suitcase is beneath the cat.", "97", r"\frac{1}{2}"]}


@pytest.mark.parametrize("answer, expected", [
    ("B", 1.0), ("(B)", 1.0), ("B.", 1.0), ("B: The suitcase is beneath the cat.", 1.0), ("(B) beneath the cat", 1.0),
    (r"\text{B}", 1.0), ("**B**", 1.0), ("The answer is B", 1.0), (r"\boxed{B}", 1.0),
    ("A", 0.0), ("(A) The suitcase is beneath the cat.", 0.0),  # a letter given: the letter counts
    ("The suitcase is beneath the cat.", 1.0), ("the suitcase is beneath the cat", 1.0),  # the option's text
    ("The suitcase is on the book.", 0.0), ("beneath", 0.0), ("", 0.0),
])
def test_score_multiple_choice(answer, expected):
    assert evaluate.score(LETTER, R(answer)) == expected


def test_score_multiple_choice_by_an_option_value():
    example = dict(LETTER, answer="C")
    assert evaluate.score(example, R("97")) == 1.0 and evaluate.score(example, R("97°")) == 1.0
    assert evaluate.score(dict(LETTER, answer="D"), R("0.5")) == 1.0  # math-equal to the option \frac{1}{2}
    assert evaluate.score(example, R("102")) == 0.0
    assert evaluate.score(example, R("The answer is 97")) == 1.0 and evaluate.score(example, R("x = 97")) == 1.0
    assert evaluate.score(example, R("The answer is 102")) == 0.0


# Real MathVista testmini rows (lupantech/MathVista data/testmini.json) whose options read alike: pid 288's and 513's
# options all evaluate as one value (0.0 - 0.2 = 0.2 - 0.4 = -0.2; 43.2% - 63.6% = 42.2% - 62.6% = -20.4%), pid 781
# repeats the right option's text; pid 5 asks "Find m∠H" (options 97, 102, 107, 122; gold A).
PID_288 = {"kind": "letter", "answer": "A", "choices": ["0.0 - 0.2", "0.2 - 0.4", "0.4 - 0.6", "0.6 - 0.8", "0.8 - 1.0"]}
PID_513 = {"kind": "letter", "answer": "C", "choices": ["43.2%-63.6%", "45.2%-65.6%", "42.2%-62.6%", "41.2%-61.6%",
                                                       "44.2%-64.6%"]}
PID_781 = {"kind": "letter", "answer": "C", "choices": ["9", "12", "18", "18"]}
PID_5 = {"kind": "letter", "answer": "A", "choices": ["97", "102", "107", "122"]}


@pytest.mark.parametrize("example, answer, expected", [
    (PID_288, "0.0 - 0.2", 1.0), (PID_288, "0.0-0.2", 1.0), (PID_288, "A", 1.0), (PID_288, "0.2 - 0.4", 0.0),
    (PID_288, "-0.2", 0.0),  # the value all five options share names none of them
    (PID_513, "42.2%-62.6%", 1.0), (PID_513, "C", 1.0), (PID_513, "43.2%-63.6%", 0.0), (PID_513, "-20.4%", 0.0),
    (PID_781, "18", 1.0), (PID_781, "C", 1.0), (PID_781, "D", 1.0),  # D repeats C's text: 18 either way
    (PID_781, "9", 0.0), (PID_781, "12", 0.0), (PID_781, "B", 0.0), (PID_781, "The length is 18", 1.0),
    (PID_5, "∠H = 97°", 1.0), (PID_5, "m∠H = 97", 1.0), (PID_5, "∠H = 102°", 0.0),  # a point's name is no letter
])
def test_score_options_that_read_alike(example, answer, expected):
    assert evaluate.score(example, R(answer)) == expected


@pytest.mark.parametrize("example, answer, expected", [
    ({"answer": "1.2", "precision": 1}, "1.2", 1.0), ({"answer": "1.2", "precision": 1}, "1.20", 1.0),
    ({"answer": "1.2", "precision": 1}, r"\frac{6}{5}", 1.0), ({"answer": "1.2", "precision": 1}, "1.24", 1.0),
    ({"answer": "1.2", "precision": 1}, "1.26", 0.0), ({"answer": "1.2", "precision": 1}, "12", 0.0),
    ({"answer": "1.25", "precision": 2}, "1.25 J", 1.0), ({"answer": "1.25", "precision": 2}, "1.2", 0.0),
    ({"answer": "1000", "precision": 0, "unit": "g"}, "1000", 1.0),
    ({"answer": "1000", "precision": 0, "unit": "g"}, "1000 g", 1.0),
    ({"answer": "1000", "precision": 0, "unit": "g"}, "1,000", 1.0),
    ({"answer": "1000", "precision": 0, "unit": "g"}, "999", 0.0),
    ({"answer": "1000", "precision": 0, "unit": "g"}, "x", 0.0),
    ({"answer": "1.2", "precision": 1}, "The work is 1.2 J", 1.0), ({"answer": "1.2", "precision": 1}, "W = 1.2", 1.0),
    ({"answer": "1.2", "precision": 1}, "The work is 2.1 J", 0.0),
    ({"answer": "1.2", "precision": 1}, "The work is 1.2 J, the force 3 N", 0.0),
])
def test_score_numbers(example, answer, expected):
    example = {"kind": "number", "choices": None, "unit": None, **example}
    assert evaluate.score(example, R(answer)) == expected


@pytest.mark.parametrize("gold, answer, expected", [
    (["24/7", "3.429"], "24/7", 1.0), (["24/7", "3.429"], "3.429", 1.0), (["24/7", "3.429"], r"\frac{24}{7}", 1.0),
    (["24/7", "3.429"], "3.43", 0.0), (["$MgS$", "MgS"], "MgS", 1.0), (["$MgS$", "MgS"], "MgO", 0.0),
    ("14", "14", 1.0), ("14", "14 cm", 1.0), ("14", "15", 0.0), ("2191.7 metres", "2191.7", 1.0),
    ("trans-1-Chloro-4-methylcyclohexane", "trans-1-chloro-4-methylcyclohexane", 1.0),
    ("trans-1-Chloro-4-methylcyclohexane", "cis-1-chloro-4-methylcyclohexane", 0.0),
    ("Tampa", "tampa", 1.0), ("Tampa", "pamta", 0.0),  # words are text, never a product of symbols (an anagram)
    # a sentence stating one value (issue 16), and MathVerse golds that are one (BENCHMARKS.md §2)
    ("14", "The length is 14 cm", 1.0), ("14", "So L = 14.", 1.0), ("14", "The length is 15 cm", 0.0),
    ("14", "L is 14, so r is 3", 0.0), ("$h=15$", "15", 1.0), ("$h=15$", "h = 15", 1.0), ("$h=15$", "51", 0.0),
    (r"Circumference $=50.27 \mathrm{~cm}$", "50.27", 1.0),
    (r"Circumference $=50.27 \mathrm{~cm}$", "The circumference is 50.27 cm.", 1.0),
    (r"Circumference $=50.27 \mathrm{~cm}$", "50.72", 0.0),
])
def test_score_free_form(gold, answer, expected):
    assert evaluate.score({"kind": "math", "answer": gold, "choices": None}, R(answer)) == expected


def test_score_needs_an_answer_and_never_raises():
    example = {"kind": "math", "answer": "14", "choices": None}
    assert evaluate.score(example, "The length is 14.") == 0.0  # no tags, no box: no random guess, no judge
    assert evaluate.score(example, r"So L = \boxed{14}.") == 1.0  # the last box, as in training
    assert evaluate.score({"kind": "letter", "answer": "B", "choices": None}, None) == 0.0
    assert evaluate.score({"kind": "number"}, R("3")) == 0.0  # a malformed example: 0, not an exception


def test_training_format_scores_as_the_training_reward():
    from plumbing import data
    for row in geo3k_rows():
        example = evaluate.training_example(row, data.COLUMNS, None)
        for choice in json.loads((GEO3K_SAMPLE /
                                  str(row["id"]) / "data.json").read_text())["choices"]:
            assert evaluate.score(example, R(choice)) == reward.accuracy_reward(R(choice), row["answer"])


# --- end to end -------------------------------------------------------------------------------------------------
def test_eval_all_benchmarks_end_to_end(tmp_path, tiny_model_dir, geo3k_dir, local_copies):
    out = tmp_path / "table1.json"
    report = evaluate.main([
        "--model", str(tiny_model_dir), "--baseline", str(tiny_model_dir) + "/",  # the same model, another name
        "--bench", "all", *[f"--data={name}={path}" for name, path in local_copies.items()],
        f"--data=geo3k={geo3k_dir}", "--device", "cpu", "--max-new-tokens", "4", "--limit", "3", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["benchmarks"] == list(evaluate.BENCHMARKS) and set(saved["max_new_tokens"].values()) == {4}
    models = saved["models"]
    for bench, n in {"mathvista": 3, "mathverse": 3, "mmk12": 2, "mmstar": 2, "mmmu": 3, "geo3k": 2}.items():
        for model in models:
            result, records = saved["results"][model][bench], saved["responses"][model][bench]
            assert result["problems"] == len(records) == n
            # recomputed from the stored responses by `score` itself
            assert result["accuracy"] == sum(r["correct"] for r in records) / n
    # the baseline is the same model by another name, answering the same prompts greedily: the same answers
    first, second = (saved["responses"][m] for m in models)
    assert all([r["response"] for r in first[b]] == [r["response"] for r in second[b]] for b in first)
    table = out.with_suffix(".md").read_text()
    assert "| Qwen2.5-VL-3B (paper)" in table and "57.8" in table and "48.9" in table and "difference" in table
    assert "MathVerse" in table and "geometry3k" in table
    assert saved["results"][models[0]]["mathverse"]["breakdown"]["problem_version"]["Vision Only"]["problems"] == 1
    assert saved["results"][models[0]]["mmstar"]["breakdown"]["category"]["coarse perception"]["problems"] == 2
    assert out.with_suffix(".png").stat().st_size > 0 and report["results"] == saved["results"]


def test_response_length_limits(tmp_path, tiny_model_dir, geo3k_dir, local_copies, monkeypatch):
    """Without --max-new-tokens: 2048 new tokens for the paper's benchmarks, training's 1024 for geometry3k, also
    when both are evaluated together. (Generation is replaced by a stand-in that records the limit it is given.)"""
    limits = {}

    def stand_in(model, processor, examples, config, *args, progress="", **kwargs):
        limits[progress.split()[-1]] = config.max_new_tokens
        return [{"texts": ["<answer>1</answer>"], "lengths": [3], "truncated": [False]} for _ in examples]
    monkeypatch.setattr(evaluate.rollout, "answer", stand_in)
    evaluate.main(["--model", str(tiny_model_dir), "--bench", "mathvista,geo3k", "--device", "cpu", "--limit", "1",
                   f"--data=mathvista={local_copies['mathvista']}", f"--data=geo3k={geo3k_dir}",
                   "--out", str(tmp_path / "r.json")])
    assert limits == {"mathvista": 2048, "geo3k": 1024}
    assert json.loads((tmp_path / "r.json").read_text())["max_new_tokens"] == limits


def test_unknown_benchmark_is_a_clear_error():
    with pytest.raises(SystemExit):
        evaluate.main(["--bench", "mathvision"])


# --- explain_score: how score read an answer ---------------------------------------------------------------------
def score_tables():
    """(example, answer, expected) of every score table above."""
    marks = lambda test: test.pytestmark[0].args[1]  # noqa: E731
    yield from ((LETTER, answer, expected) for answer, expected in marks(test_score_multiple_choice))
    yield from marks(test_score_options_that_read_alike)
    yield from (({"kind": "number", "choices": None, "unit": None, **example}, answer, expected)
                for example, answer, expected in marks(test_score_numbers))
    yield from (({"kind": "math", "answer": gold, "choices": None}, answer, expected)
                for gold, answer, expected in marks(test_score_free_form))


def test_explain_score_agrees_with_score_on_every_table():
    rows = list(score_tables())
    assert len(rows) == 76
    for example, answer, expected in rows:
        e = evaluate.explain_score(example, R(answer))
        assert e["accuracy"] == evaluate.score(example, R(answer)) == expected, (example, answer)
        assert (e["accuracy_reason"] is None) == (expected == 1.0), (example, answer, e)
    for row in geo3k_rows():  # training-format data: the training reward's own reading
        from plumbing import data
        example = evaluate.training_example(row, data.COLUMNS, None)
        for choice in json.loads((GEO3K_SAMPLE / str(row["id"]) / "data.json").read_text())["choices"]:
            e, t = evaluate.explain_score(example, R(choice)), reward.explain(R(choice), row["answer"])
            assert (e["accuracy"], e["reading"], e["gold_reading"], e["reason"]) == \
                (t["accuracy"], t["reading"], t["gold_reading"], t["reason"])


@pytest.mark.parametrize("example, answer, reading, gold_reading, reason", [
    (LETTER, "A", "A", "B", "another letter: A for B"),
    (LETTER, "The suitcase is beneath the cat.", "option B", "B", None),  # no letter: the option's text
    (LETTER, "The suitcase is on the book.", "option A", "B", "another option: A for B"),
    (LETTER, "beneath", None, "B", "no letter, and no one option's text or value"),
    (dict(LETTER, choices=None), "beneath", None, "B", "no letter (the options are not at hand)"),
    ({"kind": "number", "answer": "1.2", "precision": 1}, "1.24 J", "1.2", "1.2", None),
    ({"kind": "number", "answer": "1.2", "precision": 1}, "1.26", "1.3", "1.2", "another number: 1.3 for 1.2"),
    ({"kind": "number", "answer": "1000", "precision": 0}, "x", None, "1000", "no number read"),
    ({"kind": "math", "answer": ["24/7", "3.429"], "choices": None}, "3.429", "3.429", "3.429", None),
    ({"kind": "math", "answer": "14", "choices": None}, "L is 14, so r is 3", None, "14",
     "the answer could not be read (words that state no one value)"),
])
def test_explain_score_says_how_each_kind_was_read(example, answer, reading, gold_reading, reason):
    e = evaluate.explain_score(example, R(answer))
    assert (e["reading"], e["gold_reading"], e["reason"]) == (reading, gold_reading, reason)


def test_explain_score_never_raises():
    assert evaluate.explain_score({"kind": "letter", "answer": "B", "choices": None}, None)["accuracy"] == 0.0
    assert evaluate.explain_score({"kind": "number"}, R("3"))["reason"]  # a malformed example: a reason, no error


# --- eval.py --explain ---------------------------------------------------------------------------------------------
class Page(HTMLParser):
    """What a browser would build from the page: the tags, the text inside <pre>, images, the selectors' options,
    the filters, the groups (their data- attributes) and, per response row, its class, data-cut and cells' text."""

    def __init__(self):
        super().__init__()
        self.tags, self.pre, self.images, self.options, self.inputs, self.groups, self.rows = [], [], [], {}, [], [], []
        self.scripts, self._in, self._select = [], [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag in ("pre", "script"):
            (self.pre if tag == "pre" else self.scripts).append("")
        self.images += [attrs["src"]] if tag == "img" else []
        if tag == "select":
            self._select = attrs["id"]
            self.options[self._select] = []
        if tag == "option":
            self.options[self._select].append(attrs["value"])
        self.inputs += [attrs.get("id") or attrs.get("value")] if tag == "input" else []
        if tag == "section" and attrs.get("class") == "group":
            self.groups.append(attrs)
        if tag == "tr" and "response" in attrs.get("class", ""):
            self.rows.append({"class": attrs["class"].split()[1], "cut": attrs["data-cut"], "cells": []})
        if tag == "td" and self.rows and len(self._in) and self._in[-1] == "tr":
            self.rows[-1]["cells"].append("")
        self._in.append(tag)

    def handle_endtag(self, tag):
        while self._in and self._in.pop() != tag:  # (td, li and p may close implicitly)
            pass

    def handle_data(self, text):
        if "pre" in self._in:
            self.pre[-1] += text
        elif self._in and self._in[-1] == "script":
            self.scripts[-1] += text
        if "td" in self._in and self.rows and "pre" not in self._in:
            self.rows[-1]["cells"][-1] += text


def read_page(path) -> Page:
    page = Page()
    page.feed(path.read_text())
    return page


@pytest.mark.slow  # a whole run, then its page
def test_explain_page_shows_every_logged_group_escaped_and_bounded(tmp_path, toy_dir):
    """A run's page: the curves, then each logged group of the shown steps with its image and all G responses, each
    with its numbers, the final answer as the grader reads it, and why each 0 is a 0. Responses are text, never
    markup: one holding <script> or closing tags leaves the page's structure whole."""
    import apo
    from plumbing import pictures
    out = apo.train(apo.parse_args(["--model", "toy", "--data", str(toy_dir), "--out", str(tmp_path / "run"),
                                    "--prompts-per-step", "4", "--group-size", "4", "--max-new-tokens", "20",
                                    "--steps", "3", "--eval-every", "0", "--log-samples", "1",
                                    "--log-random-samples", "1"]))
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert {s["chosen"] for s in samples} == {"first", "random"}
    hostile = ["<script>alert(1)</script>", "</pre></td></tr></table></section><em>bold", "<think>a</think><answer>"
               "</td><script>x</script></answer>", "y" * 5000]
    samples.append(dict(samples[-1], step=3, responses=hostile, truncated=[False, False, False, True],
                        correct=[True, False, False, False], format=[0.0, 0.0, 0.5, 0.0], rewards=[1.0, 0.0, 0.5, 0.0]))
    regraded = "the grader now reads it as wrong (right when graded): it has changed since"  # the first, logged right
    (out / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))

    for steps_shown, expected_steps in ((0, [0, 1, 2, 3]), (30, [0, 1, 2, 3]), (2, [0, 3])):
        evaluate.main(["--explain", str(out), "--explain-steps", str(steps_shown)])
        page = read_page(out / "explain.html")
        assert page.tags.count("script") == 1 and page.scripts == [pictures.PAGE_SCRIPT]  # the filters' alone
        assert "em" not in page.tags  # no response became markup
        assert page.options["part"] == ["all"] + [f"step-{t}" for t in expected_steps]  # first and last always
        assert page.options["chosen"] == ["all", "first", "random"]
        assert {"wrong", "cut", "flat"} <= set(page.inputs)  # the filters: wrong only, cut only, no signal
        shown = [s for s in samples if s["step"] in expected_steps]
        assert len(page.groups) == len(shown) and len(page.rows) == 4 * len(shown)
        assert [g["data-chosen"] for g in page.groups] == [s["chosen"] for s in shown]
        assert [g["data-flat"] for g in page.groups] == [str(int(len(set(s["rewards"])) == 1)) for s in shown]
        texts = [r if len(r) <= 3000 else r[:3000] + f" … ({len(r) - 3000} more characters)"
                 for s in shown for r in s["responses"]]
        assert page.pre == texts  # every response, in order, as text (cut at 3,000 characters)
        assert len(page.images) == 2 + len(shown) and all(i.startswith("data:image/png;base64,") for i in page.images)
        # per response: acc, fmt, r, Â⁰, 1 + w, Â, κ, KL, tokens (✂ when cut), the reading, why a 0
        for row, (s, i) in zip(page.rows, [(s, i) for s in shown for i in range(len(s["responses"]))]):
            label, *numbers, read, why = row["cells"]
            logged = [float(s["correct"][i]), s["format"][i], s["rewards"][i], s["advantages0"][i],
                      s["stcr_multipliers"][i], s["advantages"][i], s["kl_weights"][i], s["kl"][i], s["lengths"][i]]
            assert [float(n.strip(" ✂")) for n in numbers[:4] + numbers[5:]] == \
                [float(f"{v:.3g}") for v in logged[:4] + logged[5:]]  # 3 significant digits
            w = logged[4] - 1  # STCR's 1 + w, to 3 significant digits of w
            assert numbers[4] == ("1" if w == 0 else f"1 {'+' if w > 0 else '−'} {abs(w):.3g}")
            assert row["class"] == ("right" if s["correct"][i] else "wrong")
            assert (row["cut"] == "1") == s["truncated"][i] == numbers[-1].endswith("✂")
            e = reward.explain(s["responses"][i], s["answer"])
            assert read.startswith("no answer" if e["answer"] is None else f"answer {e['answer']} ")
            assert e["reading"] is None or f"read as {e['reading']}" in read
            reasons = (["cut at the token limit"] if s["truncated"][i] else []) + [e["reason"] or ""] + \
                [regraded if s["correct"][i] and not e["accuracy"] else ""]
            assert why == "; ".join(r for r in reasons if r)  # a reason for each 0, and none for a full reward
            assert bool(why) == (s["rewards"][i] < 1.5 or s["truncated"][i])
    assert (out / "explain.html").stat().st_size < 400_000

    # a run of an earlier version: no correct, format, truncated, kl, chosen or row: drawn, saying 'not logged'
    old = [{k: v for k, v in s.items() if k not in ("correct", "format", "truncated", "kl", "chosen", "row")}
           for s in samples]
    (out / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in old))
    evaluate.main(["--explain", str(out)])
    page = read_page(out / "explain.html")
    assert len(page.groups) == len(old) and page.pre == [r if len(r) <= 3000 else r[:3000] + f" … ({len(r) - 3000}"
                                                          " more characters)" for s in old for r in s["responses"]]
    assert all(row["class"] == "unknown" and row["cells"][1:3] == ["not logged"] * 2 for row in page.rows)
    assert all(row["cells"][8] == "not logged" for row in page.rows)  # KL
    assert html.unescape((out / "explain.html").read_text()).count(
        "not logged by this run's version: correct, format, truncated, kl, chosen") == len(old)

    # the data moved away since the run: the page is still drawn, each group saying why it has no image
    (out / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    args = json.loads((out / "args.json").read_text())
    (out / "args.json").write_text(json.dumps(dict(args, data=str(tmp_path / "moved"))))
    evaluate.main(["--explain", str(out)])
    page = read_page(out / "explain.html")
    assert len(page.groups) == len(samples) and len(page.images) == 2  # the curves alone
    assert (out / "explain.html").read_text().count(f"no image (the data is not at hand: {tmp_path}/moved") == len(samples)


def test_explain_page_of_an_evaluation(tmp_path):
    """`--explain RESULT.json`: each problem of each benchmark with every model's answer, read as score read it."""
    problems = [  # (benchmark, example, the two models' responses)
        ("mathvista", dict(PID_5, problem="Find m∠H"), [R("A"), R("∠H = 102°")]),
        ("mathvista", {"kind": "number", "answer": "1.2", "precision": 1, "choices": None, "problem": "The work?"},
         [R("The work is 1.2 J"), "<think>W = F·d, and F is" + " so" * 400]),
        ("mmmu", {"kind": "math", "answer": ["24/7", "3.429"], "choices": None, "problem": "<b>ratio</b>"},
         [R(r"\frac{24}{7}"), R("</td></tr><script>alert(1)</script>")]),
        ("geo3k", {"kind": None, "answer": r"5 \sqrt { 3 }", "choices": None, "problem": "<image>Find y."},
         [R(r"5\sqrt{3}"), R("8.66")]),
    ]
    responses = {m: {} for m in ("policy", "baseline")}
    for bench, example, texts in problems:
        for model, text in zip(responses, texts):
            responses[model].setdefault(bench, []).append(
                {"problem": example["problem"], "answer": example["answer"], "kind": example["kind"], "groups": {},
                 "choices": example["choices"], "precision": example.get("precision"), "response": text,
                 "correct": evaluate.score(example, text) > 0, "format": reward.format_reward(text) > 0,
                 "length": len(text) // 4, "truncated": text.endswith("so")})
    benches = list(dict.fromkeys(b for b, _, _ in problems))
    summaries = {m: {b: evaluate.summarize(responses[m][b], 0) for b in benches} for m in responses}
    path = tmp_path / "table1.json"
    path.write_text(json.dumps({"models": list(responses), "benchmarks": benches, "max_new_tokens": {},
                                "results": summaries, "responses": responses}))
    evaluate.main(["--explain", str(path)])
    page = read_page(tmp_path / "table1.html")
    assert "em" not in page.tags and page.tags.count("script") == 1
    assert page.options["part"] == ["all"] + [f"benchmark-{b}" for b in benches]
    assert {"wrong", "cut", "split"} <= set(page.inputs)  # the models disagree: a filter
    assert len(page.groups) == len(problems) and page.pre == [t for _, _, texts in problems for t in texts]
    assert [g["data-split"] for g in page.groups] == ["1"] * 4  # each model right once
    for row, (bench, example, text) in zip(page.rows, [(b, e, t) for b, e, ts in problems for t in ts]):
        label, acc, fmt, tokens, read, why = row["cells"]
        e = evaluate.explain_score(example, text)
        assert float(acc) == e["accuracy"] and row["class"] == ("right" if e["accuracy"] else "wrong")
        assert (row["cut"] == "1") == text.endswith("so") == tokens.endswith("✂")
        assert why == "; ".join(r for r in (["cut at the token limit"] if text.endswith("so") else []) +
                                [e["reason"] or ""] if r)
    assert [r["cells"][-2].removesuffix("response") for r in page.rows] == [
        "answer A (<answer>) → read as A", "answer ∠H = 102° (<answer>) → read as option B",  # by its value
        "answer The work is 1.2 J (<answer>) → read as 1.2", "no answer",
        r"answer \frac{24}{7} (<answer>) → read as 24/7",
        "answer </td></tr><script>alert(1)</script> (<answer>) → read as nothing",  # text, not markup
        r"answer 5\sqrt{3} (<answer>) → read as 5*sqrt(3)", "answer 8.66 (<answer>) → read as 8.66"]
    assert [r["cells"][-1] for r in page.rows] == [
        "", "another option: B for A", "", "cut at the token limit; no answer tags and no \\boxed{…}; the format: no "
        "</think>", "", "the answer could not be read (words that state no one value)", "",
        "another value: 8.66 for 5*sqrt(3)"]


def test_the_readme_screenshot_page_renders(tmp_path, monkeypatch):
    """tools/explain_demo.py (docs/explain.png): hand-written responses to the real geometry3k problems, through the
    run page: every response there, and each 0 with its reason."""
    import importlib.util
    from conftest import REPO
    spec = importlib.util.spec_from_file_location("explain_demo", REPO / "tools" / "explain_demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    monkeypatch.setattr("sys.argv", ["explain_demo.py", "--out", str(tmp_path / "run")])
    demo.main()
    page = read_page(tmp_path / "run" / "explain.html")
    assert len(page.groups) == len(demo.GROUPS) and page.pre == [t for g in demo.GROUPS for t, _, _ in g[3]]
    assert len(page.images) == 2 + len(demo.GROUPS)  # the curves, and each problem's diagram
    assert all(row["cells"][-1] for row in page.rows if row["class"] == "wrong")
    assert [g["data-flat"] for g in page.groups] == ["0", "0", "0", "1", "0"]  # the group that all answer 60
