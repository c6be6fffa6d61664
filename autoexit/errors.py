"""One error type for everything a user can get wrong.

Every message is a single line that says what is wrong and how to fix it.
The CLI prints ``autoexit: <message>`` and exits with status 2 for these;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class AutoExitError(ValueError):
    """Bad input or configuration, with a one-line, actionable message."""

    def __init__(self, message: str):
        message = " ".join(str(message).split())  # always one line
        super().__init__(message)


class TraceError(AutoExitError):
    """The backbone cannot be traced with torch.fx."""


class DataError(AutoExitError):
    """The inference data is empty, too small, malformed or does not fit the model."""


class ArtifactError(AutoExitError):
    """An emitted artifact is missing, corrupt or tampered with."""


class MissingExtraError(AutoExitError):
    """An optional dependency (extra) is not installed."""

    def __init__(self, module: str, extra: str, what: str):
        super().__init__(
            f"{what} needs the optional package '{module}', which is not installed; "
            f"install it with: pip install 'autoexit[{extra}]'"
        )


def require(module: str, extra: str, what: str):
    """Import an optional module or raise MissingExtraError naming the extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingExtraError(module, extra, what) from exc
