"""Rewards of APO (APO_SPEC §1): r_i = acc_i + fmt_i, with acc ∈ {0, 1} and fmt ∈ {0, 0.5}.

- format_reward:   0.5 when the response is `<think>…</think>` then `<answer>…</answer>`, each tag once.
- accuracy_reward: 1.0 when the final answer equals the gold (math-verify's `verify` for values).
- explain:         how both read a response (the answer, the gold and their readings), and why each 0 is a 0.

The gold decides how an answer is checked (`parse_gold`, APO_SPEC §1 Decisions):
- a letter A–I ("D", "(D)"): a multiple-choice gold, compared as a letter, exactly;
- one mathematical value (a number, an expression, a set, a tuple, an interval, a matrix, an equation): math-verify's
  `verify`, after both sides are read whole as LaTeX. A relation needs a relation (a + b = 90 is not 90), unless its
  left side names one quantity (k = 1, (p, q) = (3, 2), |AB| = 1, f(x) = 1) or a ratio of two (A:B = 1,
  \\frac{NO}{BO} = \\frac{1}{\\sqrt{6}}): then the bare value states it;
- anything else with words or relations that LaTeX cannot hold ("not enough information",
  "\\angle 1 \\cong \\angle 4"), or that reads as no value (12:00 as 12/0): normalized text, exactly. Such a gold is
  never read as a number, so no number can collide with it.
A gold that is none of these is a data error, not a success: parse_gold gives None, and the training loop reports
and skips the row (the authors' code gives reward 1.0).

Answers are read the way models write them: unicode math (√3, 2√2/5, 8π, 3×10², 70°, −5, ½) is turned into LaTeX
first, "1 000" is a thousand, "4 4/11" a mixed number, "\\$5.50" an amount, "28 percent" 28\\%, a short sentence
that states one value is read as that value ("The length is 5√3", "So x = 15.", "Area: 24 cm²"; see _COPULA), so is
an inequality, interval or set after a conclusion ("We find that x < 3", "Therefore x ≥ 5"; _CONCLUDES), values
joined by "and" are a list ("1 and 2 and 3"; _joined), and a short remark after the value that justifies, affirms
or names it is dropped ("15, since the angles are equal", "x ≥ 5 is the solution", "12 (the length of AB)";
_REMARK): words only, no number, none that
denies, corrects or changes the value, so "15, not 16" and "15 (plus one for the end)" are read as no value.
The rule that keeps this safe: an answer is read whole or not at all. math-verify, when LaTeX fails, picks a number
out of the text ("5√2" -> 5, "angle 1 = angle 3" -> 3); here a failed reading scores 0, and so does an answer holding
a symbol this code does not translate, or a sentence with a number besides its value ("x is 15, so y is 3"). No
wrong answer scores 1 because a symbol or a word was dropped.

Other decisions: a response without answer tags still gets its last \\boxed{…} checked (accuracy only, never
format); several \\boxed answers are compared as one set or tuple when the gold is one ("\\boxed{1}, \\boxed{2}"
for {1, 2}), else the last counts; every check has a budget of CPU time.
"""
import functools
import gc
import logging
import re
import signal
import threading
import time
import unicodedata
from fractions import Fraction
from math import inf
from typing import NamedTuple

from latex2sympy2_extended.math_normalization import units as UNIT_NAMES
from math_verify import parse, verify
from math_verify.parser import LatexExtractionConfig
from sympy import Abs, Basic, E, Eq, Float, Mul, Pow, Rational, S, Symbol, Tuple, exp, sstr
from sympy.core.function import AppliedUndef
from sympy.core.parameters import global_parameters
from sympy.core.relational import Relational
from sympy.matrices import MatrixBase
from sympy.sets import Set

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


# ------------------------------------------------------------------------------------------- the final answer
def _boxes(text: str) -> list:
    """Contents of the outermost \\boxed{…} in text (braces balanced), in order; one that never closes is left out.
    One pass over the braces: linear however many boxes a (degenerate) response holds."""
    found, opened, depth = [], [], 0  # opened: (where a box's content starts, the depth its closing brace ends at)
    for m in re.finditer(r"\\boxed\s*\{|[{}]", text):
        if m.group() != "}":
            if m.group() != "{":
                opened.append((m.end(), depth))
            depth += 1
            continue
        depth -= 1
        if opened and depth == opened[-1][1]:
            start = opened.pop()[0]
            if not opened:
                found.append(text[start:m.start()])
    return found


def _answer_span(response: str) -> tuple:
    """(text holding the final answer, whether it came from answer tags): the last complete <answer>…</answer>
    block, else the whole response (whose boxes then count: the Decision of APO_SPEC §1 on untagged answers)."""
    # rfind, not a lazy regex: "<answer>" repeated with no closing tag would make a regex quadratic.
    end = response.rfind("</answer>")
    start = response.rfind("<answer>", 0, end) if end >= 0 else -1
    return (response[start + len("<answer>"):end], True) if start >= 0 else (response, False)


def _final_answer(response: str) -> tuple:
    """(the final answer or None, the boxes it was taken from): see extract_answer."""
    span, tagged = _answer_span(response)
    boxes = _boxes(span)
    return (boxes[-1].strip() if boxes else span.strip() if tagged else None), boxes


def extract_answer(response: str) -> str | None:
    """The final answer: the last <answer>…</answer>, or the last \\boxed{…} inside it; else the last \\boxed{…}."""
    try:
        return _final_answer(response)[0]
    except Exception:
        return None


# Leading choice letter: "D", "D.", "(D) 80 degrees", "**D**", "\text{D}", "D: 80", "The answer is D", "Option D";
# not "Done", not "d", not a point given a value ("∠H = 97°" answers MathVista's "Find m∠H" with a value).
_LETTER = re.compile(r"(?i:(?:the\s+)?(?:correct\s+|final\s+)?(?:answer|option|choice)\s*(?:is\b)?\s*:?\s*)?"
                     r"[^\w\\]*(?:\\(?:text|textbf|mathrm|mathbf)\s*\{)?[^\w\\]*([A-I])(?![A-Za-z0-9]|\s*=)")


def letter_of(answer: str) -> str | None:
    """The choice letter an answer opens with (see _LETTER), or None."""
    m = _LETTER.match(answer[:_MAX_CHARS])
    return m.group(1) if m else None


# --------------------------------------------------------------------------------- reading an answer as math
# Unicode a model writes for math -> LaTeX. A symbol with no entry here makes the answer unreadable (Unread below).
_SYMBOLS = {"−": "-", "–": "-", "—": "-", "×": r"\times ", "⋅": r"\cdot ", "·": r"\cdot ", "∙": r"\cdot ",
            "÷": r"\div ", "±": r"\pm ", "∓": r"\mp ", "°": r"^{\circ}", "∞": r"\infty ", "≤": r"\le ", "⩽": r"\le ",
            "≥": r"\ge ", "⩾": r"\ge ", "≠": r"\ne ", "≈": r"\approx ", "∠": r"\angle ", "≅": r"\cong ",
            "∼": r"\sim ", "∥": r"\parallel ", "⊥": r"\perp ", "△": r"\triangle ", "∈": r"\in ", "∪": r"\cup ",
            "∩": r"\cap ", "′": "'", "√": r"\sqrt", "∛": r"\sqrt[3]", "∜": r"\sqrt[4]"}
_SUPERSCRIPT = re.compile("[⁰¹²³⁴⁵⁶⁷⁸⁹⁺⁻]+")
_SUPERSCRIPT_DIGITS = str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹⁺⁻", "0123456789+-")


def _unicode_to_latex(text: str) -> str:
    """x² -> x^{2}, ½ -> \\frac{1}{2}, √(a+b) -> \\sqrt{a+b}, √15 -> \\sqrt{15}, π -> \\pi, 70° -> 70^{\\circ}, ..."""
    text = _SUPERSCRIPT.sub(lambda m: "^{" + m.group().translate(_SUPERSCRIPT_DIGITS) + "}", text)
    out = []
    for c in text:
        if c in _SYMBOLS:
            out.append(_SYMBOLS[c])
        elif unicodedata.category(c) == "No" and unicodedata.numeric(c, 0) % 1:  # ½ ⅓ ¾ ...
            f = Fraction(unicodedata.numeric(c)).limit_denominator(16)
            out.append(rf"\frac{{{f.numerator}}}{{{f.denominator}}}")
        elif unicodedata.name(c, "").startswith(("GREEK SMALL LETTER ", "GREEK CAPITAL LETTER ")):
            name = unicodedata.name(c).split()[-1].lower()  # π -> pi, Δ -> delta
            out.append("\\" + (name if "SMALL" in unicodedata.name(c) else name.capitalize()) + " ")
        else:
            out.append(c)
    text = unicodedata.normalize("NFKC", "".join(out))  # fullwidth ５ -> 5
    # The radicand of a unicode root: a parenthesis becomes braces, a number is wrapped (√12.5 -> \sqrt{12.5}).
    parts = re.split(r"(\\sqrt(?:\[\d\])?)(?=[(\d])", text)
    for i in range(2, len(parts), 2):
        rest = parts[i]
        if rest[0] == "(":
            depth = 0
            for j, c in enumerate(rest):
                depth += (c == "(") - (c == ")")
                if depth == 0:
                    parts[i] = "{" + rest[1:j] + "}" + rest[j + 1:]
                    break
        else:
            parts[i] = re.sub(r"^(\d+(?:\.\d+)?)", r"{\1}", rest)
    return "".join(parts)


def _untranslated(text: str) -> str | None:
    """The first character left that math-verify would drop (symbols, other numerals, unassigned or private code
    points), or None."""
    return next((c for c in text if ord(c) > 127 and unicodedata.category(c)[0] in "SNC" and c != "\n"), None)


# Words that are not units make text no single value ("not enough information", "angles 2, 3, 6, and 7"): runs of
# three letters or more outside LaTeX commands, and the short English words a sentence needs ("so x is 5", "x is 5")
# but LaTeX would read as products of letters. Units ("2191.7 metres", "70 degrees") are math-verify's to drop.
_WORDS = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{2,}(?![A-Za-z])")
_SHORT_WORDS = {"is", "so", "no", "of", "to", "be", "if", "it"}  # not "or": math-verify reads "5 or 6" as {5, 6}
_UNITS = {u + plural for u in UNIT_NAMES if u.isalpha() for plural in ("", "s", "es")}
_FUNCTIONS = {"sqrt"}  # 2*sqrt(3): math-verify reads it; "sin(30)" without a backslash it reads as s·i·n·30
_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")  # \text{…} and kin, to unwrap


def _has_words(text: str) -> bool:
    # commands (\begin{pmatrix} too) and subscripts (S_{MBCN}: a label) dropped
    text = re.sub(r"\\(?:begin|end)\s*\{\w+\*?\}|\\[A-Za-z]+|_(?:\{[^{}]*\}|\w)", " ", _TEXT.sub(r"\1", text))
    return any(w.lower() in _SHORT_WORDS and not w.isupper()  # NO, IS: points' names
               or len(w) > 2 and w.lower() not in _UNITS | _FUNCTIONS for w in _WORDS.findall(text))


_ANSWER_PHRASE = re.compile(r"^(?i:(?:the\s+)?(?:final\s+)?answer\s*(?:is\b)?\s*[:=]?)\s*")
# Math delimiters ($…$, \(…\), \[…\]; not the escaped \$ of an amount): the whole answer is read as one expression,
# so they only mark math inside prose. Left in, math-verify would read one span of several ("$5$ $3$" -> 3).
_DELIMITERS = re.compile(r"(?<!\\)\$|(?<!\\)\\[()\[\]]")
# Percent after a number, as a word or a sign ("28 percent", "28 pct", "28 percentage", "$28$ %"): written as
# LaTeX's \% (math-verify reads "28\%" as 28/100, but "28  %", spaced, not at all).
_PERCENT = re.compile(r"(?<=[\d}])\s*(?:(?i:percent(?:age)?|per\s+cent|pct)\b|\\?%)")
# A unit of length with a power closing the answer ("24 cm²", "24 units^2"): math-verify drops "\text{cm}^{2}" but
# reads a bare cm^{2} as c·m². Named units only, of two letters or more: 5 x², 3 t², 2 ab² are variables.
_UNIT_POWER = re.compile(r"(?<=[\d}\s])((?i:[cmdk]m|ft|in|inch(?:es)?|yd|yards?|mi|miles?|units?|met(?:er|re)s?|"
                         r"feet|foot))\s*(\^\s*\{?\s*[23]\s*\}?)\s*$")

# A sentence read as the value it states: a lead-in, a copula, then the value alone ("The length is 5√3", "So x = 15.",
# "Area: 24 cm²", "∠ABC is 35°"). The lead-in holds words and names but no number, and the value no word, so the
# value is the sentence's only one: "x is 15, so y is 3" and "x is 5 or 6" state none. The value is then read as a
# bare answer is. "≈", "about", "at least" are no copulas (an approximation or a bound is not the value), and "x is
# not 5" leaves words after the copula.
_COPULA = re.compile(r"(?i:\b(?:is|are|was|be|equals)\b(?:\s+equal\s+to\b)?(?:\s*:)?)|=|:")
# Names a lead-in may hold: \angle 1, \triangle ABC, \overline{AB}, \odot X, x_{1}, x', \sin A, Greek letters. Their
# digits are labels, not values; once they are dropped, only letters, spaces and light punctuation may be left.
_NAMES = re.compile(r"\\(?:angle|measuredangle|triangle|odot|overline|widehat|overarc|arc)\s*(?:\{\w*\}|\w*)|"
                    r"_\{?\w+\}?|'|\\(?:sin|cos|tan|cot|sec|csc|log|ln)\b|\\(?i:var)?(?i:alpha|beta|gamma|delta|"
                    r"epsilon|zeta|eta|theta|iota|kappa|lambda|mu|nu|xi|pi|rho|sigma|tau|upsilon|phi|chi|psi|omega)\b")
_LEAD = re.compile(r"[A-Za-z\s,.()|]*")  # a lead-in once its names are dropped: words, no digit, no operator
# Lead-in words that deny, suppose or relate what follows to another quantity ("It is not true that x is 5", "If x
# is 5", "The side is half of AB, which is 30"): no value of the answer stated.
_NOT_STATED = {"not", "no", "never", "neither", "nor", "none", "if", "unless", "suppose", "assume", "assuming",
               "whether", "without", "except", "than", "wrong", "incorrect", "false", "impossible", "cannot", "fail",
               "fails", "failed", "half", "twice", "double", "triple", "times", "plus", "minus"}
# Or a lead-in that ends in a conclusion, then the value whole with no copula: how an inequality, an interval or a
# set is stated ("We find that x < 3", "Therefore x ≥ 5", "Thus [0, 9)"). Only after these words: "the square of
# x > 4" is about x².
_CONCLUDES = re.compile(r"(?i:\b(?:thus|therefore|hence|so|(?:find|found|get|obtain|have|conclude|see|follows|"
                        r"means|gives|yields|implies)(?:\s+that)?))[\s,]*$")


def _is_lead(lead: str) -> bool:
    return bool(_LEAD.fullmatch(_NAMES.sub(" ", lead))) and not _NOT_STATED & set(re.findall(r"[a-z]+", lead.lower()))


def _stated_value(sentence: str) -> str | None:
    """The value a sentence states (see _COPULA, _CONCLUDES), or None."""
    # \text{ is }: the words it wraps; ~ is a space; "isn't" denies
    sentence = _TEXT.sub(r"\1", sentence).replace("~", " ").replace("’", "'").replace("n't", " not")
    for copula in _COPULA.finditer(sentence):
        lead, value = sentence[:copula.start()], _joined(sentence[copula.end():].strip().rstrip(" ."))
        if _is_lead(lead) and value and not _has_words(value):
            return value
    for start in re.finditer(r"(?:^|(?<=[\s,]))\S", sentence):  # the longest end with no word, after a conclusion
        lead, value = sentence[:start.start()], _joined(sentence[start.start():].strip())
        if not _has_words(value):
            return value if _CONCLUDES.search(lead) and _is_lead(lead) else None
    return None


# Several values joined by "and" ("1 and 2 and 3", "6 \text{ and } 8", "1, 2, and 3", "p = 3 and q = 2"): a list, read
# as "1, 2, 3" is. Only when no part holds a word ("x is 15 and y is 16" stays unread), and not "2 and 1/2" (5/2).
_AND = re.compile(r"\s*,?\s*(?<![A-Za-z\\])and(?![A-Za-z])\s*")


def _joined(text: str) -> str:
    parts = _AND.split(re.sub(r"\\(?:text|mathrm|mbox)\s*\{\s*and\s*\}", " and ", text))
    if len(parts) < 2 or not all(p.strip() and not _has_words(p) for p in parts) or \
            re.search(r"\d\s+and\s+(?:\d+\s*/|\\frac)", text):
        return text
    return ", ".join(p.strip() for p in parts)


# A value then a short remark that justifies or affirms it: "15, since the angles are equal", "15 (by the Pythagorean
# theorem)", "x = 15. This is the answer.", "x ≥ 5 is the solution". The remark is dropped and the rest read as usual.
# It is 12 words at most and nothing else (no number, no math: no second value). A justification holds no word that
# denies, supposes, corrects, offers another value, changes this one or concludes anew ("15, not 16", "15, or more",
# "15 (plus one for the end)", "15, since it is not 16", "AB = 15, from which the area follows"); an affirmation
# only the words of one ("15. This is not the answer", "x = 15, which is the value of y" are no remarks), or,
# after a comma, a full stop or in parentheses, of one that names the quantity ("12 (the length of AB)", "12, the
# measure of angle ABC", "12. This is the length of AB": its words and points named in capitals, nothing else).
_REMARK = re.compile(r"(?i:(?:\s*[,;.]\s*|\s*(\()\s*)((?:since|because|by|using|from|via|this|that|which|it|is|are|the)"
                     r"\b[A-Za-z\s,'’-]*?)|\s+((?:since|because|is|are)\b[A-Za-z\s,'’-]*?))\s*(\))?$")
_JUSTIFIES = {"since", "because", "by", "using", "from", "via"}
_CHANGES = _NOT_STATED | {"or", "but", "however", "although", "though", "instead", "rather", "wait", "actually",
                          "either", "mistake", "error", "then", "which", "so", "thus", "hence", "therefore", "follows",
                          "gives", "yields", "add", "subtract", "more", "less", "fewer", "other", "another", "squared",
                          "cubed", "reciprocal", "inverse", "percent"} | set(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen "
    "eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred thousand million billion".split())
_AFFIRMS = {"this", "that", "which", "it", "it's", "that's", "is", "are", "the", "our", "my", "final", "only",
            "answer", "answers", "solution", "solutions", "set", "result", "value", "required", "desired", "correct",
            "exact"}
_QUANTITY_WORDS = {"of", "in", "length", "measure", "area", "perimeter", "side", "angle", "arc", "segment", "radius",
          "diameter", "height", "base", "units", "degrees"}


def _without_remark(text: str) -> str:
    m = _REMARK.search(text)
    if not m or bool(m.group(1)) != bool(m.group(4)):  # a parenthesis opened is closed, and only then
        return text
    remark = m.group(2) or m.group(3)
    words = re.findall(r"[a-z]+(?:'s)?", remark.lower().replace("’", "'").replace("n't", " not"))
    points = {p.lower() for p in re.findall(r"\b[A-Z]{1,4}\b", remark)}  # AB, ABC: named in capitals
    names = _AFFIRMS | _QUANTITY_WORDS | points if m.group(2) else _AFFIRMS  # (not after a bare space: "15 is the length")
    allowed = (lambda w: w not in _CHANGES) if words[0] in _JUSTIFIES else names.__contains__
    return text[:m.start()] if len(words) <= 12 and all(map(allowed, words)) else text


class Unread(ValueError):
    """Why an answer is no one value (read_value raises it, `explain` shows it; math_value gives None)."""


def _as_latex(text: str) -> str:
    """An answer as one LaTeX expression for math-verify; Unread when it cannot be read without guessing."""
    text = _unicode_to_latex(text)
    symbol = _untranslated(text)
    if symbol:
        raise Unread(f"a symbol the grader does not translate: {symbol} (U+{ord(symbol):04X})")
    text = _ANSWER_PHRASE.sub("", _DELIMITERS.sub(" ", text).strip()).rstrip(" .")
    text = _joined(_without_remark(_PERCENT.sub(r"\\%", text)).rstrip(" ."))
    if _has_words(text):  # a sentence; else LaTeX would read "so 5 and 7" as a product of letters and a set
        text = _stated_value(text)
        if text is None:
            raise Unread("words that state no one value")
    text = _UNIT_POWER.sub(r"\\text{\1}\2", text)
    text = re.sub(r"\\!\s*|\\\$", "", text)  # thin negative space (16,\!386), escaped dollar (\$5.50: an amount)
    text = text.replace("!=", r"\ne ")  # x != 3: not a factorial
    text = re.sub(r"\\widehat\s*\{(\w+)\}", r"\1", text)  # m\widehat{AB}: the arc AB's name (LaTeX reads none)
    text = re.sub(r"(?<![\d.,])\d{1,3}(?: \d{3})+(?!\d)", lambda m: m.group().replace(" ", ""), text)  # 1 000
    # "4 4/11" is a mixed number: written as LaTeX reads one (an integer then \frac: 4\frac{4}{11} = 48/11).
    text = re.sub(r"(?<![\d./])(\d+) +(\d+)/(\d+)(?![\d/])", r"\1\\frac{\2}{\3}", text)
    if re.search(r"\d\s+\d", text):  # "5 3": LaTeX would add them, and a sum is a guess
        raise Unread("numbers side by side")
    return f"${text.strip()}$"


def read_value(text: str):
    """`text` as one sympy value (an expression, a relation, a set, a tuple, an interval or a matrix), or Unread
    saying why not.

    LaTeX extraction only: math-verify's plain-expression fallback picks a number out of whatever it fails to read.
    No time budget of its own: call it under `budgeted`."""
    if len(text) > _MAX_CHARS:
        raise Unread(f"over {_MAX_CHARS} characters")
    latex = _as_latex(text)
    if _too_costly(latex):
        raise Unread("too costly to read: deep brackets, a factorial, a sum, an integral, a limit")
    parsed = parse(latex, [LatexExtractionConfig()], parsing_timeout=None)  # no alarm of its own: we keep time
    if not parsed or not isinstance(parsed[0], (Basic, MatrixBase)):
        raise Unread("LaTeX that reads as no value")
    if _size(parsed[0]) > _MAX_SIZE:
        raise Unread("a value too large to check")
    return parsed[0]


def math_value(text: str):
    """read_value(text), or None where it is no one value."""
    try:
        return read_value(text)
    except Unread:
        return None


def _is_name(e) -> bool:
    """k, x_1, AB (LaTeX reads a·b), |AB|, f(x), (p, q): a quantity's name, not a formula such as a + b or 2x."""
    if isinstance(e, (Mul, AppliedUndef)):
        return all(isinstance(a, Symbol) for a in e.args)
    if isinstance(e, (Abs, Tuple)):
        return all(_is_name(a) for a in e.args)
    return isinstance(e, Symbol)


def _names_a_quantity(e) -> bool:
    """A name (see _is_name) or a ratio of two (A:B, \\frac{NO}{BO}, V_1:V_2): a ratio asked for is one value too.
    Not x/2, 1/x or x^2: a number in it makes it a formula, and x/2 = 3 is not 3."""
    if isinstance(e, Mul) and len(e.args) == 2:
        for num, den in (e.args, e.args[::-1]):
            if isinstance(den, Pow) and den.exp == -1 and _is_name(den.base) and _is_name(num):
                return True
    return _is_name(e)


def math_equal(gold, pred) -> bool:
    """Two math values are equal (math-verify's `verify`). A relation gold (a + b = 90, x < 60) needs a relation:
    math-verify would accept the bare number 90 for a + b = 90. Unless it names the quantity on its left
    (k = 1, (p, q) = (3, 2), A:B = 1): then its right side is the value, and a bare value is compared with it."""
    if pred is None or _needs_relation(gold, pred):
        return False
    if isinstance(gold, Relational) and not isinstance(pred, Relational):
        gold = gold.rhs
    return verify([gold], [pred], timeout_seconds=None)


def _needs_relation(gold, pred) -> bool:
    return isinstance(gold, Relational) and not isinstance(pred, Relational) and not (
        isinstance(gold, Eq) and _names_a_quantity(gold.lhs))


def plain_text(text: str) -> str:
    """Text as compared for text golds: unicode as LaTeX, no $, \\text{} wrappers, sizing or spaces; lower case."""
    text = _unicode_to_latex(text)
    text = re.sub(r"\\(?:text|textbf|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}", r"\1", text)
    text = re.sub(r"\\(?:left|right|displaystyle)\b|\\[,;:! ]|[\s{}$]", "", text)
    return text.rstrip(".").lower()


# --------------------------------------------------------------------------------------------------- the gold
class Gold(NamedTuple):
    kind: str     # 'letter', 'math' or 'text'
    value: object  # the letter; the sympy value; the plain_text


_LETTER_GOLD = re.compile(r"\(?([A-I])\)?\.?")  # "D" or "(D)": a multiple-choice gold (Decision, APO_SPEC §1)
_GOLDS: dict = {}  # G responses share a gold: read it once; failures are not cached (a cut-short read may pass)


def _read_gold(answer: str) -> Gold | None:
    letter = _LETTER_GOLD.fullmatch(answer.strip())
    if letter:
        return Gold("letter", letter.group(1))
    value = math_value(answer)
    if value is not None and not value.has(S.NaN, S.ComplexInfinity):  # 12:00 read as 12/0 is no value
        return Gold("math", value)
    # Not one value: text, if it is text at all (letters or digits, balanced braces), else a data error.
    text = plain_text(answer)
    balanced = answer.count("{") == answer.count("}")
    return Gold("text", text) if balanced and re.search(r"[^\W_]", text) and not _untranslated(text) else None


def parse_gold(answer: str) -> Gold | None:
    """The gold as a Gold(kind, value), or None when it is not a usable gold (APO_SPEC §1 Decision)."""
    try:
        if answer not in _GOLDS:
            gold = budgeted(_read_gold, answer, budget_s=_GOLD_BUDGET_S)
            if gold is not None:
                _GOLDS[answer] = gold
        return _GOLDS.get(answer)
    except Exception:  # e.g. not a string
        return None


def answer_matches(answer: str, gold: Gold) -> bool:
    """Whether a final answer equals the gold, read the gold's way (no time budget of its own)."""
    if gold.kind == "letter":
        return letter_of(answer) == gold.value
    if len(answer) > _MAX_CHARS:  # no value or text gold is this long: not worth reading (see "time" below)
        return False
    if gold.kind == "text":
        return plain_text(answer) == gold.value
    return math_equal(gold.value, math_value(answer))


def is_correct(response: str, gold: Gold) -> bool:
    """Whether the final answer of `response` equals the gold (no time budget of its own: see accuracy_reward)."""
    answer, boxes = _final_answer(response)
    if not answer:
        return False
    if gold.kind == "math" and len(boxes) > 1 and isinstance(gold.value, (Set, Tuple)):
        answer = ", ".join(boxes)  # a set or tuple, boxed one part at a time
    return answer_matches(answer, gold)


def accuracy_reward(response: str, answer: str) -> float:
    """1.0 when the final answer of `response` equals the gold `answer` (APO_SPEC §1), else 0.0. Never raises."""
    gold = parse_gold(answer)  # outside the response's budget: it has its own (an unusable gold is reported
    if gold is None:           # by the training loop, through parse_gold, and never rewarded)
        return 0.0
    return 1.0 if budgeted(is_correct, response, gold) else 0.0  # one budget: extraction, reading, verify


# ------------------------------------------------------------------------------------- the grader, explained
def explain(response: str, answer: str) -> dict:
    """How the rewards read `response` against the gold `answer`, for a person looking for reward bugs (eval.py
    --explain shows it beside each response):
    - answer: the final answer (extract_answer), source: where it stood ('<answer>', '\\boxed in <answer>',
      '\\boxed, no <answer>'; None without one);
    - gold_kind, gold_reading: the gold as parse_gold reads it (the letter, the sympy value, the normalized text);
      reading: the answer read the gold's way (None where it reads as nothing);
    - accuracy, format: accuracy_reward's and format_reward's own values, so that the page can never disagree
      with training;
    - accuracy_reason, format_reason: why that reward is 0 ("another value: 5 for 8", "the format: no </think>"),
      None where it is not; reason: both, joined (None at full reward).
    Never raises."""
    out = {"answer": None, "source": None, "gold_kind": None, "gold_reading": None, "reading": None,
           "accuracy": accuracy_reward(response, answer), "format": format_reward(response)}
    if not isinstance(response, str):
        why = "the response is not a string"
        return dict(out, accuracy_reason=why, format_reason=why, reason=why)
    tagged = _answer_span(response)[1]
    final, boxes = _final_answer(response)
    out["answer"] = final
    if final is not None:
        out["source"] = ("\\boxed in <answer>" if boxes else "<answer>") if tagged else "\\boxed, no <answer>"
    gold, why = parse_gold(answer), None
    if gold is not None:
        out.update(gold_kind=gold.kind, gold_reading=_shown(gold.value))
    if final and gold is not None:
        reading, why = budgeted(_read_against, final, boxes, gold) or (None, None)
        out["reading"] = None if reading is None else _shown(reading)
    if out["accuracy"] == 1:
        why = None
    elif gold is None:
        why = "the gold is not usable (a data error: training reports and skips its row)"
    elif final is None:
        why = "an <answer> never closed, and no \\boxed{…}" if "<answer>" in response else \
            "no answer tags and no \\boxed{…}"
    else:  # (no reason read: out of time, here or in accuracy_reward)
        why = "an empty answer" if not final else why or "the check ran out of time"
    fault = None if out["format"] else f"the format: {_format_fault(response)}"
    return dict(out, accuracy_reason=why, format_reason=fault, reason="; ".join(filter(None, (why, fault))) or None)


def _read_against(answer: str, boxes: list, gold: Gold) -> tuple:
    """(the answer read the gold's way, or None; why it is not the gold, None when it is), as is_correct reads it."""
    if gold.kind == "letter":
        letter = letter_of(answer)
        return letter, ("no choice letter (A–I) where the answer starts" if letter is None else
                        None if letter == gold.value else f"another letter: {letter} for {gold.value}")
    if gold.kind == "math" and len(boxes) > 1 and isinstance(gold.value, (Set, Tuple)):
        answer = ", ".join(boxes)
    if len(answer) > _MAX_CHARS:
        return None, f"the answer could not be read (over {_MAX_CHARS} characters)"
    if gold.kind == "text":
        text = plain_text(answer)
        return text, None if text == gold.value else f"another text: {text!r} for {gold.value!r}"
    try:
        value = read_value(answer)
    except Unread as err:
        return None, f"the answer could not be read ({err})"
    if math_equal(gold.value, value):
        return value, None
    if _needs_relation(gold.value, value):
        return value, f"a relation was needed: {_shown(gold.value)}, not the value alone"
    return value, f"another value: {_shown(value)} for {_shown(gold.value)}"


def _shown(value) -> str:
    """A reading as text: x = 5 for Eq(x, 5), {1, 2} for a set, 0.57 for 0.570000000000000; a letter or a normalized
    text as it is."""
    if isinstance(value, Relational):
        return f"{_shown(value.lhs)} {'=' if isinstance(value, Eq) else value.rel_op} {_shown(value.rhs)}"
    return sstr(value, full_prec=False) if isinstance(value, (Basic, MatrixBase)) else str(value)


def _format_fault(response: str) -> str:
    """Why format_reward gives 0: its own checks, in its order, in words."""
    for tag in _TAGS:
        if response.count(tag) != 1:
            return f"{tag} {response.count(tag)} times" if response.count(tag) else f"no {tag}"
    m = _FORMAT.fullmatch(response.strip())
    return ("text before, between or after the blocks (or the blocks out of order)" if not m else
            "an empty <think> block" if not m.group(1).strip() else "an empty <answer> block")


# ------------------------------------------------------------------------------------------------------- time
# No response may stall training. Some work cannot be interrupted (sympy's C-level big-integer arithmetic), antlr's
# parse time doubles per nested brace, and math-verify's own timeouts (signal.alarm: whole seconds, main thread only)
# are off. Hence three layers; an answer stopped by (1) or (2) scores 0:
# (1) _too_costly() rejects, before parsing, long answers, deep brackets, factorials, sums, integrals...;
# (2) _size() bounds, on the unevaluated tree, the integers and terms sympy could build (power towers, big powers);
# (3) budgeted(): _BUDGET_S seconds of the main thread's own CPU time, kept by a SIGPROF timer (a kernel timer: a
#     watchdog thread would need the GIL that a long C call holds). CPU time, so a loaded machine never cuts a right
#     answer short; the thread's own, so busy torch threads beside it do not; and not the garbage collector's, which
#     is off during a check. Signals exist in the main thread only: elsewhere (1) and (2) alone hold.
_MAX_CHARS, _MAX_DEPTH, _MAX_SIZE, _BUDGET_S = 200, 5, 2000, 0.6
# A gold is data, read once per row and cached, and a gold cut short would silently zero the accuracy of every
# response to its prompt: it gets a budget that only a pathological gold exhausts.
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
    if isinstance(e, MatrixBase):
        return sum(_size(x) for x in e)
    if not isinstance(e, Basic):
        return 0
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


_DEADLINE = [None]  # the main thread's CPU time (time.thread_time) at which the running check is out of time


def _alarm(signum, frame):  # SIGPROF, handled in the main thread
    if _DEADLINE[0] is None:
        return  # the check is over: an alarm sent just before it ended
    left = _DEADLINE[0] - time.thread_time()
    if left > 1e-3:  # other threads ran the process's clock ahead: time is left
        signal.setitimer(signal.ITIMER_PROF, left)
        return
    raise _OutOfTime


@functools.cache
def _warm_up():
    """The first reading loads math-verify's LaTeX grammar and sympy (~0.5 s of CPU): never on a response's budget."""
    half = parse(r"$\frac{1}{2}$", [LatexExtractionConfig()], parsing_timeout=None)
    verify(half, parse("$0.5$", parsing_timeout=None), timeout_seconds=None)


def budgeted(fn, *args, budget_s: float = _BUDGET_S):
    """fn(*args) within budget_s seconds of the main thread's CPU time; None on any error or when out of time."""
    _warm_up()
    # Inside an outer budgeted (a deadline is set), the outer keeps the time; a timer of the caller's is left alone.
    armed = (threading.current_thread() is threading.main_thread() and _DEADLINE[0] is None
             and signal.getitimer(signal.ITIMER_PROF)[0] == 0)
    old = signal.signal(signal.SIGPROF, _alarm) if armed else None
    collecting = armed and gc.isenabled()
    if collecting:
        gc.disable()  # the garbage collector's time is not the check's: it collects after (see (3) above)
    try:
        try:
            if armed:
                _DEADLINE[0] = time.thread_time() + budget_s
                signal.setitimer(signal.ITIMER_PROF, budget_s)
            return fn(*args)
        finally:  # the timer is one-shot and only the handler sets it again, after checking _DEADLINE
            if armed:
                _DEADLINE[0] = None
                signal.setitimer(signal.ITIMER_PROF, 0)
    except _OutOfTime:
        if not armed:
            raise  # an outer budgeted's time ran out: unwind to it
        global_parameters.evaluate = global_parameters.distribute = True  # sympy may be cut in `evaluate(False)`
    except Exception:
        pass
    finally:
        if armed:
            signal.signal(signal.SIGPROF, old)
        if collecting:
            gc.enable()
    return None
