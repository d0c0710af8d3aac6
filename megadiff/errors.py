"""Exceptions the CLI turns into one line and a non-zero exit (see `cli.run_guarded`)."""


class RunStopped(RuntimeError):
    """Training stopped on purpose to protect the run's state (e.g. repeated NaN losses)."""
