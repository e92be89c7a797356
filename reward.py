"""Rewards of APO (APO_SPEC §1): r_i = acc_i + fmt_i, with acc ∈ {0, 1} and fmt ∈ {0, 0.5}.

- format_reward:   0.5 when the response is `<think>…</think>` then `<answer>…</answer>`, each tag once.
- accuracy_reward: 1.0 when the final answer equals the gold mathematically (math-verify: `parse`, `verify`).

Where this deviates from the authors (examples/scripts/reward_func.py), i.e. the Decisions of APO_SPEC §1:
- a response without answer tags still gets its last \\boxed{…} checked (accuracy only, never format);
- a gold that cannot be parsed is a data error, not a success: parse_gold gives None, and the training loop
  reports and skips the row (the authors' code gives reward 1.0);
- a multiple-choice gold (a letter A–F) is compared as a letter, exactly (the authors' substring test scores
  "(D) 80 degrees" wrong because "degrees" holds other letters).
Added here: bare-LaTeX golds ("2 \\sqrt { 221 }") are read whole, and every call has a time budget.
"""
import logging
import re
import signal
import threading
from math import inf

from math_verify import parse, verify
from sympy import Basic, E, Float, Pow, Rational, exp
from sympy.core.parameters import global_parameters

logging.getLogger("math_verify").setLevel(logging.ERROR)  # quiet its "timeout is disabled": we keep time

_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_FORMAT = re.compile(r"<think>(.*)</think>\s*<answer>(.*)</answer>", re.DOTALL)


def format_reward(response: str) -> float:
    """0.5 for exactly `<think>X</think> <answer>Y</answer>` with X, Y not blank; else 0.0 (APO_SPEC §1)."""
    try:
        # Exactly one of each tag; counted first, which also keeps the regex below linear on huge strings.
        if any(response.count(tag) != 1 for tag in _TAGS):
            return 0.0
        # Anchored full match after strip(), as the authors' ^<think>.+?</think>\s*<answer>.+?</answer>$: only
        # whitespace may stand before <think>, between the blocks, or after </answer>. Blank content is empty.
        m = _FORMAT.fullmatch(response.strip())
        return 0.5 if m and m.group(1).strip() and m.group(2).strip() else 0.0
    except Exception:  # not a string: no format
        return 0.0


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{…} (braces balanced), or None when there is none or it never closes."""
    starts = [m.end() for m in re.finditer(r"\\boxed\s*\{", text)]
    depth = 1
    for m in re.finditer(r"[{}]", text[starts[-1]:] if starts else ""):
        depth += 1 if m.group() == "{" else -1
        if depth == 0:
            return text[starts[-1]:starts[-1] + m.start()]
    return None


def extract_answer(response: str) -> str | None:
    """The final answer: the last <answer>…</answer>, or the \\boxed{…} inside it; else the last \\boxed{…}."""
    try:
        # rfind, not a lazy regex: "<answer>" repeated with no closing tag would make a regex quadratic.
        end = response.rfind("</answer>")
        start = response.rfind("<answer>", 0, end) if end >= 0 else -1
        if start < 0:  # no complete answer block (none, or a truncated one): Decision of APO_SPEC §1
            return _last_boxed(response)
        content = response[start + len("<answer>"):end]
        boxed = _last_boxed(content)
        return (content if boxed is None else boxed).strip()
    except Exception:
        return None


# --- Time. No response may stall training; math-verify's own timeouts use signal.alarm: whole seconds, one
# alarm per parse and per verify, main thread only (ValueError elsewhere). Measured dangers: antlr's parse
# time doubles per nested brace (0.2 s at depth 6, 2.4 s at 12); sympy spends seconds in ONE C-level big-int
# call that no signal can interrupt (sqrt(10^2000 + 1): 1.5 s in a primality test; 10^{10^{10}}: forever);
# symbolic powers expand without end ((x+y+z)^{99}, \cos(\pi/7)^{300}: > 8 s). Hence three layers:
# (1) _too_costly() rejects, before parsing, long answers, deep brackets, factorials, sums, integrals...;
# (2) _size() bounds, on the unevaluated tree parse() returns, the integers and terms sympy could build, so
#     power towers and big powers never reach verify(); (1) and (2) answers score 0;
# (3) _guarded() arms a SIGALRM timer (setitimer: fractions of a second) that stops whatever pure-Python work
#     is left after _BUDGET_S, with math-verify's own timeouts off. Signals exist in the main thread only
#     (where the training loop calls us); in other threads only (1) and (2) hold, so nested trig/log
#     simplifications there can take long.
_MAX_CHARS, _MAX_DEPTH, _MAX_SIZE, _BUDGET_S = 200, 5, 2000, 0.6
# A gold is data, parsed once per row and cached, and a gold cut short would silently zero the accuracy of every
# response to its prompt: it gets a budget that only a pathological gold exhausts, even on a loaded machine.
_GOLD_BUDGET_S = 10.0
_EXPLOSIVE = re.compile(r"[\w)}\]]\s*!|\\binom|\\choose|\\Gamma|\\prod|\\sum|\\int|\\lim")


def _too_costly(s: str) -> bool:
    depth = 0
    for c in s[:_MAX_CHARS]:
        depth += (c in "{([") - (c in "})]")
        if depth > _MAX_DEPTH:
            return True
    return len(s) > _MAX_CHARS or bool(_EXPLOSIVE.search(s))


def _size(e) -> float:
    """Rough bound on the bits of the integers, or the number of terms, that sympy may build from e."""
    if not isinstance(e, Basic):
        return 0  # math-verify's string fallback
    if isinstance(e, Rational):  # Integer included
        return e.p.bit_length() + e.q.bit_length()
    if isinstance(e, Float):  # mantissa bits + |binary exponent|: 1e99999 could become a huge Rational
        return e._mpf_[3] + abs(e._mpf_[2])
    if isinstance(e, (Pow, exp)):
        base, x = e.args if isinstance(e, Pow) else (E, e.args[0])
        # Evaluate the exponent only when it is small itself: that is what catches towers such as 9^{9^{9}}.
        n = 1.0 if not x.is_number else abs(complex(x)) if _size(x) <= 64 else inf
        b = max(_size(base), 1)
        # b·n bits when an integer is raised to a power, up to b^n terms when a sum is (b capped: no overflow)
        return b * max(n, 1) if isinstance(base, Rational) or b == 1 else min(b, _MAX_SIZE) ** min(n, 64) + b * n
    return 1 + sum(_size(a) for a in e.args)  # Add, Mul, functions, relations...: about additive


class _OutOfTime(BaseException):  # not an Exception: math-verify's `except Exception` must not swallow it
    pass


def _alarm(signum, frame):
    raise _OutOfTime


def _guarded(fn, *args, budget_s: float = _BUDGET_S):
    """fn(*args) within budget_s (main thread); None on any error or when out of time."""
    # A timer already running is an outer _guarded's (it keeps the time) or the caller's (left alone).
    armed = threading.current_thread() is threading.main_thread() and signal.getitimer(signal.ITIMER_REAL)[0] == 0
    old = signal.signal(signal.SIGALRM, _alarm) if armed else None
    try:
        try:
            if armed:
                signal.setitimer(signal.ITIMER_REAL, budget_s)
            return fn(*args)
        finally:  # the timer is one-shot: once this has run, or the alarm has fired, no alarm can come
            if armed:
                signal.setitimer(signal.ITIMER_REAL, 0)
    except _OutOfTime:
        if not armed:
            raise  # an outer _guarded's budget ran out: unwind to it
        global_parameters.evaluate = global_parameters.distribute = True  # sympy may be cut in `evaluate(False)`
    except Exception:
        pass
    finally:
        if armed:
            signal.signal(signal.SIGALRM, old)
    return None


def _parse_math(text: str) -> list:
    # math-verify reads bare text by picking numbers out of it ("2 \sqrt { 221 }" -> 221), so text without math
    # delimiters (every geometry3k gold) is wrapped in $…$ and read as ONE LaTeX expression. math-verify's
    # default extractors still read "The answer is 13" or "80°" as the number. Model output is never run as code:
    # LaTeX goes through an ANTLR grammar, and the only text handed to sympy's parse_expr (which uses eval) is what
    # math-verify's expression regex admits: digits, dots, spaces and + - * × / ÷ ^ ( ), no names.
    if not any(d in text for d in ("$", "\\(", "\\[")):
        text = f"${text}$"
    parsed = parse(text, parsing_timeout=None)  # None: no signal.alarm of its own, _guarded keeps time
    return parsed if max(map(_size, parsed), default=0) <= _MAX_SIZE else []


_LETTER_GOLD = re.compile(r"\(?([A-F])\)?")  # "D" or "(D)": a multiple-choice gold (Decision, APO_SPEC §1)
# The leading choice letter of a prediction: "D", "D.", "(D) 80 degrees", "**D**", "\text{D}"; not "Done".
_LETTER_PRED = re.compile(r"\W*(?:\\(?:text|textbf|mathrm|mathbf)\{)?\W*([A-F])(?![A-Za-z0-9])")
_GOLDS: dict = {}  # G responses share a gold: parse it once; failures are not cached (a timeout may pass)


def parse_gold(answer: str):
    """The gold as accuracy_reward needs it: a letter "A"–"F", or math-verify's parse list; None if unparseable."""
    try:
        if answer not in _GOLDS:
            letter = _LETTER_GOLD.fullmatch(answer.strip())
            parsed = letter.group(1) if letter else (
                None if _too_costly(answer) else _guarded(_parse_math, answer, budget_s=_GOLD_BUDGET_S))
            # Only math-verify's string fallback (no sympy object) means it could not be parsed.
            if isinstance(parsed, str) or any(isinstance(p, Basic) for p in parsed or []):
                _GOLDS[answer] = parsed
        return _GOLDS.get(answer)
    except Exception:  # e.g. not a string
        return None


def _accurate(response: str, gold) -> bool:
    pred = extract_answer(response)
    if not pred:
        return False
    if isinstance(gold, str):  # a letter gold: the leading choice letter, exactly
        m = _LETTER_PRED.match(pred[:_MAX_CHARS])
        return bool(m) and m.group(1) == gold
    return not _too_costly(pred) and verify(gold, _parse_math(pred), timeout_seconds=None)


def accuracy_reward(response: str, answer: str) -> float:
    """1.0 when the final answer of `response` equals the gold `answer` (APO_SPEC §1), else 0.0. Never raises."""
    gold = parse_gold(answer)  # outside the response's budget: it has its own (an unparseable gold is reported
    if gold is None:           # by the training loop, through parse_gold, and never rewarded)
        return 0.0
    return 1.0 if _guarded(_accurate, response, gold) else 0.0  # one budget for extraction, parse and verify
