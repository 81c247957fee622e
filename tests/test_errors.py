"""Errors reach the user as one line."""

from __future__ import annotations

from saliency_robustness.errors import one_line


def test_one_line_joins_the_lines_of_a_multiline_error() -> None:
    exc = RuntimeError("Error(s) in loading state_dict:\n\tMissing key(s): 'fc.weight'\n\n\tUnexpected key(s): 'head'")
    assert one_line(exc) == "Error(s) in loading state_dict:; Missing key(s): 'fc.weight'; Unexpected key(s): 'head'"


def test_one_line_cuts_long_text_and_names_a_silent_error() -> None:
    text = one_line(ValueError("x" * 1000), limit=50)
    assert len(text) == 50 and text.endswith("...") and "\n" not in text
    assert one_line(KeyError()) == "KeyError"
