"""Multi-step arithmetic word problems with step-by-step solutions whose every step can be checked.

A problem follows one quantity (apples, pages, dollars, litres, ...) through 2-8 events, each told
in one of several phrasings; the solution writes one line per computation, each line holding one
equation, and ends with ``The answer is N.``. Every intermediate value is a whole number kept in
0..999, so a solution step is right exactly when its equation is true and its result is one of the
reference's values: that is the label the signal study needs, with no model in the loop.

    rng = random.Random(0)
    problem = make_problem(rng)          # {"question", "solution", "answer", "values", "steps"}
    step_is_correct("She has 12 + 5 = 17 apples.", problem)   # True / False / None (no equation)
"""

from __future__ import annotations

import random
import re
from typing import Any

NAMES = [
    ("Maya", "she", "her"), ("Liam", "he", "his"), ("Sofia", "she", "her"), ("Noah", "he", "his"),
    ("Aisha", "she", "her"), ("Kenji", "he", "his"), ("Elena", "she", "her"), ("Omar", "he", "his"),
    ("Priya", "she", "her"), ("Lucas", "he", "his"), ("Zara", "she", "her"), ("Mateo", "he", "his"),
]  # fmt: skip
THINGS = [
    ("apples", "bag"), ("marbles", "jar"), ("stickers", "sheet"), ("pencils", "box"), ("cookies", "tray"),
    ("stamps", "album page"), ("beads", "string"), ("eggs", "carton"), ("cards", "pack"), ("shells", "bucket"),
    ("books", "shelf"), ("coins", "purse"), ("tomatoes", "crate"), ("balloons", "bunch"),
]  # fmt: skip
FRIENDS = ["a friend", "her brother", "his sister", "a neighbour", "the teacher", "a cousin", "the class"]
PLACES = ["baskets", "boxes", "bags", "piles", "groups", "plates", "shelves"]


def _story(rng: random.Random, value: int, name: str, pro: str, thing: str, box: str) -> tuple[str, list[str], int]:
    """One event: the question's sentence, the solution lines, and the new value (None when it does not fit)."""
    kind = rng.choice(["add", "add", "sub", "sub", "groups", "times", "share"])
    cap = pro.capitalize()
    if kind == "add":
        x = rng.randint(2, 60)
        said = rng.choice(
            [f"{cap} finds {x} more {thing}.", f"{name} gets {x} {thing} as a gift.", f"Then {pro} buys {x} {thing}."]
        )
        return said, [f"After getting {x} more, {pro} has {value} + {x} = {value + x} {thing}."], value + x
    if kind == "sub":
        x = rng.randint(1, max(1, min(60, value - 1)))
        friend = rng.choice(FRIENDS)
        said = rng.choice(
            [f"{cap} gives {x} {thing} to {friend}.", f"{name} loses {x} {thing}.", f"Then {pro} uses {x} {thing}."]
        )
        return said, [f"After {x} are gone, {pro} has {value} - {x} = {value - x} {thing}."], value - x
    if kind == "groups":
        g, x = rng.randint(2, 9), rng.randint(2, 12)
        said = rng.choice(
            [
                f"{cap} buys {g} {box}s with {x} {thing} in each {box}.",
                f"{name} receives {g} {box}s of {thing}, {x} in every {box}.",
            ]
        )
        lines = [
            f"The {g} {box}s hold {g} * {x} = {g * x} {thing}.",
            f"Now {pro} has {value} + {g * x} = {value + g * x} {thing}.",
        ]
        return said, lines, value + g * x
    if kind == "times":
        m = rng.randint(2, 4)
        word = {2: "doubles", 3: "triples", 4: "quadruples"}[m]
        said = rng.choice([f"{cap} {word} the number of {thing}.", f"The number of {thing} {name} has {word}."])
        return said, [f"{cap.rstrip()} now has {value} * {m} = {value * m} {thing}."], value * m
    divisors = [d for d in range(2, 10) if value % d == 0 and value // d >= 1]
    d = rng.choice(divisors) if divisors else 1
    place = rng.choice(PLACES)
    said = rng.choice(
        [f"{cap} splits the {thing} equally into {d} {place} and keeps one of them.",
         f"{name} shares the {thing} equally among {d} {place} and takes one share."]
    )  # fmt: skip
    return said, [f"Each of the {d} {place} gets {value} / {d} = {value // d} {thing}."], value // d


def make_problem(rng: random.Random, min_steps: int = 2, max_steps: int = 8) -> dict[str, Any]:
    """A problem whose solution has between ``min_steps`` and ``max_steps`` computation lines."""
    while True:
        name, pro, _ = rng.choice(NAMES)
        thing, box = rng.choice(THINGS)
        value = rng.randint(3, 40)
        want = rng.randint(min_steps, max_steps)
        sentences = [f"{name} has {value} {thing}."]
        lines: list[str] = []
        values = [value]
        while len(lines) < want:
            said, new_lines, new_value = _story(rng, value, name, pro, thing, box)
            if not 1 <= new_value <= 999 or len(lines) + len(new_lines) > want or "/ 1 =" in new_lines[0]:
                continue
            sentences.append(said)
            lines.extend(new_lines)
            values.extend(int(v) for line in new_lines for v in _RESULT.findall(line))
            value = new_value
        if len(lines) >= min_steps:
            break
    question = " ".join(sentences) + f" How many {thing} does {name} have now?"
    return {
        "question": question,
        "solution": "\n".join([*lines, f"The answer is {value}."]),
        "answer": value,
        "values": sorted(set(values)),
        "steps": len(lines),
    }


PROMPT = "Question: {question}\nAnswer:\n"
"""How a problem is put to the model; the solution follows, one step per line."""


def prompt_text(problem: dict[str, Any]) -> str:
    return PROMPT.format(question=problem["question"])


_EQUATION = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")
_RESULT = re.compile(r"= (\d+)")
_ANSWER = re.compile(r"The answer is (-?\d+)")


def _true(a: int, op: str, b: int, c: int) -> bool:
    if op == "+":
        return a + b == c
    if op == "-":
        return a - b == c
    if op == "*":
        return a * b == c
    return b != 0 and a == b * c


def step_is_correct(text: str, problem: dict[str, Any]) -> bool | None:
    """Whether a solution step is right: its equations are true and land on the reference's values.

    The final line is right when it states the reference answer. ``None``: the step holds neither an
    equation nor an answer (nothing to check).
    """
    answer = _ANSWER.search(text)
    if answer:
        return int(answer.group(1)) == problem["answer"]
    found = _EQUATION.findall(text)
    if not found:
        return None
    return all(_true(int(a), op, int(b), int(c)) and int(c) in problem["values"] for a, op, b, c in found)


def final_answer(text: str) -> int | None:
    """The number after ``The answer is`` in a generated solution, if there is one."""
    match = _ANSWER.search(text)
    return int(match.group(1)) if match else None


def dataset(seed: int, size: int, min_steps: int = 2, max_steps: int = 8) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [make_problem(rng, min_steps, max_steps) for _ in range(size)]
