"""Classifiers: a timm backbone behind an input normaliser, as a LightningModule, and
pretrained torchxrayvision networks behind the same contract."""

from causal_ie.models.backbone import Normalize, PretrainedWeightsError, create_backbone
from causal_ie.models.classifier import Classifier
from causal_ie.models.xrv import XRVClassifier

__all__ = ["Classifier", "Normalize", "PretrainedWeightsError", "XRVClassifier", "create_backbone"]
