"""Detectors of adversarial images, one class each, all following :class:`Detector`.

``ce`` (CE of every finding), ``ce_random`` (the same with window offsets and baseline drawn
per call), ``max_prob`` (confidence), ``noise_flip`` (predictions under
Gaussian noise), ``feature_squeezing`` (Xu et al. 2018), ``mahalanobis`` (Lee et al. 2018),
``lid`` (Ma et al. 2018) and ``combined`` (several at once). Each has its config in
``conf/detector/``; ``detection.detectors`` selects the set the attack study scores.
"""

from causal_ie.attacks.detectors.base import Detector
from causal_ie.attacks.detectors.ce import CEDetector
from causal_ie.attacks.detectors.ce_random import CERandomDetector
from causal_ie.attacks.detectors.combined import CombinedDetector
from causal_ie.attacks.detectors.feature_squeezing import (
    FeatureSqueezingDetector,
    bit_depth_squeeze,
    feature_squeezing_score,
    median_squeeze,
)
from causal_ie.attacks.detectors.lid import LIDDetector, LocalIntrinsicDimensionality
from causal_ie.attacks.detectors.mahalanobis import MahalanobisDetector, MahalanobisDistance
from causal_ie.attacks.detectors.max_prob import MaxProbDetector, max_prob
from causal_ie.attacks.detectors.noise_flip import NoiseFlipDetector, prediction_change_under_noise
from causal_ie.attacks.detectors.penultimate import classifier_layer, features_and_logits, penultimate_features

__all__ = [
    "CEDetector",
    "CERandomDetector",
    "CombinedDetector",
    "Detector",
    "FeatureSqueezingDetector",
    "LIDDetector",
    "LocalIntrinsicDimensionality",
    "MahalanobisDetector",
    "MahalanobisDistance",
    "MaxProbDetector",
    "NoiseFlipDetector",
    "bit_depth_squeeze",
    "classifier_layer",
    "feature_squeezing_score",
    "features_and_logits",
    "max_prob",
    "median_squeeze",
    "penultimate_features",
    "prediction_change_under_noise",
]
