"""Classifiers: a timm backbone behind an input normaliser, as a LightningModule."""

from causal_ie.models.backbone import Normalize, PretrainedWeightsError, create_backbone
from causal_ie.models.classifier import Classifier

__all__ = ["Classifier", "Normalize", "PretrainedWeightsError", "create_backbone"]
