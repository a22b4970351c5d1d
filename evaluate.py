"""CE maps vs CAMs of a trained classifier on the test boxes: `python evaluate.py [overrides]`."""

import hydra
from omegaconf import DictConfig

from causal_ie.evaluation import evaluate
from causal_ie.runs import run_task


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    return run_task(evaluate, cfg)


if __name__ == "__main__":
    main()
