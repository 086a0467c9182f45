"""runmap under other libraries' parallel interfaces (joblib, and so scikit-learn).

Each integration imports its library only when it is used, so ``import runmap``
stays light.
"""

from __future__ import annotations

from runmap.integrations.joblib import register_joblib

__all__ = ["register_joblib"]
