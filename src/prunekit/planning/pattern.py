"""What shape a method keeps or removes together: one enum for every method (the fourth of the independent
choices, next to criterion, allocation and schedule).

======================  =================================================================  ==================
pattern                 unit                                                               methods
======================  =================================================================  ==================
``unstructured``        single weights                                                     ADMM
``k-of-n``              ``k`` of every ``n`` consecutive weights of a row (N:M)           ADMM, DPP
``kernel``              ``k`` of the ``C_in`` kernels of an output filter                  DPP
``filter``              output rows of one layer, zeroed                                   ADMM, DPP
``channel``             input channels of one layer, zeroed                                ADMM
``column``              weight-matrix columns shared by every filter of a layer            ADMM
``group``               coupled channels across layers, removed physically                 channel criteria,
                                                                                           ADMM, DPP
``eigen-direction``     Kronecker-factored eigen-directions, layers rebuilt as bottlenecks EigenDamage
======================  =================================================================  ==================
"""

from __future__ import annotations

import enum


class Pattern(str, enum.Enum):
    """The unit a method keeps or removes together (see the module table)."""

    UNSTRUCTURED = "unstructured"
    K_OF_N = "k-of-n"
    KERNEL = "kernel"
    FILTER = "filter"
    CHANNEL = "channel"
    COLUMN = "column"
    # Whole coupled channels across layers (a residual stage's channel, its BN, every conv reading it), chosen by
    # the channel graph and removed physically.
    GROUP = "group"
    EIGEN = "eigen-direction"


def check_pattern(pattern: Pattern | str, accepted: tuple[Pattern, ...], method: str) -> Pattern:
    """``pattern`` as a :class:`Pattern` that ``method`` supports.

    Raises:
        ValueError: naming the pattern and the ones ``method`` accepts.
    """
    try:
        value = Pattern(pattern)
    except ValueError:
        value = None
    if value not in accepted:
        names = ", ".join(p.value for p in accepted)
        raise ValueError(f"{method} pattern must be one of {names}, got {getattr(pattern, 'value', pattern)!r}")
    return value
