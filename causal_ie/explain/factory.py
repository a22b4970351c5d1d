"""The explainers of a run from its config: CE from the ``mask`` group, latent CE from ``latent``,
one CAM per name in ``cams`` (evaluate.py and ``python -m causal_ie.explain`` alike)."""

from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import DictConfig

from causal_ie.explain.cam import CAMExplainer
from causal_ie.explain.explainers import Explainer


def build_explainers(cfg: DictConfig) -> dict[str, Explainer]:
    """``ce`` from the ``mask`` group, ``ce_latent`` from ``latent`` (null: off), and one per CAM."""
    explainers: dict[str, Explainer] = {}
    if cfg.get("mask"):
        explainers["ce"] = instantiate(cfg.mask, _convert_="all")
    if cfg.get("latent") and getattr(explainers.get("ce"), "kind", None) != "latent":
        explainers["ce_latent"] = instantiate(cfg.latent, _convert_="all")
    for method in cfg.get("cams") or []:
        explainers[method] = CAMExplainer(method, target_layer=cfg.get("cam_layer") or "auto")
    return explainers
