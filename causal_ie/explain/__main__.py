"""Explain image files (PNG, JPEG, DICOM): `python -m causal_ie.explain input=FILE_OR_DIR [overrides]`."""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from causal_ie.explain.task import run_explain
from causal_ie.runs import run_task

# the repository's conf/ (the package is installed in place, beside it)
CONF = str(Path(__file__).resolve().parents[2] / "conf")


@hydra.main(version_base="1.3", config_path=CONF, config_name="explain")
def main(cfg: DictConfig) -> float | None:
    return run_task(run_explain, cfg)


if __name__ == "__main__":
    main()
