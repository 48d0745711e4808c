"""The project's user-facing error types: a leaf module (no imports), so every layer can raise
them and train.py can catch them without importing the layer that raises."""


class ConfigError(ValueError):
    """A user-facing configuration error: one line naming keys, values and what is valid."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written, read or trusted: one line naming the file and why."""


class DataError(RuntimeError):
    """Training data that turns out unusable as it is read (a token id past the vocabulary, in
    a corpus whose metadata said otherwise): one line naming the source and why."""


class RanksFailed(SystemExit):
    """The spawned ranks failed or hung, and the launcher has printed why in one line
    (``reason``). Exits 1, as SystemExit(1) does; one job of a local sweep turns it into that
    job's failure so the sweep goes on (train.py). ``kind``: the type name of the exception
    the earliest failed rank raised (``CheckpointError``), None when no rank raised one (a rank
    killed, hung or exited)."""

    def __init__(self, reason: str, kind: str | None = None) -> None:
        super().__init__(1)
        self.reason = reason
        self.kind = kind


def first_line(err: BaseException | str) -> str:
    """The first line of an error's message, stripped, for a one-line report; an exception with
    no message gives its type's name."""
    lines = str(err).strip().splitlines()
    if lines:
        return lines[0]
    return type(err).__name__ if isinstance(err, BaseException) else ""


def cause_of(err: BaseException, kind: type[BaseException], depth: int = 16) -> BaseException | None:
    """The first exception of ``kind`` among ``err``'s causes and contexts (not ``err`` itself),
    followed at most ``depth`` links: libraries wrap the error that says what happened."""
    seen: BaseException | None = err
    for _ in range(depth):
        seen = seen.__cause__ or seen.__context__ if seen is not None else None
        if seen is None or isinstance(seen, kind):
            return seen
    return None
