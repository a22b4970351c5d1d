"""results.json: written atomically, read back with errors that name the file."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from causal_ie.io import atomic_write_json

RESULTS_FILE = "results.json"


def flatten(results: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested results -> ``{"localisation.ce.pointing_game": value, ...}`` (the keys of
    :mod:`causal_ie.outputs.schema`)."""
    flat: dict[str, Any] = {}
    for key, value in results.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def write_results(out_dir: str | Path, results: Mapping[str, Any]) -> Path:
    """Write ``results.json`` (nested; keys in :mod:`causal_ie.outputs.schema`) atomically."""
    return atomic_write_json(Path(out_dir) / RESULTS_FILE, results)


def read_results(path: str | Path) -> dict[str, Any]:
    """A run's results: ``path`` is results.json or the run directory holding it."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no results file at {path}")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); was the run interrupted while writing?") from err
    if not isinstance(results, dict):
        raise ValueError(f"{path} holds a {type(results).__name__}, expected a JSON object of results")
    return results
