"""moemesh/errors.py: the one first-line helper every one-line report uses."""

from moemesh.errors import first_line


def test_first_line_of_an_error_or_a_text():
    assert first_line(ValueError("\n  bad value\n  detail")) == "bad value"
    assert first_line(KeyError()) == "KeyError"  # no message: its type, never an empty reason
    assert first_line("") == ""  # a text is its own: nothing stays nothing
    assert first_line("one\ntwo") == "one"
