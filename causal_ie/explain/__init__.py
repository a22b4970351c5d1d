"""Explanations and how they are scored.

``explainers``: CE explainers (patch, pixel, superpixel, latent) behind one call
signature; ``cam``: pytorch-grad-cam baselines; ``metrics``: localisation and
faithfulness as torchmetrics ``Metric``s.
"""
