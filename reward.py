"""Rewards of APO (APO_SPEC §1): r_i = acc_i + fmt_i, with acc ∈ {0, 1} and fmt ∈ {0, 0.5}.

- format_reward:   0.5 when the response is `<think>…</think>` then `<answer>…</answer>`, each tag once.
- accuracy_reward: 1.0 when the final answer equals the gold mathematically (math-verify: `parse`, `verify`).

Where this deviates from the authors (examples/scripts/reward_func.py), i.e. the Decisions of APO_SPEC §1:
- a response without answer tags still gets its last \\boxed{…} checked (accuracy only, never format);
- a gold that cannot be parsed is a data error, not a success: parse_gold gives None and the training loop
  reports and skips the row (the authors give reward 1.0);
- a multiple-choice gold (a letter A–F) is compared as a letter, exactly (the authors' substring test scores
  "(D) 80 degrees" wrong because "degrees" holds other letters).
Added here, not in the authors' code: bare-LaTeX golds are read whole, and a time budget (see _guarded).
"""
import logging
import re
import signal

from math_verify import parse, verify
from math import inf

from sympy import Basic, E, Float, Pow, Rational, exp
from sympy.core.parameters import global_parameters

# We switch math-verify's own timeouts off and keep time ourselves (_guarded); silence its warning about it.
logging.getLogger("math_verify").setLevel(logging.ERROR)

_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_FORMAT = re.compile(r"<think>(.*)</think>\s*<answer>(.*)</answer>", re.DOTALL)


def format_reward(response: str) -> float:
    """0.5 for exactly `<think>X</think> <answer>Y</answer>` with X, Y not blank; else 0.0 (APO_SPEC §1)."""
    try:
        # Exactly one of each tag; checked first, it also keeps the regex below linear on huge strings.
        if any(response.count(tag) != 1 for tag in _TAGS):
            return 0.0
        # Anchored full match after strip(), like the authors' `^<think>.+?</think>\s*<answer>.+?</answer>$`:
        # only whitespace may stand before <think> or after </answer>. Whitespace-only content counts as empty.
        m = _FORMAT.fullmatch(response.strip())
        return 0.5 if m and m.group(1).strip() and m.group(2).strip() else 0.0
    except Exception:  # not a string, or worse: no format
        return 0.0


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{…} (braces balanced), or None when there is none or it never closes."""
    starts = [m.end() for m in re.finditer(r"\\boxed\s*\{", text)]
    if not starts:
        return None
    depth = 1
    for m in re.finditer(r"[{}]", text[starts[-1]:]):
        depth += 1 if m.group() == "{" else -1
        if depth == 0:
            return text[starts[-1]:starts[-1] + m.start()]
    return None


def extract_answer(response: str) -> str | None:
    """The final answer: the last <answer>…</answer>, its \\boxed{…} if it holds one; else the last \\boxed{…}."""
    try:
        # rfind, not a lazy regex: "<answer>" repeated without a closing tag would make a regex quadratic.
        end = response.rfind("</answer>")
        start = response.rfind("<answer>", 0, end) if end >= 0 else -1
        if start < 0:  # no complete answer block (or a truncated one): Decision of APO_SPEC §1
            return _last_boxed(response)
        content = response[start + len("<answer>"):end]
        boxed = _last_boxed(content)
        return (content if boxed is None else boxed).strip()
    except Exception:
        return None


# --- Time budget. No response may stall training, and math-verify's own timeouts don't fit: they use
# signal.alarm (whole seconds, main thread only, ValueError elsewhere), one per parse and per verify.
# Measured dangers: antlr's parse time doubles per nested brace (0.2 s at depth 6, 2.4 s at 12); sympy spends
# seconds in ONE C-level big-int call that no signal interrupts (sqrt(10^2000 + 1): 1.5 s in a primality test;
# 10^{10^{10}}: forever); symbolic powers expand without end ((x+y+z)^{99}, \cos(\pi/7)^{300}: > 8 s).
# So: (1) _too_costly() rejects, before parsing, long answers, deep brackets and factorials/sums/...;
# (2) _size() bounds, on the unevaluated tree that parse() returns, the integers and terms sympy could build,
# and rejects power towers and big powers before verify() runs; rejected answers score 0;
# (3) in the main thread a SIGALRM timer (setitimer: fractions of a second) stops any pure-Python work left
# after _BUDGET_S. Outside the main thread only (1) and (2) hold.
_MAX_CHARS, _MAX_DEPTH, _MAX_SIZE, _BUDGET_S = 200, 5, 2000, 0.4
_EXPLOSIVE = re.compile(r"[\w)}\]]\s*!|\\binom|\\choose|\\Gamma|\\prod|\\sum|\\int|\\lim")


def _too_costly(s: str) -> bool:
    if len(s) > _MAX_CHARS or _EXPLOSIVE.search(s):
        return True
    depth = 0
    for c in s:
        depth += (c in "{([") - (c in "})]")
        if depth > _MAX_DEPTH:
            return True
    return False


def _size(e) -> float:
    """Rough bound on the bits of the integers, or the number of terms, that sympy may build from e."""
    if not isinstance(e, Basic):
        return 0  # math-verify's string fallback
    if isinstance(e, Rational):  # Integer included
        return e.p.bit_length() + e.q.bit_length()
    if isinstance(e, Float):  # mantissa bits + |binary exponent|: 1e99999 would become a huge Rational
        return e._mpf_[3] + abs(e._mpf_[2])
    if isinstance(e, (Pow, exp)):
        base, x = e.args if isinstance(e, Pow) else (E, e.args[0])
        if not x.is_number:
            n = 1.0  # a symbolic exponent: nothing to compute
        else:  # evaluate the exponent only when it is small: this is what catches towers like 9^{9^{9}}
            n = abs(complex(x)) if _size(x) <= 64 else inf
        b = max(_size(base), 1)
        # b^n terms when a sum is raised to a power, b·n bits when an integer is
        return b * max(n, 1) if isinstance(base, Rational) or b == 1 else min(b, _MAX_SIZE) ** min(n, 64) + b * n
    return 1 + sum(_size(a) for a in e.args)  # Add, Mul, functions, relations...: about additive


class _OutOfTime(BaseException):  # not an Exception: math-verify's `except Exception` must not swallow it
    pass


def _alarm(signum, frame):
    raise _OutOfTime


def _guarded(fn, *args):
    """fn(*args), or None on any error or when the budget runs out (main thread only, see above)."""
    old, armed = None, False
    if signal.getitimer(signal.ITIMER_REAL)[0] == 0:  # never clobber a timer the caller set
        try:
            old, armed = signal.signal(signal.SIGALRM, _alarm), True
        except ValueError:  # not the main thread: no timer, only _too_costly protects
            pass
    try:
        try:
            if armed:
                signal.setitimer(signal.ITIMER_REAL, _BUDGET_S)
            return fn(*args)
        finally:  # the timer is one-shot: once this has run (or the alarm has fired), no alarm can come
            if armed:
                signal.setitimer(signal.ITIMER_REAL, 0)
    except (Exception, _OutOfTime) as e:
        if isinstance(e, _OutOfTime):  # interrupted sympy may have left `evaluate(False)` switched on
            global_parameters.evaluate = global_parameters.distribute = True
        return None
    finally:
        if armed:
            signal.signal(signal.SIGALRM, old)


def _parse_math(text: str) -> list:
    # math-verify reads bare text by picking numbers out of it ("2 \sqrt { 221 }" -> 221), so text without
    # math delimiters (all geometry3k golds) is wrapped in $…$ to be read as ONE LaTeX expression. Timeouts off:
    # _guarded keeps time. Its default extractors then still read "The answer is 13" or "80°" as a number.
    if not any(d in text for d in ("$", "\\(", "\\[")):
        text = f"${text}$"
    return parse(text, parsing_timeout=None)


def _verify(gold: list, text: str) -> bool:
    pred = _parse_math(text)
    return max(map(_size, pred), default=0) <= _MAX_SIZE and verify(gold, pred, timeout_seconds=None)


_LETTER_GOLD = re.compile(r"\(?([A-F])\)?")  # "D" or "(D)": a multiple-choice gold (Decision, APO_SPEC §1)
# The leading choice letter: "D", "D.", "(D) 80 degrees", "**D**", "\text{D}"; not "Done".
_LETTER_PRED = re.compile(r"\W*(?:\\(?:text|textbf|mathrm|mathbf)\{)?\W*([A-F])(?![A-Za-z0-9])")
_GOLDS: dict = {}  # cache: a group of G responses shares one gold; failures are not cached (retry next time)


def parse_gold(answer: str):
    """The gold as accuracy_reward needs it: a letter "A"–"F", or math-verify's parse list; None if unparseable."""
    try:
        if answer not in _GOLDS:
            letter = _LETTER_GOLD.fullmatch(answer.strip())
            if letter:
                parsed = letter.group(1)
            else:
                parsed = None if _too_costly(answer) else _guarded(_parse_math, answer)
                parsed = None if parsed is None or max(map(_size, parsed), default=0) > _MAX_SIZE else parsed
            # A parse that yields only math-verify's string fallback (no sympy object) is a failure.
            if isinstance(parsed, str) or (parsed and any(isinstance(p, Basic) for p in parsed)):
                _GOLDS[answer] = parsed
        return _GOLDS.get(answer)
    except Exception:
        return None


def accuracy_reward(response: str, answer: str) -> float:
    """1.0 when the final answer of `response` equals the gold `answer` (APO_SPEC §1), else 0.0. Never raises."""
    try:
        gold, pred = parse_gold(answer), extract_answer(response)
        if gold is None or not pred or len(pred) > _MAX_CHARS:
            return 0.0  # an unparseable gold is reported by the caller via parse_gold, not rewarded
        if isinstance(gold, str):  # letter gold: compare the leading choice letter, exactly
            m = _LETTER_PRED.match(pred)
            return float(bool(m) and m.group(1) == gold)
        if _too_costly(pred):
            return 0.0
        return 1.0 if _guarded(_verify, gold, pred) else 0.0
    except (Exception, _OutOfTime):  # a reward must never take training down
        return 0.0
