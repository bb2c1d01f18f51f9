"""Errors that the CLI reports as one line and a non-zero exit, without a traceback."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): what a
    one-line report quotes of a library's multi-line error."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class LlamaJaxError(Exception):
    """A problem with the user's input or environment, described in one line."""


class ConfigError(LlamaJaxError):
    """A setting that is unknown, of the wrong type, or impossible."""
