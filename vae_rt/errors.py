"""Error types that the CLI turns into one line and an exit code instead of a traceback."""


class UserError(Exception):
    """Bad usage or bad input (a missing file, a corrupt checkpoint, a bad option): exit code 2."""


class MissingDependencyError(UserError, ImportError):
    """An optional package is not installed; the message says what to `pip install`."""


class RuntimeFailure(Exception):
    """The input was fine but the work failed (training diverged, a parity check failed): exit code 1."""


def require(module: str, extra: str):
    """Import an optional dependency, or raise a one-line error saying which extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingDependencyError(
            f"{module} is not installed ({err}); install it with: pip install 'vae-rt[{extra}]'"
        ) from err
