"""A strategy raises :class:`StopTraining` to end training cleanly (checkpoint kept, reason
reported) rather than crash: e.g. the next step would exceed the privacy budget."""


class StopTraining(RuntimeError):
    """End the run after saving; ``str(exc)`` is the reason shown to the user."""
