"""Tests of reward.py (APO_SPEC §1). Expected values are worked out by hand, not read back from the code."""
import json
import random
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from reward import accuracy_reward, extract_answer, format_reward, parse_gold  # noqa: E402

GEO3K = Path(__file__).resolve().parents[2] / "shared" / "geo3k_sample"


def R(answer: str) -> str:
    """A well-formatted response whose final answer is `answer`."""
    return f"<think>Let me work it out.</think>\n<answer>{answer}</answer>"


# --- format_reward -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("response, expected", [
    ("<think>a</think><answer>b</answer>", 0.5),
    ("  <think>a</think>\n\n <answer>b</answer>\n", 0.5),  # whitespace around and between: allowed
    ("<think>step 1\nstep 2</think>\n<answer>\n5\n</answer>", 0.5),  # multi-line content
    ("<think>a</think><answer>b", 0.0),  # missing </answer>
    ("<answer>b</answer>", 0.0),  # missing think
    ("<think>a<answer>b</answer>", 0.0),  # missing </think>
    ("<think>a</think><think>a</think><answer>b</answer>", 0.0),  # doubled think
    ("<think>a</think><answer>b</answer><answer>c</answer>", 0.0),  # doubled answer
    ("<think>a</think><answer>b</answer></answer>", 0.0),  # doubled closing tag
    ("<think></think><answer>b</answer>", 0.0),  # empty think
    ("<think> \n </think><answer>b</answer>", 0.0),  # blank think counts as empty
    ("<think>a</think><answer></answer>", 0.0),  # empty answer
    ("<think>a</think><answer>  </answer>", 0.0),  # blank answer
    ("Sure! <think>a</think><answer>b</answer>", 0.0),  # text before <think>
    ("<think>a</think><answer>b</answer> Done.", 0.0),  # text after </answer>
    ("<think>a</think> so <answer>b</answer>", 0.0),  # text between the blocks
    ("<answer>b</answer><think>a</think>", 0.0),  # wrong order
    ("<THINK>a</THINK><ANSWER>b</ANSWER>", 0.0),  # tags are case-sensitive
    ("", 0.0),
])
def test_format_reward(response, expected):
    assert format_reward(response) == expected


def test_format_reward_not_a_string():
    assert format_reward(None) == 0.0 and format_reward(b"<think>a</think><answer>b</answer>") == 0.0


# --- extract_answer ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("response, expected", [
    ("<answer> 42 </answer>", "42"),
    (r"<answer>\boxed{5}</answer>", "5"),
    (r"<answer>So it is \boxed{\frac{\sqrt{2}}{5}}.</answer>", r"\frac{\sqrt{2}}{5}"),  # nested braces
    (r"<answer>\boxed{1} or rather \boxed{2}</answer>", "2"),  # the last box
    (r"<answer>\boxed {7}</answer>", "7"),  # space before the brace
    (r"<answer>\boxed{5</answer>", r"\boxed{5"),  # a box that never closes: the whole content
    (r"<think>maybe \boxed{3}</think><answer>4</answer>", "4"),  # the answer block wins over a box in think
    ("<answer>1</answer> then <answer>2</answer>", "2"),  # the last answer block
    ("<think>a</think><answer></answer>", ""),
    (r"so \boxed{1} and finally \boxed{2 \sqrt { 221 }}", r"2 \sqrt { 221 }"),  # no tags: the last box
    (r"<think>x \boxed{3}</think><answer>4", "3"),  # truncated answer block: no tags, the last box
    (r"\boxed{5", None),  # no tags, unclosed box
    ("just text, 12", None),  # no tags, no box
    ("", None),
    (None, None),
])
def test_extract_answer(response, expected):
    assert extract_answer(response) == expected


# --- accuracy_reward: equivalent forms ---------------------------------------------------------------------
GOLD_2SQRT221 = r"2 \sqrt { 221 }"


@pytest.mark.parametrize("pred, expected", [
    (r"2\sqrt{221}", 1.0), (r"2 \sqrt { 221 }", 1.0), (r"\sqrt{884}", 1.0), (r"$2\sqrt{221}$", 1.0),
    (r"\boxed{2\sqrt{221}}", 1.0), (r"x = 2\sqrt{221}", 1.0), (r"2*sqrt(221)", 1.0),
    ("221", 0.0), ("2", 0.0), (r"\sqrt{221}", 0.0), (r"2\sqrt{222}", 0.0), ("", 0.0),
])
def test_whole_expression_gold(pred, expected):
    # The gold must be read whole: bare, math-verify would read only the number 221.
    assert accuracy_reward(R(pred), GOLD_2SQRT221) == expected


@pytest.mark.parametrize("gold, pred, expected", [
    (r"\frac { \sqrt { 2 } } { 5 }", r"\frac{\sqrt2}{5}", 1.0),
    (r"\frac { \sqrt { 2 } } { 5 }", r"\sqrt{2}/5", 1.0),
    (r"\frac { \sqrt { 2 } } { 5 }", "5", 0.0),
    (r"\frac { \sqrt { 2 } } { 5 }", "2", 0.0),
    (r"\frac { \sqrt { 2 } } { 5 }", r"\frac{2\sqrt{2}}{5}", 0.0),
    (r"\frac { 2 \sqrt { 2 } } { 5 }", r"\frac{2\sqrt{2}}{5}", 1.0),
    (r"5 \sqrt { 3 }", r"5\sqrt3", 1.0),
    (r"5 \sqrt { 3 }", r"\sqrt{75}", 1.0),
    (r"5 \sqrt { 3 }", "3", 0.0),
    (r"\frac{1}{2}", "0.5", 1.0),
    ("0.5", r"\frac{1}{2}", 1.0),
    ("10.5", r"\frac{21}{2}", 1.0),
    ("10.5", "10", 0.0),
    ("24", "24", 1.0),
    ("24", "The answer is 24", 1.0),
    ("70", r"70^\circ", 1.0),
    ("70", r"70^{\circ}", 1.0),
    ("70", "70°", 1.0),
    ("70", "70 degrees", 1.0),
    ("70", "71", 0.0),
])
def test_equivalent_forms(gold, pred, expected):
    assert accuracy_reward(R(pred), gold) == expected


def test_boxed_without_tags_earns_accuracy_not_format():  # Decision of APO_SPEC §1
    response = r"The side is therefore \boxed{2\sqrt{221}}."
    assert accuracy_reward(response, GOLD_2SQRT221) == 1.0 and format_reward(response) == 0.0


def test_no_answer_at_all():
    assert accuracy_reward("I think it is 2 sqrt 221", GOLD_2SQRT221) == 0.0


# --- letter golds (Decision of APO_SPEC §1) ----------------------------------------------------------------
@pytest.mark.parametrize("pred, expected", [
    ("D", 1.0), ("D.", 1.0), ("(D) 80 degrees", 1.0), ("(D)", 1.0), ("D: 80", 1.0), ("**D**", 1.0),
    (r"\text{D}", 1.0), (r"\boxed{D}", 1.0),
    ("A", 0.0), ("(A) 30", 0.0), ("Done", 0.0), ("d", 0.0), ("80", 0.0), ("", 0.0),
])
def test_letter_gold(pred, expected):
    assert parse_gold("D") == "D" and parse_gold("(D)") == "D"
    assert accuracy_reward(R(pred), "D") == expected


# --- unparseable golds -------------------------------------------------------------------------------------
@pytest.mark.parametrize("gold", ["", "   ", "%%%", r"\frac{", "}{", "$", None, 12, ["x"]])
def test_unparseable_gold(gold):
    assert parse_gold(gold) is None
    assert accuracy_reward(R("1"), gold) == 0.0  # never a success (the authors' code gave 1.0)


# --- the ten real geometry3k rows --------------------------------------------------------------------------
def geo3k_rows():
    if not GEO3K.is_dir():
        pytest.skip(f"geometry3k sample not found at {GEO3K}")
    rows = [json.loads(p.read_text()) for p in sorted(GEO3K.glob("*/data.json"))]
    assert len(rows) == 10
    return rows


def test_geo3k_golds_parse():
    for row in geo3k_rows():
        assert parse_gold(row["choices"][ord(row["answer"]) - 65]) is not None, row["id"]


def test_geo3k_right_choice_scores_1_others_0():
    for row in geo3k_rows():
        right = ord(row["answer"]) - 65
        gold = row["choices"][right]  # the Hub dataset's `answer`: the text of the right choice
        for i, choice in enumerate(row["choices"]):
            expected = 1.0 if i == right else 0.0
            for form in (choice, choice.replace(" ", ""), rf"\boxed{{{choice}}}"):
                assert accuracy_reward(R(form), gold) == expected, (row["id"], gold, form)


# --- robustness: explosive answers, signals, threads -------------------------------------------------------
EXPLOSIVE = [
    "10**10**10", r"10^{10^{10}}", r"9^{9^{9^{9}}}", "9^9^9", r"(10^{999})^{999}", r"\sqrt{(10^{99})^{99}+1}",
    r"\frac{1}{0}", "0^{-1}", "100000!", r"(10^{6})!", r"\binom{10^{9}}{5 \cdot 10^{8}}", r"\Gamma(10^{7})",
    r"\exp(\exp(\exp(99)))", r"e^{e^{e^{99}}}", r"(x+y+z)^{99}", r"\cos(\pi/7)^{300}", r"\sum_{i=1}^{10^{9}} i",
    r"\frac{" * 30 + "1" + "}{2}" * 30, "{" * 300 + "1" + "}" * 300, "9" * 5000, r"\sqrt{" * 100 + "2" + "}" * 100,
    "1e999999999", r"99999999999^{99999999999}", r"\tan(10^{99})", "\x00\xff\ud800", "<answer>" * 10,
]


def _timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


@pytest.mark.parametrize("pred", EXPLOSIVE)
def test_explosive_answers_are_fast_and_wrong(pred):
    for response in (R(pred), rf"\boxed{{{pred}}}"):
        score, seconds = _timed(accuracy_reward, response, GOLD_2SQRT221)
        assert score == 0.0 and seconds < 1.0, (pred[:40], seconds)
    assert accuracy_reward(R(r"\sqrt{884}"), GOLD_2SQRT221) == 1.0  # and nothing was left broken


def test_off_main_thread():
    # No signals there: the correct answer must still score 1, and the guards alone must keep time.
    results = {}

    def work():
        results["right"] = accuracy_reward(R(r"2\sqrt{221}"), GOLD_2SQRT221)
        results["slow"] = [_timed(accuracy_reward, R(p), GOLD_2SQRT221) for p in EXPLOSIVE]

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "a reward hung off the main thread"
    assert results["right"] == 1.0
    for pred, (score, seconds) in zip(EXPLOSIVE, results["slow"]):
        assert score == 0.0 and seconds < 1.0, (pred[:40], seconds)


def test_signal_state_is_restored():
    def mine(signum, frame):
        pass

    old = signal.signal(signal.SIGALRM, mine)
    try:
        assert accuracy_reward(R(r"\sqrt{884}"), GOLD_2SQRT221) == 1.0
        assert signal.getsignal(signal.SIGALRM) is mine and signal.getitimer(signal.ITIMER_REAL)[0] == 0
        signal.setitimer(signal.ITIMER_REAL, 100)  # a timer of the caller's must not be clobbered
        assert accuracy_reward(R(r"\sqrt{884}"), GOLD_2SQRT221) == 1.0
        assert signal.getitimer(signal.ITIMER_REAL)[0] > 90
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# --- fuzz --------------------------------------------------------------------------------------------------
ATOMS = [
    "<think>", "</think>", "<answer>", "</answer>", r"\boxed{", "{", "}", "(", ")", "^", "**", "!", "$", r"\(",
    r"\frac{", r"\sqrt{", r"\sqrt[", r"\left(", r"\right)", r"\cdot", r"\pi", r"\circ", r"\text{", r"\exp(",
    r"\binom{", r"\sum_{i=1}^{", r"\int_0^", "=", "+", "-", "/", ".", ",", " ", "\n", "x", "e", "D", "(D)",
    "10**10**10", r"9^{9^{9}}", r"\frac{1}{0}", "99999!", r"2\sqrt{221}", r"5 \sqrt { 3 }", "80", "13.5",
    "∞", "√", "°", "α", "中文", "🙂", "\x00", "\ufffd", "\ud800",
]


def random_formula(rng: random.Random, depth: int) -> str:
    """A random, mostly well-formed LaTeX expression: it gets past the guards and into sympy."""
    if depth == 0 or rng.random() < 0.25:
        return rng.choice([str(rng.randint(0, 10 ** rng.randint(1, 40))), "x", "y", r"\pi", "e", r"\sqrt{2}",
                           f"{rng.uniform(-100, 100):.{rng.randint(0, 9)}f}", r"70^\circ"])
    a, b = random_formula(rng, depth - 1), random_formula(rng, depth - 1)
    return rng.choice([f"{a}+{b}", f"{a}-{b}", rf"{a} \cdot {b}", rf"\frac{{{a}}}{{{b}}}", rf"\sqrt{{{a}}}",
                       f"{a}^{{{b}}}", f"({a})^{{{rng.randint(0, 999)}}}", rf"\sin({a})", rf"\cos({a})",
                       rf"\log({a})", f"{a}={b}", f"|{a}|", f"-{a}", f"{a}!", f"{a}, {b}", rf"\{{{a}, {b}\}}"])


def random_response(rng: random.Random) -> str:
    kind = rng.random()
    if kind > 0.7:  # a formula, answered or boxed
        f = random_formula(rng, rng.randint(1, 5))
        return R(f) if rng.random() < 0.7 else rf"\boxed{{{f}}}"
    if kind < 0.01:  # very long: up to 1 MB
        unit = rng.choice(["{", "<answer>", r"\boxed{", "9", "<think>a</think>", "^{", "x" * 7 + " "])
        body = unit * (rng.randint(10_000, 1_000_000) // len(unit))
        return rng.choice([body, R(body), r"\boxed{" + body + "}", "<answer>" + body])
    if kind < 0.06:  # binary junk
        return bytes(rng.randrange(256) for _ in range(rng.randint(0, 3000))).decode("latin-1")
    if kind < 0.11:  # random unicode, surrogates included
        return "".join(chr(rng.randrange(0x110000)) for _ in range(rng.randint(0, 500)))
    if kind < 0.21:  # deep nesting or huge numbers or towers
        d = rng.randint(1, 400)
        payload = rng.choice([
            "{" * d + "1" + "}" * d, r"\frac{" * d + "1" + "}{2}" * d, "(" * d + "2" + ")" * d,
            "9" * rng.randint(1, 20_000), "^".join(["9"] * d), r"9^{" * d + "9" + "}" * d, "10" + "**10" * d,
            f"({rng.randint(2, 10**6)}^{{{rng.randint(2, 999)}}})^{{{rng.randint(2, 999)}}}",
            f"{rng.randint(2, 10**6)}!", r"\exp(" * d + "99" + ")" * d,
        ])
        return R(payload) if rng.random() < 0.5 else rf"\boxed{{{payload}}}"
    n = rng.randint(0, 60)  # tag soup from the atoms
    return "".join(rng.choice(ATOMS) for _ in range(n))


def test_fuzz_never_raises_and_is_fast():
    rng = random.Random(1234)
    golds = [GOLD_2SQRT221, r"\frac { 2 \sqrt { 2 } } { 5 }", "10.5", "70", "D", "%%%"]
    slowest, n = (0.0, ""), 3000
    for _ in range(n):
        response, gold = random_response(rng), rng.choice(golds)
        for fn, args, allowed in (
            (format_reward, (response,), (0.0, 0.5)),
            (accuracy_reward, (response, gold), (0.0, 1.0)),
            (accuracy_reward, (gold, response[:300]), (0.0, 1.0)),  # junk as the gold
        ):
            out, seconds = _timed(fn, *args)
            assert out in allowed and type(out) is float, (fn.__name__, response[:80])
            assert seconds < 1.0, (fn.__name__, seconds, response[:80])
            slowest = max(slowest, (seconds, f"{fn.__name__}({response[:60]!r})"))
        extract_answer(response)
        parse_gold(response[:300])
    print(f"\nfuzz: {n} responses, slowest call {slowest[0]:.3f} s: {slowest[1]}")


def test_model_output_is_never_run_as_code(tmp_path):
    marker = tmp_path / "ran"
    for payload in (f"__import__('os').system('touch {marker}')", f"exec(\"open('{marker}', 'w')\")",
                    f"$__import__('pathlib').Path('{marker}').touch()$"):
        for response in (f"<think>x</think><answer>{payload}</answer>", f"so \\boxed{{{payload}}}", payload):
            assert accuracy_reward(response, "3") == 0.0
    assert not marker.exists()


def test_gold_parse_is_not_cut_by_the_response_budget(monkeypatch):
    """A gold is parsed with its own, larger budget: a slow first parse (a cold or loaded machine) must not turn
    into 'unparseable gold' or silently zero the accuracy of every response to the prompt."""
    import time
    import reward
    real = reward._parse_math

    def slow(text):
        time.sleep(2 * reward._BUDGET_S)
        return real(text)
    monkeypatch.setattr(reward, "_parse_math", slow)
    monkeypatch.setattr(reward, "_GOLDS", {})
    assert reward.parse_gold("2 \\sqrt { 221 }") is not None
    monkeypatch.setattr(reward, "_parse_math", real)
    assert accuracy_reward("<think>x</think><answer>2\\sqrt{221}</answer>", "2 \\sqrt { 221 }") == 1.0
