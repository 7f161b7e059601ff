"""The errors every layer may raise, defined below all of them (no upward imports needed).

Each says what is wrong and what to do; none is raised for a condition that can be fixed
silently. More specific errors (``ManifestError``, ``UnsupportedModuleError``,
``PrivacyBudgetExceeded``, ...) subclass these or ``ValueError`` where they are defined.
"""

from __future__ import annotations

__all__ = ["ConfigError", "PolicyError", "StopTraining", "NonFiniteLossError"]


class ConfigError(ValueError):
    """A recipe or override that does not fit the schema."""


class PolicyError(ValueError):
    """A clipping policy that is invalid or would not mean what it seems to mean."""


class StopTraining(RuntimeError):
    """End the run cleanly after saving (e.g. the next step would exceed the privacy budget);
    ``str(exc)`` is the reason shown to the user."""


class NonFiniteLossError(FloatingPointError):
    """A NaN/inf loss: never trained on silently."""

    def __init__(self, ids: list[str], values: list[float]):
        self.ids = ids
        shown = ", ".join(f"{i} ({v})" for i, v in list(zip(ids, values))[:5])
        super().__init__(f"non-finite CTC loss for {len(ids)} utterance(s): {shown}")
