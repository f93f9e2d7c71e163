"""Transfer learning: pretrained backbones serving new tasks through fused multi-task heads.

* :class:`TransferModel` — backbone (old classifier stripped) → pooling → :class:`mtlfast.MultiTaskHeads`;
* freezing — :func:`freeze`, :func:`unfreeze`, :func:`freeze_to` by :func:`layer_groups`, BatchNorm policies
  (:func:`set_batchnorm_policy`, :class:`FrozenBatchNorm2d`), :func:`feature_extractor`, :func:`full_fine_tuning`;
* optimisation — :func:`discriminative_param_groups` (discriminative LRs, layer-wise LR decay),
  :class:`FineTuneSchedule` (heads first, then everything at a lower LR);
* regularisation toward the source — :class:`L2SP`;
* linear probing — :func:`extract_features` (computed once, cached on disk), :func:`fit_heads`.
"""

from mtlfast.transfer.batchnorm import BN_POLICIES, BNPolicy, FrozenBatchNorm2d, is_batchnorm, set_batchnorm_policy
from mtlfast.transfer.classifier import CLASSIFIER_NAMES, StrippedClassifier, find_classifier, replace_classifier
from mtlfast.transfer.feature_cache import (
    FeatureDataset,
    cache_key_for,
    data_fingerprint,
    extract_features,
    module_fingerprint,
)
from mtlfast.transfer.freeze import feature_extractor, freeze, freeze_to, full_fine_tuning, unfreeze
from mtlfast.transfer.groups import LayerGroup, backbone_of, layer_groups, new_parameters
from mtlfast.transfer.l2sp import L2SP
from mtlfast.transfer.model import TransferModel
from mtlfast.transfer.optim import FineTuneSchedule, discriminative_param_groups
from mtlfast.transfer.pooling import POOL_NAMES, masked_mean, pool, select_output
from mtlfast.transfer.probe import fit_heads

__all__ = [
    "BNPolicy",
    "BN_POLICIES",
    "CLASSIFIER_NAMES",
    "FeatureDataset",
    "FineTuneSchedule",
    "FrozenBatchNorm2d",
    "L2SP",
    "LayerGroup",
    "POOL_NAMES",
    "StrippedClassifier",
    "TransferModel",
    "backbone_of",
    "cache_key_for",
    "data_fingerprint",
    "discriminative_param_groups",
    "extract_features",
    "feature_extractor",
    "find_classifier",
    "fit_heads",
    "freeze",
    "freeze_to",
    "full_fine_tuning",
    "is_batchnorm",
    "layer_groups",
    "masked_mean",
    "module_fingerprint",
    "new_parameters",
    "pool",
    "replace_classifier",
    "select_output",
    "set_batchnorm_policy",
    "unfreeze",
]
