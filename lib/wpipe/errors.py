"""The project's one error family. Every error wpipe raises on purpose is a `WpipeError`,
and also the builtin kind a caller would expect (a bad schedule is a ValueError, a stuck
peer a RuntimeError), so `except ValueError` keeps working."""


class WpipeError(Exception):
    """Base of every error below."""


class ScheduleError(WpipeError, ValueError):
    """A schedule that cannot run: a missing or misplaced op, a deadlock, a version used
    before it exists. The message names device, step and op, then shows the marked grid."""


class CommError(WpipeError, RuntimeError):
    """A message or collective that did not complete: names both ranks, the op, the
    message and the likely cause."""


class CheckpointError(WpipeError, ValueError):
    """A checkpoint that cannot be resumed from: missing, corrupt or of another run.
    `rank_only`: found by one rank alone (its own file), so that rank reports it."""
    rank_only = False


class NonFiniteError(WpipeError, FloatingPointError):
    """A NaN or Inf loss or gradient (on_nonfinite stop), naming update and partition."""
