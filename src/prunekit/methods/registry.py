"""The registry of compression methods a user can name with ``--method``.

Structural criteria (channel groups scored, then removed physically) come from :mod:`prunekit.channels.criteria`
and the curvature criteria of :mod:`prunekit.curvature.obs`; EigenDamage (:mod:`prunekit.methods.eigendamage`)
removes eigen-directions and rebuilds layers as bottlenecks.
"""

from __future__ import annotations

from collections.abc import Callable

import prunekit.curvature.obs  # noqa: F401  (registers the curvature criteria)
from prunekit.channels.criteria import CRITERIA
from prunekit.methods.admm import admm_prune_
from prunekit.methods.dpp import dpp_prune_
from prunekit.methods.eigendamage import eigendamage_round_
from prunekit.registry import Registry

METHODS: Registry[Callable] = Registry("method")
for _name in CRITERIA.list():
    METHODS.add(_name, CRITERIA.get(_name), f"structural: {CRITERIA.help(_name)}")
METHODS.add("admm", admm_prune_,
            "ADMM-NN-S joint pruning (--pattern) and quantization (--quant) with masked retraining (Ma et al. 2019)")
METHODS.add("dpp", dpp_prune_,
            "DPP: learned k-out-of-n masks by Gumbel-softmax (--granularity, --k, --n), optional STE quantization")
METHODS.add("eigendamage", eigendamage_round_,
            "structured pruning in the Kronecker-factored eigenbasis, layers rebuilt as bottlenecks (Wang et al. 2019)")
