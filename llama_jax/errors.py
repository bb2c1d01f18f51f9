"""Errors that the CLI reports as one line and a non-zero exit, without a traceback."""


class LlamaJaxError(Exception):
    """A problem with the user's input or environment, described in one line."""


class ConfigError(LlamaJaxError):
    """A setting that is unknown, of the wrong type, or impossible."""
