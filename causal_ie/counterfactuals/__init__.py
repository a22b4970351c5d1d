"""Sparse visual counterfactuals: the lp-ball/box LMO, Auto-Frank-Wolfe and SVCE.

After Boreiko et al. 2022, "Sparse Visual Counterfactual Explanations in
Image Space": maximise the confidence of a finding within an lp ball
(p = 1.5 by default) intersected with the image box, with Auto-Frank-Wolfe.

- :func:`lp_ball_box_lmo`: the Frank-Wolfe vertex over the lp ball ∩ [0,1]^d;
- :func:`auto_frank_wolfe` / :func:`frank_wolfe`: the optimisers;
- :class:`SVCE` / :class:`APGDCounterfactual`: counterfactuals of one finding
  per image, and :func:`counterfactual_metrics` to judge them;
- ``python -m causal_ie.counterfactuals``: the Hydra command (``generate``).
"""

from causal_ie.counterfactuals.afw import AFWResult, auto_frank_wolfe, checkpoint_schedule, frank_wolfe
from causal_ie.counterfactuals.lmo import lp_ball_box_lmo, lp_norm

_SVCE_NAMES = (
    "SVCE",
    "APGDCounterfactual",
    "CounterfactualGenerator",
    "CounterfactualResult",
    "FindingLogits",
    "FindingObjective",
    "counterfactual_metrics",
    "finding_indices",
)

__all__ = ["AFWResult", "auto_frank_wolfe", "checkpoint_schedule", "frank_wolfe", "lp_ball_box_lmo", "lp_norm", *_SVCE_NAMES]


def __getattr__(name: str):
    # svce pulls in the metrics and the intervention engine: import it on first use
    if name in _SVCE_NAMES:
        from causal_ie.counterfactuals import svce

        return getattr(svce, name)
    raise AttributeError(f"module 'causal_ie.counterfactuals' has no attribute {name!r}")
