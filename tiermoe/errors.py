"""Exceptions that name what is wrong with a user's input, so callers can tell bad input from a bug."""


class TiermoeError(Exception):
    """Base class of every error tiermoe raises on purpose."""


class CheckpointError(TiermoeError, ValueError):
    """A checkpoint folder is incomplete or damaged: missing tensor, truncated file, bad header."""


class ConfigError(TiermoeError, ValueError):
    """A config.json or an engine option cannot be used as given."""


class RequestError(TiermoeError, ValueError):
    """A generation request is invalid: empty prompt, bad sampling parameters, too long for the model."""


class ExpertIOError(TiermoeError, OSError):
    """Reading an expert's weights failed; the message names the file and the expert."""


class RequestFailed(TiermoeError):
    """A request ended with an error of its own (e.g. an unreadable expert file); the engine serves the others.
    The cause is chained (`__cause__`)."""
