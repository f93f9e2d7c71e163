"""Multi-task architectures on the fused heads: hard parameter sharing, MMoE, CGC and PLE.

Every model takes the task specs, exposes ``tasks`` / ``task_names`` / ``task_weights``, and is called as
``model(x, targets)`` → :class:`~mtlfast.MultiTaskOutput` or ``model(x)`` → name → logits; ``predict(x)`` is the
no-grad version. Experts, gates and towers of one shape are batched GEMMs; all heads and losses are one fused op.
"""

from mtlfast.models._base import MultiTaskModel
from mtlfast.models.cgc import CGC
from mtlfast.models.hard_sharing import HardSharing
from mtlfast.models.mmoe import MMoE
from mtlfast.models.ple import PLE

__all__ = ["CGC", "HardSharing", "MMoE", "MultiTaskModel", "PLE"]
