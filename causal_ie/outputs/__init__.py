"""What runs leave behind: results.json, report.md, figures and sweep summaries.

This package knows no experiment. Experiments (localisation, the attack
study, counterfactuals) bring their own report sections and artefact writers
(:class:`~causal_ie.outputs.report.ReportSection`) and sweep extensions
(:class:`~causal_ie.outputs.sweeps.SweepExtension`); the entry points hand
them to :func:`~causal_ie.outputs.report.write_report` and
:func:`~causal_ie.outputs.sweeps.summarize`.

- ``results``: results.json (atomic) and :func:`flatten`;
- ``schema``: every results.json key and what it means (docs/results.md is rendered from it);
- ``plots``: saving figures, boxes, the colour scales of signed and non-negative maps;
- ``tables``: markdown tables and number formatting; :func:`~causal_ie.outputs.tables.result_cells`
  folds every ``<key>_ci_low`` / ``<key>_ci_high`` into its key's cell, ``0.832 [0.784, 0.875]``;
- ``report``: report.md from sections;
- ``sweeps``: one table and plots per Hydra multirun.
"""
