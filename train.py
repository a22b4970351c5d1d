"""Train a multi-label chest X-ray classifier: `python train.py [overrides]`."""

import hydra
from omegaconf import DictConfig

from causal_ie.runs import run_task
from causal_ie.training import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run_task(train, cfg)


if __name__ == "__main__":
    main()
