"""The logistic sigmoid of rewards, shared by the service and evaluation.

Bradley-Terry reads ``sigmoid(r_a - r_b)`` as the probability that ``a`` is preferred (the
``p_a_preferred`` of ``/v1/compare``, the calibration plot of ``rmserve eval --report``), and
vLLM's ``/classify`` activates a one-class model's logit with it. Written per sign, so that
``exp`` only ever sees a non-positive number: no overflow for rewards of any magnitude.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["sigmoid"]


def sigmoid(x: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """``1 / (1 + exp(-x))`` elementwise, in float64."""
    values = np.asarray(x, dtype=np.float64)
    z = np.exp(-np.abs(values))
    out: npt.NDArray[np.float64] = np.where(values >= 0, 1.0 / (1.0 + z), z / (1.0 + z))
    return out
