"""Differential-privacy accounting: the accountant of record (dp-accounting) and the run ledger."""

from privasr.privacy.accountant import (DEFAULT_PLD_DISCRETIZATION, METHODS, PrivacyUnit,
                                        calibrate, epsilon,
                                        epsilon_for_segments, max_steps)
from privasr.privacy.ledger import PrivacyBudgetExceeded, PrivacyLedger

__all__ = [
    "DEFAULT_PLD_DISCRETIZATION",
    "METHODS",
    "PrivacyBudgetExceeded",
    "PrivacyLedger",
    "PrivacyUnit",
    "calibrate",
    "epsilon",
    "epsilon_for_segments",
    "max_steps",
]
