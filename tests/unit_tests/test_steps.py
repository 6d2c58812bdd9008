"""Step segmentation and stop-sequence handling on plain strings."""

from langchain_specguard.engine.steps import find_stop, new_text, step_complete
from langchain_specguard.engine.text import held_back as _held_back


def test_step_ends_at_a_delimiter_after_content() -> None:
    assert step_complete("First, 3 + 5 = 8.\n\n", ["\n\n"])
    assert step_complete("x = 1.\n\nSo", ["\n\n"])  # a token may carry text past the delimiter
    assert not step_complete("First, 3 + 5", ["\n\n"])
    assert not step_complete("\n\n", ["\n\n"])  # a lone delimiter is not a step
    assert not step_complete("\n\n  ", ["\n\n"])
    assert step_complete("\n\nThen.\n\n", ["\n\n"])  # leading blank lines belong to the step
    assert step_complete("a\n", ["\n\n", "\n"])


def test_find_stop() -> None:
    assert find_stop("hello world", ["wor"]) == 6
    assert find_stop("hello world", ["xyz"]) is None
    assert find_stop("ab ab", ["ab"], start=1) == 3
    assert find_stop("stop here END and END", ["END", "here"]) == 5


def test_new_text() -> None:
    assert new_text("Hello", "Hello world") == " world"
    assert new_text("", "abc") == "abc"
    assert new_text("caf\ufffd", "café!") == "é!"  # a completed multi-byte char replaces the stand-in


def test_held_back_keeps_possible_stop_prefixes() -> None:
    assert _held_back("the answer is 4 ST", ["STOP"]) == 2
    assert _held_back("the answer", ["STOP"]) == 0
    assert _held_back("abc S", ["STOP", "S!"]) == 1
    assert _held_back("anything", []) == 0
