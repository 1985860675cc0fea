"""Final answers: extract them from free text, normalize them, decide equivalence, grade against a Problem.

Extraction looks for the strong markers ``#### N`` (GSM8K), ``\\boxed{...}`` (balanced braces), "The answer is
N" and "Final Answer: N"; the marker that appears *last* in the text wins (a response may quote a peer's answer
before giving its own). With no marker, the last number in the text is taken and recorded as method
``last_number`` so callers can tell a guess from a stated answer. Multiple-choice parsing (``choices`` given)
accepts a letter only in answer position: after a marker, in parentheses, or as the whole reply; the article
"a" inside a sentence is never answer A.

Normalization turns "$1,234.00", "1 000", "1234 apples", "\\frac{3}{4}", "1 1/2", "-5", "25%", "twelve" into
canonical strings ("1234", "1000", "3/4", "3/2", "-5", "25", "12"). Equivalence compares numbers exactly, as
fractions: 1200001 is not 1200000 and 0.3333333 is not 1/3. The one tolerance is for a gold that says it is
inexact ("about 3.14", "≈ 2.7"): it stands for every value that rounds to it, within half a unit of its last
written digit. Anything else goes to ``math-verify`` when it is installed, and to a normalized string comparison
otherwise. Unparsable input is ``None`` / ``False``, never an exception.

A final answer must be a value in the task's answer form: where the gold is a number, so must the answer be
(``answer_form="number"``, the default for a numeric gold), so "5+3" is no answer to "What is 5 + 3?" even
though it evaluates to the gold; a task whose answers are expressions says so with ``meta["answer_form"] =
"expression"`` on its problems, and then math-verify may decide symbolic equality against a numeric gold too.

Deliberate readings of ambiguous answers (tested in tests/data/test_answers.py):
- an equation after a marker gives its result, whatever the operator: "20 x 3 = 60" -> 60, "50% of 20 = 10" -> 10,
  "3/4 of 20 = 15" -> 15 ("x", "×", "÷", "·" and "of" before a number are operators; "3/4 of the cake" is 3/4);
- thousands may be grouped by commas or by single spaces, in groups of three: "1 000" -> 1000;
- number words are read when they are the whole answer: "The answer is twelve." -> 12 (never in running text,
  where "one of them" is not 1);
- "2,50" is no number (a decimal comma, or 250 mistyped?): not 2, not 50, not 2.5; it grades wrong.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation, localcontext
from fractions import Fraction
from functools import lru_cache
from typing import Any

from pluribus.data.records import Problem

REL_TOL = Fraction(1, 10**6)  # only for an approximate gold that is not a decimal ("about 1/3")
ANSWER_FORMS = ("number", "expression")
MAX_SYMBOLIC_CHARS = 300  # longer "answers" are prose, not formulas: never worth a symbolic parse


@dataclass(frozen=True)
class Extraction:
    """An answer found in a text: ``value`` normalized, ``method`` how it was found, ``raw`` the span as written.

    Methods: ``gsm8k`` (#### N), ``boxed``, ``answer_is``, ``final_answer``, ``last_number`` (no marker: a guess),
    and for multiple choice ``choice`` (letter after a marker), ``choice_text`` (the option's text after a
    marker), ``choice_only`` (the whole reply is a letter), ``last_choice`` (the last "(X)" in the text).
    """

    value: str
    method: str
    raw: str


@dataclass(frozen=True)
class Grade:
    """The extracted answer (``None`` if unparsable), whether it matches the gold one, and how it was found."""

    answer: str | None
    correct: bool
    method: str | None


# ------------------------------------------------------------------------------------------ numbers

_SPACE = "[ \u00a0\u2009\u202f]"
# 1,234,567 or 1 234 567 or 1234567 (separators only in groups of three)
_INT = rf"(?:\d{{1,3}}(?:,\d{{3}})+(?!\d)|\d{{1,3}}(?:{_SPACE}\d{{3}})+(?![\d,-]|\s*/)|\d+)"
_DEC = rf"(?:{_INT}(?:\.\d+)?|\.\d+)"
_CURRENCY = r"(?:\\\$|\$|US\$|USD|€|£|¥|₹|Rs\.?)"
_APPROX = r"(?:(?:about|approximately|approx\.?|around|roughly|~|≈)\s*)"
_UNIT = r"(?:\s*%|\s*percent\b|\s*[A-Za-z°][A-Za-z°\s./'’-]*?(?:\^?[23²³])?)"
# A number as written in an answer: sign and currency in either order, then mixed number, fraction or decimal.
_NUMBER_BODY = (
    rf"(?P<sign>[-+]\s*)?{_CURRENCY}?\s*(?P<sign2>-\s*)?"
    rf"(?:(?P<whole>\d+)\s+(?P<mnum>\d+)\s*/\s*(?P<mden>\d+)"  # mixed number: 1 1/2
    rf"|\(?(?P<fnum>{_DEC})\)?\s*/\s*\(?(?P<fden>{_DEC})\)?"  # fraction: 3/4, (3)/(4), 1.5/2
    rf"|(?P<dec>{_DEC}(?:[eE][-+]?\d+)?))"
)
_NUMBER_FULL = re.compile(rf"^(?P<approx>{_APPROX})?{_NUMBER_BODY}\s*(?P<unit>{_UNIT})?\s*$", re.IGNORECASE)
_NUMBER_LEAD = re.compile(rf"^{_APPROX}?{_NUMBER_BODY}(?P<pct>\s*%)?", re.IGNORECASE)
# Numbers inside running text, for the last-number fallback; a '-' counts as a sign only when not after a word.
# Digits glued to a comma that is no thousands separator ("2,50") are no number at all.
_NUMBER_IN_TEXT = re.compile(
    rf"(?<![\w./,])(?:(?<![\w)])-\s*)?{_CURRENCY}?"
    rf"(?:\d+\s+\d+\s*/\s*\d+(?![\d,./])|{_DEC}(?:\s*/\s*\d+(?![\d.]))?)(?!,\d)"
)


MAX_DIGITS = 200  # longer "numbers" are text: converting them is slow or, past 4300 digits, an error
_CANONICAL = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+(?:\.\d+)?)?")


def _to_fraction(s: str) -> Fraction | None:
    """A canonical numeric string ("-12", "0.5", "3/4") as a Fraction, else None."""
    if len(s) > MAX_DIGITS or not _CANONICAL.fullmatch(s):
        return None
    try:
        if "/" in s:
            num, den = s.split("/", 1)
            return Fraction(Decimal(num)) / Fraction(Decimal(den))
        return Fraction(Decimal(s))
    except (InvalidOperation, ValueError, ZeroDivisionError):
        return None


def _format_fraction(value: Fraction, as_decimal: bool) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    if as_decimal:  # a terminating decimal: exact at this precision
        with localcontext() as ctx:
            ctx.prec = 200
            d = Decimal(value.numerator) / Decimal(value.denominator)
            return format(d.normalize(), "f")
    return f"{value.numerator}/{value.denominator}"


def _digits(s: str) -> str:
    return re.sub(rf",|{_SPACE}", "", s)


_UNITS = {w: i for i, w in enumerate([
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
    "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"])}
_TENS = {w: 10 * i for i, w in enumerate(
    ["twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"], start=2)}
_SCALES = {"thousand": 10**3, "million": 10**6, "billion": 10**9}


def _number_words(s: str) -> str | None:
    """The integer an English number phrase names ("twelve", "three hundred and five", "minus four"), else None."""
    words = [w for w in re.split(r"[\s-]+", s.strip().lower()) if w and w != "and"]
    negative = bool(words) and words[0] in ("minus", "negative")
    words = words[1:] if negative else words
    if not words or len(words) > 12 or (words[0] == "zero" and len(words) > 1):
        return None
    total, current, last, scale = 0, 0, None, None  # last: the kind of the previous word
    for w in words:
        if w in _UNITS and (last in (None, "hundred", "scale") or (last == "ten" and _UNITS[w] < 10)):
            current += _UNITS[w]
            last = "unit"
        elif w in _TENS and last in (None, "hundred", "scale"):
            current += _TENS[w]
            last = "ten"
        elif w == "hundred" and last == "unit" and current < 100:
            current *= 100
            last = "hundred"
        elif w in _SCALES and last not in (None, "scale") and (scale is None or _SCALES[w] < scale):
            total += current * _SCALES[w]
            current, last, scale = 0, "scale", _SCALES[w]
        else:
            return None
    value = total + current
    return str(-value if negative else value)


def _number_from_match(m: re.Match[str]) -> str | None:
    digits = sum(len(m.group(g) or "") for g in ("whole", "mnum", "mden", "fnum", "fden", "dec"))
    exponent = re.search(r"[eE]([-+]?\d+)$", m.group("dec") or "")
    if digits > MAX_DIGITS or (exponent and abs(int(exponent.group(1)[:6])) > 100):
        return None
    negative = bool((m.group("sign") or "").strip() == "-") ^ bool(m.group("sign2"))
    try:
        if m.group("whole") is not None:
            value = int(m.group("whole")) + Fraction(int(m.group("mnum")), int(m.group("mden")))
            as_decimal = False
        elif m.group("fnum") is not None:
            value = Fraction(Decimal(_digits(m.group("fnum")))) / Fraction(Decimal(_digits(m.group("fden"))))
            as_decimal = False
        else:
            dec = _digits(m.group("dec"))
            value = Fraction(Decimal(dec))
            as_decimal = True
    except (InvalidOperation, ValueError, ZeroDivisionError):
        return None
    return _format_fraction(-value if negative else value, as_decimal)


# ----------------------------------------------------------------------------------------- cleaning

_TEXT_CMDS = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_FRAC_SHORT = re.compile(r"\\[dt]?frac\s*(\d)\s*(\d)")
_SPACING = re.compile(r"\\[,!;:> ]|\\quad|\\qquad|\\left|\\right|~")
_DEGREES = re.compile(r"\^\s*\{?\\circ\}?|°|\\degree")
_PRODUCT = re.compile(r"\d\s*[xX×·]\s*\d")
_LABEL = re.compile(r"^[A-Za-z]\w{0,10}\s*=\s*(?=[-+$\\.\d(])")  # "x = 5" -> "5"


def _brace_pairs(text: str) -> dict[int, int]:
    """Index of each '{' -> index of its matching '}', in one pass (unmatched braces are left out)."""
    pairs, stack = {}, []
    for i, c in enumerate(text):
        if c == "{":
            stack.append(i)
        elif c == "}" and stack:
            pairs[stack.pop()] = i
    return pairs


_BOXED = re.compile(r"\\(?:boxed|fbox)\s*(?=\{)")


def _boxed_spans(text: str) -> list[tuple[int, str]]:
    """(start, content) of every ``\\boxed{...}`` with balanced (nested) braces."""
    if "\\boxed" not in text and "\\fbox" not in text:
        return []
    pairs = _brace_pairs(text)
    spans = []
    for m in _BOXED.finditer(text):
        close = pairs.get(m.end())
        if close is not None:
            spans.append((m.start(), text[m.end() + 1 : close]))
    return spans


def _unwrap_boxed(s: str) -> str:
    spans = _boxed_spans(s)
    return spans[-1][1] if spans else s


def _clean(s: str) -> str:
    """Strip markup that never changes a value: markdown, LaTeX delimiters and spacing, \\text{}, degrees."""
    t = s.replace("\u2212", "-").replace("\u00a0", " ").replace("\u2009", " ").replace("\u202f", " ")
    t = t.strip()
    t = _unwrap_boxed(t)
    t = t.replace("\\(", "").replace("\\)", "").replace("\\[", "").replace("\\]", "")
    t = t.replace("**", "").replace("`", "")
    t = t.replace("{,}", ",").replace("\\%", "%").replace("\\$", "$")
    t = _SPACING.sub("", t)
    t = _DEGREES.sub("", t)
    for _ in range(3):  # nested \text{\textbf{...}}
        t = _TEXT_CMDS.sub(r"\1", t)
    for _ in range(3):  # nested fractions resolve from the inside out
        t = _FRAC.sub(lambda m: _frac_repl(m.group(1), m.group(2)), t)
    t = _FRAC_SHORT.sub(r"\1/\2", t)
    t = re.sub(r"\s+", " ", t).strip()
    t = t.strip("$").strip()
    t = re.sub(r"[\s.,;:!?]+$", "", t)  # trailing sentence punctuation
    t = t.strip("\"'*_ ").strip()
    t = _LABEL.sub("", t)
    return t


def _frac_repl(num: str, den: str) -> str:
    num, den = num.strip(), den.strip()
    simple = re.compile(r"-?\d+(?:\.\d+)?")
    if simple.fullmatch(num) and simple.fullmatch(den):
        return f"{num}/{den}"
    return f"({num})/({den})"


def normalize_answer(s: str | None) -> str | None:
    """A canonical form of an answer string, or None when there is nothing there.

    Numbers: commas, currency, units, percent signs and trailing zeros go ("$1,234.00" -> "1234",
    "25%" -> "25", "0.50" -> "0.5"); fractions reduce ("6/8" -> "3/4", "\\frac{1}{2}" -> "1/2",
    "1 1/2" -> "3/2", "4/2" -> "2"); signs keep ("−5" -> "-5"). Anything else is returned cleaned of markup,
    with inner whitespace removed, e.g. "x^2 + 1" -> "x^2+1".
    """
    if s is None:
        return None
    if not isinstance(s, str):
        s = str(s)
    t = _clean(s)
    if not t:
        return None
    if "(" in t and re.fullmatch(r"\(\s*-?[\d.]+\s*\)", t):  # "(5)" -> "5"
        t = t.strip("()").strip()
    m = None if _PRODUCT.search(t) else _NUMBER_FULL.match(t)  # "20 x 3" is a product, not 20 with a unit "x 3"
    if m is not None:
        value = _number_from_match(m)
        if value is not None:
            return value
    return _number_words(t) or re.sub(r"\s+", "", t)


# --------------------------------------------------------------------------------------- equivalence


def math_verify_available() -> bool:
    """Whether the optional ``math-verify`` package can be imported."""
    try:
        import math_verify  # noqa: F401
    except ImportError:
        return False
    return True


@lru_cache(maxsize=4096)
def _math_verify_equal(pred: str, gold: str) -> bool:
    from math_verify import parse, verify

    # math-verify's timeouts use signal.alarm, which only works on the main thread; elsewhere run without.
    main = threading.current_thread() is threading.main_thread()
    limit = 5 if main else None
    try:
        g = parse(f"${gold}$", parsing_timeout=limit)
        p = parse(f"${pred}$", parsing_timeout=limit)
        if not g or not p:
            return False
        return bool(verify(g, p, timeout_seconds=limit))
    except Exception:  # math-verify raises on pathological input; unparsable means not equivalent
        return False


def gold_tolerance(gold: str) -> Fraction:
    """How far an answer may be from a numeric ``gold``: 0, unless the gold says it is approximate ("about 3.14",
    "≈ 40"), then half a unit of its last written digit (3.14 -> 0.005, 40 -> 0.5; 1e-6 relative for a fraction)."""
    m = _NUMBER_FULL.match(_clean(gold))
    if m is None or not m.group("approx"):
        return Fraction(0)
    dec = m.group("dec")
    if dec is None or "e" in dec.lower():
        value = _to_fraction(normalize_answer(gold) or "")
        return REL_TOL * max(Fraction(1), abs(value)) if value is not None else Fraction(0)
    places = len(dec.split(".", 1)[1]) if "." in dec else 0
    return Fraction(1, 2 * 10**places)


def vote_key(answer: str) -> str:
    """The key under which equal answers count as one vote: a number by its exact value ("0.5", "1/2" -> "1/2"),
    anything else by its case-folded normalized text. Never symbolic: votes are counted, not proved equal."""
    norm = normalize_answer(answer) or ""
    value = _to_fraction(norm)
    return str(value) if value is not None else norm.lower()


def is_equivalent(pred: str | None, gold: str | None, *, use_math_verify: bool | None = None,
                  answer_form: str | None = None) -> bool:
    """Whether a predicted answer equals the gold one.

    Both sides are normalized; two numbers compare as exact fractions ("0.5" == "1/2" == "\\frac{1}{2}",
    "1,234" == "1234.00", "1200001" != "1200000"), within ``gold_tolerance(gold)`` only for an approximate gold.
    ``answer_form`` (number | expression; None: number where the gold is a number) says what an answer must be:
    with ``number`` a prediction that is no number ("5+3", "\\sqrt{4}") never equals a numeric gold. Otherwise the
    normalized strings are compared (case- and space-insensitive) and, if they differ, ``math-verify`` decides
    symbolic equality ("x^2+1" == "1+x^2", "\\sqrt{8}" == "2\\sqrt{2}"). ``use_math_verify``: None uses it when
    installed, False never does (the pure-Python path), True requires it (ImportError if missing).
    Raises ValueError for an unknown ``answer_form``.
    """
    if answer_form is not None and answer_form not in ANSWER_FORMS:
        raise ValueError(f"Unknown answer form '{answer_form}'. Available: {', '.join(ANSWER_FORMS)}.")
    if pred is None or gold is None:
        return False
    p, g = normalize_answer(pred), normalize_answer(gold)
    if p is None or g is None:
        return False
    pv, gv = _to_fraction(p), _to_fraction(g)
    if pv is not None and gv is not None:
        return abs(pv - gv) <= gold_tolerance(gold)
    if gv is not None and answer_form != "expression":
        return False  # a numeric task is answered by a number, not by an expression that evaluates to it
    if p.lower() == g.lower():
        return True
    if use_math_verify is None:
        use_math_verify = math_verify_available()
    elif use_math_verify and not math_verify_available():
        raise ImportError("math-verify is not installed: pip install math-verify (or pluribus[eval])")
    if use_math_verify and max(len(p), len(g)) <= MAX_SYMBOLIC_CHARS:
        return _math_verify_equal(p, g)
    return False


# ---------------------------------------------------------------------------------------- extraction

_GSM8K = re.compile(r"####[ \t]*([^\n]*)")
_ANSWER_IS = re.compile(
    r"\b(?P<final>final\s+)?answer\b(?:\s+(?:is|would\s+be|should\s+be|will\s+be|equals)\b\s*:?|\s*[:=])",
    re.IGNORECASE,
)
_LEAD_JUNK = re.compile(r"^(?:\s|\*\*|\*|:|=|`|\\\(|\\\[)+")
# Words a model puts between "the answer is" and the number ("the answer is actually 4").
_FILLER = re.compile(
    r"^(?:(?:actually|simply|just|clearly|indeed|therefore|thus|so|then|now|exactly|still|definitely|likely|"
    r"probably|obviously|correct(?:ly)?)[,:]?\s+)+",
    re.IGNORECASE,
)
# A prompt's template word echoed back ("\boxed{answer}") is not an answer.
_PLACEHOLDERS = {"answer", "number", "final answer", "your answer", "<answer>", "<number>", "...", "n"}
_EXPR_HINT = re.compile(r"[\d\\^_{}√π]")
_MATH_WORDS = re.compile(r"\\[A-Za-z]+|\b(?:sqrt|pi|sin|cos|tan|log|ln|exp|inf|infty)\b")
# What makes a leading number an operand, not the answer: "2 * 5", "20 x 3 = 60", "50% of 20 = 10".
_OPERATOR_NEXT = re.compile(r"\s*(?:[-+*/×÷·^]|[xX]|of\b)\s*\$?\s*[\d(]")


def _looks_like_math(s: str) -> bool:
    """A short formula ("x^2+1", "\\sqrt{2}", "2(3)"), not a clause of prose ("probably 5")."""
    return (
        len(s) <= 40
        and _EXPR_HINT.search(s) is not None
        and re.search(r"[A-Za-z]{2,}", _MATH_WORDS.sub("", s)) is None
    )


def _lead_number(sentence: str) -> tuple[str, str] | None:
    lead = _clean(sentence) if sentence.startswith("\\") else sentence
    m = _NUMBER_LEAD.match(lead)
    if m is None or _OPERATOR_NEXT.match(lead[m.end() :]) or lead[m.end() : m.end() + 2][1:].isdigit():
        return None  # an operand, or digits glued to a comma that is no thousands separator ("2,50")
    value = _number_from_match(m)
    return (value, m.group(0).strip()) if value is not None else None


LEAD_WINDOW = 400  # an answer starts within this many characters of its marker


def _lead_value(span: str) -> tuple[str, str] | None:
    """The answer at the start of the text following a marker: (normalized value, raw span) or None."""
    line = span[:LEAD_WINDOW].split("\n", 1)[0]
    line = _LEAD_JUNK.sub("", line)
    if not line:
        return None
    if line.startswith(("\\boxed", "\\fbox")):
        spans = _boxed_spans(line)
        if spans:
            value = normalize_answer(spans[0][1])
            return (value, spans[0][1]) if value is not None else None
    if line.startswith("$") and not re.match(r"\$\s*[\d.,]+(?:\s|$|[.,;!?])", line):
        # "$\frac{1}{2}$" is LaTeX (a closing $ follows); "$18." is currency, handled below.
        end = line.find("$", 1)
        if end > 0:
            inner = line[1:end]
            value = normalize_answer(inner)
            return (value, line[: end + 1]) if value is not None else None
    # The sentence (up to ". " or the end) starts with the answer: a number, unless an operator follows it
    # ("2 * 5" is an expression); an equation ("12 - 4 = 8", "x = 8") gives its last right-hand side.
    sentence = re.split(r"(?<!\d)\.(?:\s|$)|\.\s|[;!?](?:\s|$)", line, maxsplit=1)[0]
    sentence = _FILLER.sub("", _LEAD_JUNK.sub("", sentence).strip())
    got = _lead_number(sentence)
    if got is not None:
        return got
    words = _number_words(sentence)
    if words is not None:
        return words, sentence
    if "=" in sentence:
        sentence = _LEAD_JUNK.sub("", sentence.rsplit("=", 1)[1]).strip()
        got = _lead_number(sentence)
        if got is not None:
            return got
    # Not a number: accept a short math-looking answer ("x^2+1", "\sqrt{2}"), never a clause of prose.
    if _looks_like_math(sentence):
        value = normalize_answer(sentence)
        if value is not None:
            return value, sentence
    return None


def _marker_candidates(text: str) -> list[tuple[int, str, str, str]]:
    """(position, method, value, raw) for every strong answer marker whose answer parses."""
    found = []
    for m in _GSM8K.finditer(text):
        got = _lead_value(m.group(1))
        if got is not None:
            found.append((m.start(), "gsm8k", got[0], got[1]))
    for start, content in _boxed_spans(text):
        value = normalize_answer(content)
        if value is not None and value.lower() not in _PLACEHOLDERS:
            found.append((start, "boxed", value, content))
    for m in _ANSWER_IS.finditer(text):
        got = _lead_value(text[m.end() : m.end() + LEAD_WINDOW])
        if got is not None:
            found.append((m.start(), "final_answer" if m.group("final") else "answer_is", got[0], got[1]))
    return found


def _last_number(text: str) -> Extraction | None:
    for m in reversed(list(_NUMBER_IN_TEXT.finditer(text))):
        value = normalize_answer(m.group(0))
        if value is not None and _to_fraction(value) is not None:
            return Extraction(value, "last_number", m.group(0).strip())
    return None


def extract_answer(text: str | None, choices: list[str] | None = None) -> Extraction | None:
    """The final answer stated in ``text``, or None when there is none.

    With ``choices`` (the option texts of a multiple-choice problem, lettered A, B, ...) the value is a letter.
    """
    if not isinstance(text, str) or not text.strip():
        return None
    text = text.replace("\u2212", "-")  # the Unicode minus sign
    if choices:
        return _extract_choice(text, list(choices))
    found = _marker_candidates(text)
    if found:
        _, method, value, raw = max(found, key=lambda c: c[0])
        return Extraction(value, method, raw)
    words = _number_words(_clean(text))  # a reply that is only a number in words ("Twelve.")
    if words is not None:
        return Extraction(words, "last_number", text.strip())
    return _last_number(text)


# ---------------------------------------------------------------------------------- multiple choice

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_CHOICE_MARKER = re.compile(
    r"####|\b(?:final\s+)?answer\b(?:\s+(?:is|would\s+be|should\s+be|will\s+be)\b\s*:?|\s*[:=])"
    r"|\b(?:correct|right|best)\s+(?:answer|option|choice)\s+is\b\s*:?|\b(?:option|choice)\s+is\b\s*:?"
    r"|\bI\s+(?:choose|pick|select)\b|\\boxed\s*\{",
    re.IGNORECASE,
)
_CHOICE_LEAD = re.compile(r"^(?:\s|\*\*|\*|:|\$|\\boxed\s*\{|\\text\s*\{|\\textbf\s*\{|(?:option|choice)\s+)+", re.I)
# An uppercase letter counts when it stands alone: followed by the end, punctuation, or a connective, never by
# an ordinary word ("A car travels..." is an article).
_UPPER_ALONE = re.compile(
    r"^([A-Z])(?=$|[\s]*$|[.,;:!?)\]}*$\"'\n]|\s+(?:because|since|as|which|with|-|–|—|\(|is\b|and\b|or\b)|\s*\n)"
)
_PAREN_LETTER = re.compile(r"^\(([A-Za-z])\)|^([A-Za-z])\)")
_WHOLE_LETTER = re.compile(r"^\s*(?:\*\*)?\s*\(?([A-Za-z])\)?\s*(?:\*\*)?\s*[.:]?\s*$")
_LAST_PAREN = re.compile(r"\(([A-Z])\)")


def _choice_letter(span: str, choices: list[str]) -> tuple[str, str, str] | None:
    """(letter, method, raw) of the choice named at the start of ``span`` (the text after a marker)."""
    valid = LETTERS[: len(choices)]
    s = _CHOICE_LEAD.sub("", span)
    m = _PAREN_LETTER.match(s)
    if m:
        letter = (m.group(1) or m.group(2)).upper()
        if letter in valid:
            return letter, "choice", m.group(0)
    m = _UPPER_ALONE.match(s)
    if m and m.group(1) in valid:
        return m.group(1), "choice", m.group(1)
    # The option's text itself ("The answer is Paris"), longest match first; numbers compare by value.
    first_line = s.split("\n", 1)[0].strip()
    low = first_line.lower()
    order = sorted(range(len(choices)), key=lambda i: -len(str(choices[i])))
    for i in order:
        option = str(choices[i]).strip().lower()
        if option and low.startswith(option) and (len(low) == len(option) or not low[len(option)].isalnum()):
            return valid[i], "choice_text", first_line[: len(option)]
    lead = _lead_value(first_line)
    if lead is not None and _to_fraction(lead[0]) is not None:
        for i in range(len(choices)):
            if is_equivalent(lead[0], str(choices[i]), use_math_verify=False):
                return valid[i], "choice_text", lead[1]
    return None


def _extract_choice(text: str, choices: list[str]) -> Extraction | None:
    valid = LETTERS[: len(choices)]
    m = _WHOLE_LETTER.match(text)
    if m and m.group(1).upper() in valid:
        return Extraction(m.group(1).upper(), "choice_only", text.strip())
    best: tuple[int, str, str, str] | None = None
    for m in _CHOICE_MARKER.finditer(text):
        got = _choice_letter(text[m.end() : m.end() + LEAD_WINDOW], choices)
        if got is not None and (best is None or m.start() >= best[0]):
            best = (m.start(), got[0], got[1], got[2])
    if best is not None:
        return Extraction(best[1], best[2], best[3])
    for m in reversed(list(_LAST_PAREN.finditer(text))):
        if m.group(1) in valid:
            return Extraction(m.group(1), "last_choice", m.group(0))
    return None


def gold_choice(answer: Any, choices: list[str]) -> str | None:
    """The gold letter of a multiple-choice problem from a letter, a 0-based index or the option's text."""
    valid = LETTERS[: len(choices)]
    if isinstance(answer, bool):
        return None
    if isinstance(answer, int):
        return valid[answer] if 0 <= answer < len(valid) else None
    text = str(answer).strip()
    if len(text) == 1 and text.upper() in valid:
        return text.upper()
    stripped = text.strip("()").strip().rstrip(".")
    if len(stripped) == 1 and stripped.upper() in valid:
        return stripped.upper()
    for i, option in enumerate(choices):
        if str(option).strip().lower() == text.lower():
            return valid[i]
    return None


def grade(text: str | None, problem: Problem) -> Grade:
    """Extract the answer of ``text`` and check it against ``problem.answer``.

    A multiple-choice problem (``problem.meta['choices']``) is graded on the letter; any other on
    ``is_equivalent`` in the problem's ``meta['answer_form']`` (number | expression; by default a number where the
    gold is one). An unparsable reply grades as ``Grade(None, False, None)``; an answer in another form (an
    expression for a numeric gold) as ``Grade(answer, False, method)``.
    """
    choices = (problem.meta or {}).get("choices")
    found = extract_answer(text, choices)
    if found is None:
        return Grade(None, False, None)
    if choices:
        gold = gold_choice(problem.answer, list(choices))
        return Grade(found.value, gold is not None and found.value == gold, found.method)
    form = (problem.meta or {}).get("answer_form")
    return Grade(found.value, is_equivalent(found.value, problem.answer, answer_form=form), found.method)
