r"""Answer extraction and comparison for the MATH benchmark (Hendrycks et al., 2021; MATH-500).

Protocol: the reference answer is the content of the last ``\boxed{...}`` in the dataset solution;
the model's answer is its last ``\boxed{...}`` (else a ``Final Answer: ...`` / ``answer: ...`` line);
both are normalized to a canonical string and compared. Written from reading, not copying, two
public protocols:

* Hendrycks ``modeling/math_equivalence.py`` (``_strip_string``) and ``last_boxed_only_string``:
  balanced-brace box extraction (``\boxed``, ``\fbox``); drop newlines, ``\!``, ``\left``/``\right``,
  ``^\circ``, ``\$``, ``\%``/``%``; ``\tfrac``/``\dfrac`` -> ``\frac``; units after ``\text{ ``;
  ``.5`` -> ``0.5``; a short ``k =`` prefix; ``\sqrt3`` -> ``\sqrt{3}``; ``\frac12`` -> ``\frac{1}{2}``;
  ``0.5`` -> ``\frac{1}{2}``; ``a/b`` -> ``\frac{a}{b}``; remove spaces.
* Minerva ``normalize_final_answer`` (Lewkowycz et al., 2022, App. D; lm-evaluation-harness
  ``minerva_math/utils.py``): the ``\boxed 5`` form; SUBSTITUTIONS (``\ ``, ``mbox`` -> ``text``,
  ``\text{and}`` -> ``,``, ``\text{m}``); REMOVED_EXPRESSIONS (unit words, ``\ldots``/``\dots``,
  ``\;``, ``,\!``, ``{,}``, ``\mathrm{th}``, quotes); the content of ``$...$``; unwrapping
  ``\text{}``/``\textbf{}``/``\boxed{}``; ``100,000`` -> ``100000``; the ``Final Answer: The final
  answer is X. I hope it is correct.`` answer line.

Where the originals are lossy we are narrower, so that wrong answers stay wrong: Minerva removes
``a ``/``an ``/``ft``/``cm``... as raw substrings (``2a + 3`` became ``2+3``) -- we drop no articles
and unit words only at the end, after a quantity or inside ``\text{}``; Hendrycks turns every ``\\``
into ``\`` (matrix rows ``1 \\ 2`` became ``12``) -- we undo only doubly escaped commands; Minerva
drops commas from any digit string (the list ``1,2`` became ``12``) -- we drop them only from
proper thousands groups; Minerva keeps only the text after the last ``=``
(``x+y=0`` became ``0``) -- we drop only a variable-name left side; Minerva unwraps ``\overline``
(``0.\overline{3}`` became ``0.3``) -- we keep it and read it as the repeating decimal it is.
On top of string equality, ``is_equiv`` accepts exact numeric equality (``fractions.Fraction``) of
plain numbers, decimals, fractions and mixed numbers, element-wise inside tuples, intervals and
comma lists with identical brackets -- no sympy, no ``eval``, so nothing can hang or run code.
As in both protocols, a multiple-choice ``\text{(A)}`` matches ``(A)`` but not a bare ``A``.
Small additions for model output, not in either protocol: ``\(...\)``/``\[...\]`` wrappers, a
leading ``x \in``, ``°``, ``\,``/``\quad`` spacing, singular unit words, mixed numbers (``2\frac12``).
Numbers over 1000 characters are compared as strings only (``int()`` refuses 4300+ digits).
"""

from __future__ import annotations

import re
from fractions import Fraction

# Model responses can be arbitrarily long; the answer is at the end, so only the tail is searched.
_WINDOW = 10_000
# A MATH answer is short; longer strings are compared verbatim (minus spaces), which keeps every
# normalization step's cost bounded even for adversarial output.
_MAX_ANSWER = 10_000
# Python refuses int() of strings over 4300 digits; a real answer is far shorter than this.
_MAX_NUMBER = 1_000


# ------------------------------------------------------------------------------ box extraction

def _group_end(s: str, i: int) -> int | None:
    """Index of the `}` closing the `{` at s[i] (escaped `\\{`/`\\}` are not structural), else None."""
    depth = 0
    n = len(s)
    while i < n:
        c = s[i]
        if c == "\\":
            i += 2  # a control symbol such as \{ or \} never opens or closes a group
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


_BOX_NAMES = ("\\boxed", "\\fbox")


def last_boxed(text: str) -> str | None:
    r"""Content of the last ``\boxed{...}``, ``\boxed ...`` or ``\fbox{...}``; None if none (or unclosed)."""
    if not isinstance(text, str):
        return None
    text = text[-_WINDOW:]
    end = len(text)
    while True:
        # the last box of either spelling (Hendrycks prefers \boxed; the later one is the final answer)
        idx, name = max((text.rfind(b, 0, end), b) for b in _BOX_NAMES)
        if idx < 0:
            return None
        j = idx + len(name)
        k = j
        while k < len(text) and text[k] in " \t":
            k += 1
        if k < len(text) and text[k] == "{":
            close = _group_end(text, k)
            # an unclosed last box is a truncated answer: no answer, as in Hendrycks
            return None if close is None else text[k + 1 : close].strip()
        if k > j:
            # Minerva's `\boxed 5`: up to the closing `$` (or the line's end)
            rest = text[k:]
            stop = min((p for p in (rest.find("$"), rest.find("\n")) if p >= 0), default=len(rest))
            content = rest[:stop].strip().rstrip(".,;").strip()
            return content or None
        # `\boxedfoo` is another command: look further back
        end = idx


def reference_answer(solution: str) -> str:
    """The dataset solution's final answer, i.e. its last box; ValueError if it has none."""
    answer = last_boxed(solution) if isinstance(solution, str) else None
    if not answer:  # no box, an unclosed one or an empty one: a data error, not a wrong answer
        raise ValueError("MATH solution has no \\boxed{...} answer")
    return answer


# ------------------------------------------------------------------------------ answer lines

_HOPE = re.compile(r"\s*\.?\s*I hope it is correct\.?\s*$", re.IGNORECASE)
_ANSWER_LINE = re.compile(r"\banswer\s*(?:is\s*:?|:)\s*(\S.*)$", re.IGNORECASE)


def _clean_line_answer(answer: str) -> str | None:
    answer = _HOPE.sub("", answer).strip().lstrip(":").strip()
    answer = answer.rstrip(".").strip()
    # `$24$` -> `24`: only when the dollars wrap the whole answer
    if len(answer) >= 2 and answer[0] == "$" and answer[-1] == "$" and "$" not in answer[1:-1]:
        answer = answer[1:-1].strip()
    return answer or None


def extract_answer(response: str) -> str | None:
    """The model's answer: its last box; else a `final answer is X` / `Final Answer: X` line; else
    a last line `answer: X` / `the answer is X`; else None."""
    if not isinstance(response, str):
        return None
    text = response[-_WINDOW:]
    boxed = last_boxed(text)
    if boxed:
        return boxed
    # markdown emphasis around the label (`**Final Answer:**`) would hide the marker
    text = text.replace("**", "")
    low = text.lower()
    # Minerva's line `Final Answer: The final answer is $X$. I hope it is correct.`: the later marker wins
    pos, marker = max((low.rfind(m), m) for m in ("final answer is", "final answer:"))
    if pos >= 0:
        rest = text[pos + len(marker) :].lstrip(" \t:")
        line, _, after = rest.partition("\n")
        if not line.strip():  # `Final Answer:` alone, the answer on the next non-empty line
            line = next((ln for ln in after.split("\n") if ln.strip()), "")
        answer = _clean_line_answer(line)
        if answer:
            return answer
    lines = [ln for ln in text.split("\n") if ln.strip()]
    if lines:
        m = _ANSWER_LINE.search(lines[-1])
        if m:
            return _clean_line_answer(m.group(1))
    return None


# ------------------------------------------------------------------------------ normalization

_UNIT_WORDS = (
    # Minerva's REMOVED_EXPRESSIONS words, plus their singulars and a few frequent MATH units
    "square", "sq", "cubic", "ways", "way", "integers", "integer", "dollars", "dollar", "cents", "cent",
    "mph", "inches", "inch", "ft", "feet", "foot", "yards", "yard", "miles", "mile", "km", "cm", "mm",
    "m", "meters", "meter", "metres", "metre", "units", "unit", "hours", "hour", "minutes", "minute",
    "seconds", "second", "days", "day", "weeks", "week", "years", "year", "points", "point", "digits",
    "digit", "degrees", "degree", "gm", "g", "kg", "grams", "gram", "pounds", "pound", "lbs", "lb",
    "meals", "meal", "edges", "edge", "students", "student", "multiples", "people", "sue", "s",
)
_UNIT = "(?:" + "|".join(sorted(_UNIT_WORDS, key=len, reverse=True)) + r")\b"
# single-letter units (`m`, `s`, `g`) only count inside \text{...}; bare ones could be variables
_BARE_UNIT = "(?:" + "|".join(sorted((u for u in _UNIT_WORDS if len(u) > 1), key=len, reverse=True)) + r")\b"
_POWER = r"(?:\s*\^\s*(?:\{\s*[23]\s*\}|[23]))?"
_TRAILING_UNITS = re.compile(
    r"(?:\\(?:text|textrm|mathrm|mbox)\s*\{\s*" + _UNIT + r"(?:\s+" + _UNIT + r")*\s*\}" + _POWER + r")+"
    r"\s*\.?\s*$"
    r"|\s+" + _BARE_UNIT + r"(?:\s+" + _BARE_UNIT + r")*" + _POWER + r"\s*\.?\s*$"
)
_TEXT_WRAPPERS = re.compile(r"\\(?:text|textbf|textrm|textit|textnormal|textsf|texttt|mathrm|emph)\s*(?=\{)")
_SPACING = re.compile(r"\\[!,;:](?![a-zA-Z])|\\ |\\q?quad(?![a-zA-Z])|~")
_DOUBLE_BACKSLASH = re.compile(r"\\\\(?=(?:[dt]?frac|sqrt|text|boxed|pi|left|right|cdot|times|infty)(?![a-zA-Z]))")
_LEFT_RIGHT = re.compile(r"\\(?:left|right)(?![a-zA-Z])")
_DEGREES = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ(?![a-zA-Z])|\\degree(?![a-zA-Z])|°")
_ORDINAL = re.compile(r"(?<=\d)\s*(?:\^\s*\{?\s*)?\\(?:text|mathrm)\s*\{\s*(?:st|nd|rd|th)\s*\}\}?")
_AND = re.compile(r",?\s*\\text\s*\{\s*and\s*\}\s*")
_SIMPLE_VAR = re.compile(r"\s*(?:[A-Za-z]{1,2}|\\[A-Za-z]+)(?:_\{?[A-Za-z0-9]+\}?)?'?\s*")
_IN_PREFIX = re.compile(r"\s*(?:[A-Za-z]|\\[A-Za-z]+)\s*\\in(?![a-zA-Z])\s*")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_LEADING_DOT = re.compile(r"(?<![0-9])\.(?=[0-9])")
_INT_SLASH = re.compile(r"(-?)(\d+)/(\d+)")
_WS = re.compile(r"\s+")
_ROW = "\ue000"  # stands for `\\` during normalization (a private-use character, removed from input)


def _unwrap_text(s: str) -> str:
    r"""``\text{abc}`` -> ``abc`` (balanced braces, nested wrappers included)."""
    pos = 0
    while True:
        m = _TEXT_WRAPPERS.search(s, pos)
        if not m:
            return s
        open_brace = m.end()
        close = _group_end(s, open_brace)
        if close is None:  # unbalanced: drop only the command name
            s = s[: m.start()] + s[open_brace:]
        else:
            s = s[: m.start()] + s[open_brace + 1 : close] + s[close + 1 :]
        pos = m.start()  # the content may hold another wrapper


def _read_arg(s: str, i: int) -> tuple[str, int] | None:
    """One TeX argument at s[i]: a `{group}`, a control word or one character; (text, end)."""
    if i >= len(s):
        return None
    c = s[i]
    if c == "{":
        close = _group_end(s, i)
        if close is None:
            return None
        return s[i + 1 : close], close + 1
    if c == "\\":
        j = i + 1
        while j < len(s) and s[j].isalpha():
            j += 1
        if j == i + 1:
            j = min(i + 2, len(s))
        return s[i:j], j
    if c in "}^_":
        return None
    return c, i + 1


_BRACED_COMMANDS = re.compile(r"\\(frac|binom|sqrt)(?![a-zA-Z])")


def _brace_arguments(s: str, depth: int = 0) -> str:
    r"""``\frac12`` -> ``\frac{1}{2}``, ``\frac1{72}`` -> ``\frac{1}{72}``, ``\sqrt3`` -> ``\sqrt{3}``
    (Hendrycks' _fix_fracs/_fix_sqrt and Minerva's regexes, done as a parser so that ``\frac{72}1``
    and nested arguments work too)."""
    if depth > 20:  # adversarial nesting: leave it as written rather than recurse deeper
        return s
    out = []
    pos = 0
    while True:
        m = _BRACED_COMMANDS.search(s, pos)
        if not m:
            out.append(s[pos:])
            return "".join(out)
        out.append(s[pos : m.end()])
        i = m.end()
        if m.group(1) == "sqrt" and i < len(s) and s[i] == "[":  # \sqrt[3]{x}: keep the index
            close = s.find("]", i)
            if close > 0:
                out.append(s[i : close + 1])
                i = close + 1
        nargs = 1 if m.group(1) == "sqrt" else 2
        args = []
        j = i
        for _ in range(nargs):
            arg = _read_arg(s, j)
            if arg is None:
                break
            args.append(arg[0])
            j = arg[1]
        if len(args) < nargs:  # malformed: leave the rest as written
            pos = i
            continue
        out.append("".join("{" + _brace_arguments(a, depth + 1) + "}" for a in args))
        pos = j


def _unbox(s: str) -> str:
    r"""``\boxed{X}`` -> ``X`` when the box is the whole answer (Minerva unwraps a leftover box)."""
    for _ in range(8):  # nested boxes \boxed{\boxed{5}}; bounded, never a loop on adversarial input
        t = s.strip()
        name = next((b for b in _BOX_NAMES if t.startswith(b)), None)
        if name is None:
            return t
        k = len(name)
        while k < len(t) and t[k] in " \t":
            k += 1
        if k < len(t) and t[k] == "{" and _group_end(t, k) == len(t) - 1:
            s = t[k + 1 : -1]
        elif k > len(name) and k < len(t):  # `\boxed 5`
            s = t[k:]
        else:
            return t
    return s.strip()


def _strip_math_delimiters(s: str) -> str:
    # Minerva keeps what sits between the first pair of `$` ("The answer is $5$ dollars" -> 5)
    first = s.find("$")
    if first >= 0:
        second = s.find("$", first + 1)
        if second > first:
            s = s[first + 1 : second]
        s = s.replace("$", "")
    s = s.strip()
    for left, right in (("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(left) and s.endswith(right) and len(s) >= 4:
            s = s[2:-2].strip()
    return s


def _cut_units(s: str) -> str:
    # Hendrycks: `\text{ ` (with a space) only ever introduces units in MATH ("5\text{ cm}"); we keep
    # words such as `\text{ or }` that join two answers, and never cut an answer down to nothing
    idx = s.find("\\text{ ")
    if idx > 0 and s[:idx].strip():
        close = _group_end(s, idx + 5)
        word = s[idx + 6 : close].strip() if close is not None else ""
        if word not in ("or", "and"):
            s = s[:idx]
    # Minerva's unit words, here only as trailing words (with \text{}, plural, ^2); units are short,
    # so only the tail is searched, which keeps the `$`-anchored regex linear
    offset = max(0, len(s) - 200)
    m = _TRAILING_UNITS.search(s, offset)
    if m:
        head = s[: m.start()].strip()
        # a bare word is a unit only after a quantity ("5 cm", "\frac{1}{2} inch"), not after a word
        quantity = head.endswith(("}", ")", "]", "\\pi")) or head[-1:].isdigit()
        if head and (m.group(0).lstrip().startswith("\\") or quantity):
            s = head
    return s


def _normalize(s: str) -> str:
    s = s.replace("\n", " ").replace("\r", " ").replace("\t", " ").replace("\u2212", "-").strip()
    if len(s) > _MAX_ANSWER:
        return _WS.sub("", s)
    s = _unbox(s)
    s = s.replace("\\$", "")  # a currency sign (Hendrycks, Minerva) -- before `$` means math mode
    s = _unbox(_strip_math_delimiters(s.replace(".$", "$")))
    s = _DOUBLE_BACKSLASH.sub(r"\\", s)  # `\\frac` from doubly escaped text (Hendrycks' `\\\\` rule)
    # a TeX line break `\\` (matrix rows) must not be read as `\` + the next character below
    s = s.replace(_ROW, "").replace("\\\\", _ROW)
    s = _SPACING.sub("", s).replace("{,}", "")  # \! \, \; \: \  ~ and Minerva's `{,}`
    s = re.sub(r"\\[dt]frac(?![a-zA-Z])", r"\\frac", s)
    s = re.sub(r"\\[dt]binom(?![a-zA-Z])", r"\\binom", s)
    s = _LEFT_RIGHT.sub("", s)
    s = _DEGREES.sub("", s)
    s = s.replace("\\%", "").replace("%", "")
    s = re.sub(r"\\mbox(?![a-zA-Z])", r"\\text", s)
    s = _AND.sub(",", s)
    s = _ORDINAL.sub("", s)
    s = _cut_units(s)
    s = _unwrap_text(s)
    s = _cut_units(s)  # units that were inside the text: Minerva's `\mbox{5 cm}`
    for expr in ("\\ldots", "\\dots", "\\cdots", '"'):
        s = s.replace(expr, "")
    s = s.strip()
    # `x = 3` -> `3` only for a variable-name left side (Hendrycks' rule, Minerva keeps the last side)
    if s.count("=") == 1:
        lhs, rhs = s.split("=")
        if rhs.strip() and _SIMPLE_VAR.fullmatch(lhs):
            s = rhs.strip()
    m = _IN_PREFIX.match(s)
    if m and s[m.end() :].strip():
        s = s[m.end() :].strip()
    if _THOUSANDS.fullmatch(s):  # decided before spaces go: `1, 234` is a list, `1,234` a number
        s = s.replace(",", "")
    s = _WS.sub("", s)
    while s.endswith(".") and not s.endswith("\\."):  # sentence period
        s = s[:-1]
    s = _LEADING_DOT.sub("0.", s)
    s = _brace_arguments(s)
    m = _INT_SLASH.fullmatch(s)
    if m:
        s = f"{m.group(1)}\\frac{{{m.group(2)}}}{{{m.group(3)}}}"
    if s == "0.5":  # Hendrycks' special case; other decimals are matched numerically
        s = "\\frac{1}{2}"
    return s.replace(_ROW, "\\\\")


def normalize(answer: str) -> str:
    """Canonical form of a MATH answer (see the module docstring for the rules); never raises."""
    if answer is None:
        return ""
    if not isinstance(answer, str):
        answer = str(answer)
    try:
        return _normalize(answer)
    except Exception:  # never fail an evaluation run on odd output: compare it verbatim instead
        return _WS.sub("", answer)


# ------------------------------------------------------------------------------ comparison

_PLAIN = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_REPEATING = re.compile(r"([+-]?)(\d*)\.(\d*)\\overline\{(\d+)\}")
_FRAC = re.compile(r"([+-]?)\\frac\{([^{}]*)\}\{([^{}]*)\}")
_MIXED = re.compile(r"([+-]?)(\d+)\\frac\{(\d+)\}\{(\d+)\}")
_SLASH = re.compile(r"([^/]+)/([^/]+)")


def _plain(s: str) -> Fraction | None:
    return Fraction(s) if _PLAIN.fullmatch(s) else None


def _number(s: str) -> Fraction | None:
    """Exact value of a plain number, decimal, repeating decimal, fraction or mixed number."""
    if not s or len(s) > _MAX_NUMBER:
        return None
    try:
        value = _plain(s)
        if value is not None:
            return value
        m = _REPEATING.fullmatch(s)
        if m and (m.group(2) or m.group(3) or m.group(4)):
            sign, whole, fixed, rep = m.groups()
            value = Fraction(int(whole or "0")) + Fraction(int(fixed or "0"), 10 ** len(fixed))
            value += Fraction(int(rep), (10 ** len(rep) - 1) * 10 ** len(fixed))
            return -value if sign == "-" else value
        m = _FRAC.fullmatch(s)
        if m:
            num, den = _plain(m.group(2)), _plain(m.group(3))
            if num is None or den is None or den == 0:
                return None
            return -num / den if m.group(1) == "-" else num / den
        m = _MIXED.fullmatch(s)
        if m:  # MATH writes mixed numbers: 2\frac{1}{2} is 5/2
            den = int(m.group(4))
            if den == 0:
                return None
            value = int(m.group(2)) + Fraction(int(m.group(3)), den)
            return -value if m.group(1) == "-" else value
        m = _SLASH.fullmatch(s)
        if m:
            num, den = _plain(m.group(1)), _plain(m.group(2))
            if num is None or den is None or den == 0:
                return None
            return num / den
    except (ValueError, ZeroDivisionError, OverflowError):
        return None
    return None


_OPEN, _CLOSE = "([{", ")]}"


def _split_top(s: str, sep: str) -> list[str]:
    """Split at `sep` outside any bracket or brace."""
    parts, depth, start, i, n = [], 0, 0, 0, len(s)
    while i < n:
        c = s[i]
        if c in _OPEN:
            depth += 1
        elif c in _CLOSE:
            depth -= 1
        elif depth == 0 and s.startswith(sep, i):
            parts.append(s[start:i])
            i += len(sep)
            start = i
            continue
        i += 1
    parts.append(s[start:])
    return parts


def _enclosed(s: str) -> bool:
    """Whether s[0] is an opening bracket whose match is the last character (`(1,2)`, `[0,1)`)."""
    if len(s) < 2 or s[0] not in _OPEN or s[-1] not in _CLOSE:
        return False
    depth = 0
    for i, c in enumerate(s):
        if c in _OPEN:
            depth += 1
        elif c in _CLOSE:
            depth -= 1
            if depth == 0 and i < len(s) - 1:
                return False
    return depth == 0


def _equiv_normalized(a: str, b: str, depth: int = 0) -> bool:
    if not a or not b:  # an empty answer matches nothing
        return False
    if a == b:
        return True
    if depth > 8:
        return False
    x = _number(a)
    if x is not None:
        y = _number(b)
        if y is not None:
            return x == y
    for sep in ("\\cup", ","):
        pa, pb = _split_top(a, sep), _split_top(b, sep)
        if len(pa) > 1 or len(pb) > 1:
            # element-wise and in order (Hendrycks: `10, 4, -2` is not `4, 10, -2`)
            return len(pa) == len(pb) and all(_equiv_normalized(p, q, depth + 1) for p, q in zip(pa, pb))
    if a[0] == b[0] and a[-1] == b[-1] and _enclosed(a) and _enclosed(b):
        # same brackets only: `[0,1)` is not `(0,1)`
        return _equiv_normalized(a[1:-1], b[1:-1], depth + 1)
    return False


def is_equiv(prediction: str | None, reference: str) -> bool:
    """Whether the prediction is the reference answer: equal after `normalize`, or exactly equal as
    numbers (element-wise in tuples, intervals and lists); a None prediction is wrong."""
    if prediction is None or reference is None:
        return False
    try:
        return _equiv_normalized(normalize(prediction), normalize(reference))
    except Exception:  # as Hendrycks: fall back to the raw strings rather than fail the run
        return str(prediction).strip() == str(reference).strip()


def majority(answers: list[str | None]) -> tuple[str | None, int]:
    """maj@k: group the answers by equivalence (None and empty answers never vote); return the
    first-seen member of the largest group and its size, ties to the group seen first; (None, 0)
    when nothing voted."""
    groups: list[list] = []  # [normalized key, representative, count], in first-seen order
    for answer in answers or ():
        if answer is None:
            continue
        key = normalize(answer)
        if not key:
            continue
        for group in groups:
            try:
                same = _equiv_normalized(key, group[0])
            except Exception:
                same = key == group[0]
            if same:
                group[2] += 1
                break
        else:
            groups.append([key, answer, 1])
    if not groups:
        return None, 0
    best = groups[0]
    for group in groups[1:]:
        if group[2] > best[2]:  # strictly larger: a tie keeps the group seen first
            best = group
    return best[1], best[2]
