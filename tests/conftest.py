"""Shared fixtures: the real Hydra configs, composed and shrunk to test size."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
CONF = ROOT / "conf"
sys.path.insert(0, str(TESTS))  # fixture factories such as nih_fixtures

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest runs one worker per core (pyproject's addopts: -n auto): each worker, and the
    # train.py/evaluate.py subprocesses its tests start, keeps to one thread, so workers do
    # not oversubscribe the cores
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
else:
    torch.set_num_threads(min(2, torch.get_num_threads()))

# few, small synthetic images, no logger: shared by the train and evaluate configs of the tests
TINY_DATA = [
    "logger=none",
    "data.image_size=32",
    "data.batch_size=16",
    "data.synthetic.num_train=64",
    "data.synthetic.num_val=32",
    "data.synthetic.num_test=32",
]

# Tiny but real: the default config with few, small images and one short epoch.
TINY_TRAIN = [
    "model=tiny",
    *TINY_DATA,
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=2",
    "+trainer.limit_val_batches=2",
    "+trainer.limit_test_batches=2",
    "+trainer.enable_progress_bar=false",
    "~callbacks.model_summary",
    "~callbacks.progress_bar",
]


# evaluate.py on the tiny checkpoint: few images, short deletion curves
TINY_EVAL = [
    *TINY_DATA,
    "data.test_subset=12",
    "latent.intervention.batch_size=16",
    "cams=[gradcam]",
    "evaluation.deletion_steps=4",
    "~callbacks.progress_bar",
    "+trainer.enable_progress_bar=false",
]


def compose_config(name: str, overrides: list[str], output_dir: Path) -> DictConfig:
    """Compose conf/<name>.yaml with ``overrides`` as `python <name>.py` would, outputs in ``output_dir``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(name, overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)  # so ${hydra:...} interpolations resolve
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.root_dir = str(output_dir)
    return cfg


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny tensors: on a busy 2-core machine a second OpenMP thread only adds waiting.

    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def train_cfg(tmp_path):
    """A factory: ``train_cfg(*overrides)`` -> tiny composed train config in tmp_path."""

    def make(*overrides: str) -> DictConfig:
        return compose_config("train", TINY_TRAIN + list(overrides), tmp_path)

    yield make
    GlobalHydra.instance().clear()


def eval_cfg(tmp_path: Path, ckpt: Path, *overrides: str) -> DictConfig:
    """The evaluate config on the tiny checkpoint, outputs in ``tmp_path``."""
    return compose_config("evaluate", [*TINY_EVAL, f"ckpt_path={ckpt}", *overrides], tmp_path)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A classifier trained for a couple of steps at 32 px (model=tiny), shared by the evaluate tests."""
    from causal_ie.training import train

    out = tmp_path_factory.mktemp("train")
    cfg = compose_config("train", TINY_TRAIN, out)
    _, objects = train(cfg)
    GlobalHydra.instance().clear()
    return Path(objects["trainer"].checkpoint_callback.best_model_path)


def train_then_evaluate(tmp_path: Path, source: str, root: Path, *data: str) -> tuple[dict, Any]:
    """train.py (model=tiny, one epoch) then evaluate.py on ``data=source`` at ``root``, 32 px:
    the saved results.json and the evaluation's datamodule."""
    import json

    from causal_ie.evaluation import evaluate
    from causal_ie.training import train

    settings = [f"data={source}", f"data.root={root}", "data.image_size=32", "data.batch_size=4", "data.num_workers=0",
                "data.pin_memory=false", f"data.cache_dir={tmp_path / 'cache'}", "logger=none", *data]
    cfg = compose_config("train", ["model=tiny", *settings, "trainer.max_epochs=1", "+trainer.enable_progress_bar=false",
                                   "~callbacks.model_summary", "~callbacks.progress_bar"], tmp_path / "train")
    _, objects = train(cfg)
    GlobalHydra.instance().clear()
    ckpt = objects["trainer"].checkpoint_callback.best_model_path
    cfg = compose_config("evaluate", [*settings, f"ckpt_path={ckpt}", "data.test_subset=null", "cams=[gradcam]",
                                      "latent=null", "evaluation.deletion_steps=4", "~callbacks.progress_bar",
                                      "+trainer.enable_progress_bar=false"], tmp_path / "eval")
    _, objs = evaluate(cfg)
    return json.loads((tmp_path / "eval" / "results.json").read_text()), objs["datamodule"]
