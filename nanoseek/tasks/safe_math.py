"""A small, whitelisting arithmetic parser for checking model output.

Rule-based RL rewards (DeepSeek-R1, section 2.2.2) run a program over text the policy wrote. That text is
hostile by construction: RL finds whatever the checker lets through. So nothing here calls eval, exec,
compile or ast on model output. Instead a recursive-descent parser accepts exactly this grammar

    expr    := term (('+' | '-') term)*
    term    := unary (('*' | '/') unary)*
    unary   := ('+' | '-') unary | primary
    primary := NUMBER | '(' expr ')'
    NUMBER  := DIGITS ('.' DIGITS)?          (ASCII digits only)

and evaluates it with exact rational arithmetic (fractions.Fraction). There is no exponent: `**`, `^` and
`1e9` are parse errors. Hard bounds keep every call small and fast whatever the input:

- input length (MAX_EXPR_CHARS), checked before anything else, so a megabyte string costs one len();
- nesting depth of parentheses and unary signs (MAX_DEPTH), so recursion never gets deep;
- digits per literal (MAX_DIGITS);
- size of every intermediate result: numerator and denominator must stay below MAX_ABS;
- a step budget (MAX_STEPS) counting parser actions, a deterministic stand-in for a time limit.

Any violation, any syntax error and division by zero give None. The functions never raise on a str.
"""

from __future__ import annotations

from fractions import Fraction

MAX_EXPR_CHARS = 200
MAX_DEPTH = 32
MAX_DIGITS = 12
MAX_ABS = 10**18
MAX_STEPS = 2_000

_DIGITS = "0123456789"
# Only a few lookalike symbols models (and people) write; anything else outside ASCII is rejected.
_NORMALISE = {"\u00d7": "*", "\u00f7": "/", "\u2212": "-", "\u2013": "-", "\u22c5": "*", "\u00b7": "*"}


class _Reject(Exception):
    """Internal: the input is outside the grammar or a bound. Never escapes this module."""


class _Parser:
    def __init__(self, text: str, max_depth: int, max_digits: int, max_abs: int, max_steps: int):
        self.s = text
        self.i = 0
        self.depth = 0
        self.steps = 0
        self.max_depth, self.max_digits, self.max_abs, self.max_steps = max_depth, max_digits, max_abs, max_steps
        self.literals: list[Fraction] = []

    # -- helpers ---------------------------------------------------------------------------------------
    def _tick(self) -> None:
        self.steps += 1
        if self.steps > self.max_steps:
            raise _Reject("step budget")

    def _skip_ws(self) -> None:
        while self.i < len(self.s) and self.s[self.i] in " \t\n\r":
            self.i += 1

    def _peek(self) -> str:
        self._skip_ws()
        return self.s[self.i] if self.i < len(self.s) else ""

    def _check(self, x: Fraction) -> Fraction:
        # Bound both parts: a tiny value with a huge denominator is as costly as a huge one.
        if abs(x.numerator) >= self.max_abs or x.denominator >= self.max_abs:
            raise _Reject("magnitude")
        return x

    # -- grammar ---------------------------------------------------------------------------------------
    def parse(self) -> Fraction:
        value = self.expr()
        if self._peek() != "":
            raise _Reject("trailing input")
        return value

    def expr(self) -> Fraction:
        value = self.term()
        while self._peek() in ("+", "-"):
            self._tick()
            op = self.s[self.i]
            self.i += 1
            rhs = self.term()
            value = self._check(value + rhs if op == "+" else value - rhs)
        return value

    def term(self) -> Fraction:
        value = self.unary()
        while self._peek() in ("*", "/"):
            self._tick()
            op = self.s[self.i]
            self.i += 1
            if self._peek() in ("*", "/"):  # '**' (power) and '//' (floor division) are not arithmetic here
                raise _Reject("double operator")
            rhs = self.unary()
            if op == "*":
                value = self._check(value * rhs)
            else:
                if rhs == 0:
                    raise _Reject("division by zero")
                value = self._check(value / rhs)
        return value

    def _enter(self) -> None:
        self.depth += 1
        if self.depth > self.max_depth:
            raise _Reject("too deep")

    def unary(self) -> Fraction:
        self._tick()
        c = self._peek()
        if c in ("+", "-"):
            self.i += 1
            self._enter()
            value = self.unary()
            self.depth -= 1
            return -value if c == "-" else value
        return self.primary()

    def primary(self) -> Fraction:
        c = self._peek()
        if c == "(":
            self.i += 1
            self._enter()
            value = self.expr()
            self.depth -= 1
            if self._peek() != ")":
                raise _Reject("unbalanced parenthesis")
            self.i += 1
            return value
        if c != "" and c in _DIGITS:
            return self.number()
        raise _Reject("unexpected character")

    def number(self) -> Fraction:
        start = self.i
        while self.i < len(self.s) and self.s[self.i] in _DIGITS:
            self.i += 1
        int_part = self.s[start:self.i]
        frac_part = ""
        if self.i < len(self.s) and self.s[self.i] == ".":
            self.i += 1
            f0 = self.i
            while self.i < len(self.s) and self.s[self.i] in _DIGITS:
                self.i += 1
            frac_part = self.s[f0:self.i]
            if not frac_part:
                raise _Reject("dangling decimal point")
        if len(int_part) + len(frac_part) > self.max_digits:
            raise _Reject("literal too long")
        value = Fraction(int(int_part + frac_part), 10 ** len(frac_part))
        self.literals.append(value)
        return self._check(value)


def _normalise(text: str) -> str:
    for k, v in _NORMALISE.items():
        if k in text:
            text = text.replace(k, v)
    return text


def evaluate_with_literals(
    text: str,
    max_chars: int = MAX_EXPR_CHARS,
    max_depth: int = MAX_DEPTH,
    max_digits: int = MAX_DIGITS,
    max_abs: int = MAX_ABS,
    max_steps: int = MAX_STEPS,
) -> tuple[Fraction, list[Fraction]] | None:
    """Evaluate an arithmetic expression; return (value, literals in order of appearance) or None.

    The literals let a verifier check which numbers were used (Countdown). Leading/trailing whitespace and
    a trailing '= <anything>' are not handled here: the caller decides what counts as the expression.
    """
    if not isinstance(text, str) or len(text) > max_chars:
        return None
    text = _normalise(text)
    p = _Parser(text, max_depth, max_digits, max_abs, max_steps)
    try:
        value = p.parse()
    except _Reject:
        return None
    except (RecursionError, MemoryError, ValueError, OverflowError):  # belt and braces; bounds should stop these
        return None
    return value, p.literals


def evaluate(text: str, **bounds) -> Fraction | None:
    """Evaluate an arithmetic expression exactly; None if it is not one (see module docstring)."""
    out = evaluate_with_literals(text, **bounds)
    return None if out is None else out[0]


# -------------------------------------------- final answers: a single number written in any of the usual ways
MAX_NUMBER_CHARS = 100
MAX_EXPONENT = 100


def _parse_decimal(s: str) -> Fraction | None:
    """'-12.5', '+3', '1,000', '1e3', '2.5E-2' -> Fraction. Commas only as proper thousands separators."""
    if not s:
        return None
    sign = 1
    if s[0] in "+-":
        sign = -1 if s[0] == "-" else 1
        s = s[1:]
    mantissa, exp = s, 0
    for e in ("e", "E"):
        if e in s:
            mantissa, exp_s = s.split(e, 1)
            if exp_s[:1] in ("+", "-"):
                exp_sign, exp_s = (-1 if exp_s[0] == "-" else 1), exp_s[1:]
            else:
                exp_sign = 1
            if not exp_s or len(exp_s) > 3 or any(c not in _DIGITS for c in exp_s):
                return None
            exp = exp_sign * int(exp_s)
            if abs(exp) > MAX_EXPONENT:
                return None
            break
    int_part, _, frac_part = mantissa.partition(".")
    if "," in int_part:
        groups = int_part.split(",")
        if not (1 <= len(groups[0]) <= 3) or any(len(g) != 3 for g in groups[1:]):
            return None
        int_part = "".join(groups)
    if not int_part and not frac_part:
        return None
    if any(c not in _DIGITS for c in int_part + frac_part):
        return None
    digits = int_part + frac_part
    value = Fraction(int(digits), 10 ** len(frac_part))
    value *= Fraction(10) ** exp
    return sign * value


def _strip_wrappers(s: str) -> str:
    s = s.strip()
    for _ in range(3):  # a few layers at most: "$\boxed{42}$."
        before = s
        s = s.rstrip(".").strip()
        if s.startswith("\\boxed{") and s.endswith("}"):
            s = s[len("\\boxed{"):-1].strip()
        if len(s) >= 2 and s[0] == "$" and s[-1] == "$":
            s = s[1:-1].strip()
        elif s.startswith("\\$"):
            s = s[2:].strip()
        elif s.startswith("$"):
            s = s[1:].strip()
        if s == before:
            break
    return s


def parse_number(text) -> Fraction | None:
    """Parse a final answer written as one number; None if it is not one.

    Accepts ints, floats (by their shortest decimal repr, so 0.1 means 1/10), Fractions and strings such as
    '42', '-7', '1,000', '1e3', '0.75', '3/4', '-3/4', '\\frac{3}{4}', '$1,000', '\\boxed{12}', '12.'.
    Equal numbers compare equal whatever the spelling: parse_number('3/4') == parse_number('0.75').
    """
    if isinstance(text, bool):
        return None
    if isinstance(text, Fraction):
        return text
    if isinstance(text, int):
        return Fraction(text)
    if isinstance(text, float):
        if text != text or text in (float("inf"), float("-inf")):
            return None
        return _parse_decimal(repr(text))
    if not isinstance(text, str) or len(text) > MAX_NUMBER_CHARS:
        return None
    s = _normalise(_strip_wrappers(text)).replace(" ", "")
    for frac in ("\\frac{", "\\dfrac{", "\\tfrac{"):
        if s.startswith(frac) or s.startswith("-" + frac):
            neg = s.startswith("-")
            body = s[len(frac) + neg:]
            num, sep, rest = body.partition("}{")
            if not sep or not rest.endswith("}"):
                return None
            a, b = _parse_decimal(num), _parse_decimal(rest[:-1])
            if a is None or b is None or b == 0:
                return None
            return -a / b if neg else a / b
    if s.count("/") == 1:
        a_s, b_s = s.split("/")
        a, b = _parse_decimal(a_s), _parse_decimal(b_s)
        if a is None or b is None or b == 0 or b_s[:1] in ("+", "-"):
            return None
        return a / b
    return _parse_decimal(s)
