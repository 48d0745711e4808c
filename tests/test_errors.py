"""moemesh/errors.py: the one first-line helper every one-line report uses."""

from moemesh.errors import first_line


def test_first_line_of_an_error_or_a_text():
    assert first_line(ValueError("\n  bad value\n  detail")) == "bad value"
    assert first_line(KeyError()) == "KeyError"  # no message: its type, never an empty reason
    assert first_line("") == ""  # a text is its own: nothing stays nothing
    assert first_line("one\ntwo") == "one"


def test_cause_of_follows_causes_and_contexts_not_the_error_itself():
    from moemesh.errors import cause_of

    try:
        try:
            raise OSError(28, "No space left on device")
        except OSError:
            raise RuntimeError("unexpected pos 46 vs 0")  # noqa: B904 (a context, as torch leaves it)
    except RuntimeError as wrapped:
        assert isinstance(cause_of(wrapped, OSError), OSError)
        assert cause_of(wrapped, RuntimeError) is None  # only what it wraps
        assert cause_of(wrapped, OSError, depth=0) is None
