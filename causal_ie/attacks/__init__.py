"""Adversarial examples for multi-label classifiers and their detection from CE maps."""

from causal_ie.attacks.adversarial_training import AdversarialTraining
from causal_ie.attacks.factory import ATTACKS, Adversarial, MultiLabelAttack
from causal_ie.attacks.wrapper import FindingLogits

__all__ = ["ATTACKS", "Adversarial", "AdversarialTraining", "FindingLogits", "MultiLabelAttack"]
