"""`evaluate(cfg)`: CE maps and CAMs of a trained classifier, scored on the test boxes."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from causal_ie.attacks.evaluation import AttackEvaluation
from causal_ie.attacks.report import AttackReport
from causal_ie.explain.explainers import Explainer, approx_errors
from causal_ie.explain.factory import build_explainers
from causal_ie.explain.report import LocalisationReport
from causal_ie.interventions.autoencoder import AutoencoderCache
from causal_ie.lightning.callbacks import CEMapLogger
from causal_ie.lightning.evaluation import CEEvaluation
from causal_ie.lightning.resume import STATE_DIR, AdaptiveCheckpoint, EvaluationState, run_settings
from causal_ie.outputs.report import write_report
from causal_ie.outputs.results import write_results
from causal_ie.runs import build_callbacks, check_compatible, classifier_identity, instantiate_dict, load_classifier

log = logging.getLogger(__name__)


def autoencoder_cache(
    classifier: nn.Module, weights: Path | None, cache_dir: str | Path, data_cfg: Any = None
) -> AutoencoderCache:
    """Where latent explainers with ``space=autoencoder`` cache their autoencoder, and the key
    of this classifier and its training images: the weights file's version and the data
    settings that choose the training images (seed, augmentation, synthetic sizes, ...).
    CEEvaluation fits them in ``on_test_start``, on the classifier's device."""
    data = OmegaConf.to_container(data_cfg, resolve=True) if isinstance(data_cfg, DictConfig) else data_cfg
    if isinstance(data, dict):  # settings that do not change the training images stay out of the key
        data = {k: v for k, v in data.items() if k not in ("num_workers", "pin_memory", "test_subset", "test_boxes_only")}
    key = f"{classifier_identity(classifier, weights)}|data={json.dumps(data, sort_keys=True, default=str)}"
    return AutoencoderCache(cache_dir, key)


def build_attack_evaluation(
    cfg: DictConfig, classifier: nn.Module, explainers: dict[str, Explainer], unlabelled: tuple[str, ...] = ()
) -> AttackEvaluation | None:
    """The attack study of ``detection`` (a partial AttackEvaluation) with the ``attack``, the
    classifier's findings and the CE explainers of the run (None for ``attack=none``)."""
    if not cfg.get("attack"):
        return None
    attack = instantiate(cfg.attack, _convert_="all")
    study = instantiate(cfg.detection, _convert_="all")
    ce = {name: e for name, e in explainers.items() if name in ("ce", "ce_latent")}
    missing = tuple(getattr(classifier, "missing_findings", ()))
    built: AttackEvaluation = study(attack=attack, findings=classifier.findings, explainers=ce,
                                    missing_findings=missing, unlabelled_findings=unlabelled)
    if attack.adaptive:
        built.adaptive.check(built)  # an adaptive study that cannot run fails before the test loop
    return built


def run_adaptive(module: CEEvaluation, attack: AttackEvaluation, classifier: nn.Module, dataset: Any,
                 records: Any) -> dict[str, Any]:
    """The adaptive study, its progress saved beside the test loop's state (resumable alike)."""
    if module.state is None:
        return attack.adaptive.run(attack, classifier, dataset, records)
    with AdaptiveCheckpoint(module.state, module.checkpoint_every, module.checkpoint_minutes) as progress:
        return attack.adaptive.run(attack, classifier, dataset, records, progress=progress, resume=progress.resume)


def reference_images(datamodule: L.LightningDataModule, limit: int) -> list[Tensor]:
    """Up to ``limit`` clean validation images in batches: the detectors' clean reference,
    disjoint from the test images they score."""
    loader = DataLoader(Subset(datamodule.dataset("val"), range(min(limit, len(datamodule.dataset("val"))))),
                        batch_size=datamodule.batch_size)
    return [batch["image"] for batch in loader]


def run_directory(cfg: DictConfig) -> Path:
    """Where the run writes: ``resume=DIR`` (a stopped run's directory, continued there), else
    the Hydra run directory."""
    resume = cfg.get("resume")
    if not resume:
        return Path(cfg.paths.output_dir)
    directory = Path(str(resume)).expanduser()
    if not (directory / STATE_DIR).is_dir():
        held = "results.json (it finished)" if (directory / "results.json").is_file() else "no saved evaluation state"
        raise FileNotFoundError(f"resume={str(resume)!r}: expected a stopped evaluate.py run directory with "
                                f"{STATE_DIR}/ inside; it holds {held}")
    return directory


def evaluate(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load the classifier, run CEEvaluation over the test split, write results.json + report.md."""
    L.seed_everything(cfg.seed, workers=True)
    out_dir = run_directory(cfg)
    classifier, ckpt = load_classifier(cfg)
    datamodule = instantiate(cfg.data, _convert_="all")
    labels = check_compatible(classifier, datamodule, ckpt)  # the data now comes in the model's labels
    explainers = build_explainers(cfg)
    settings = instantiate(cfg.evaluation, _convert_="all")  # builds evaluation.deletion (an InterventionSpec)
    attack = build_attack_evaluation(cfg, classifier, explainers, labels.model_only)
    if attack is not None:
        datamodule.test_subset = attack.test_images  # the attack study's images: None, the whole test split
        if attack.detection.needs_reference:
            attack.fit_reference(classifier, reference_images(datamodule, attack.reference_images))
    # latent autoencoders (space=autoencoder) are fitted in CEEvaluation.on_test_start, on the device
    cache = autoencoder_cache(classifier, ckpt, cfg.paths.cache_dir, cfg.data)
    source = f"checkpoint {ckpt}" if ckpt is not None else f"model {classifier.hparams.backbone}"
    # the test loop saves its state here and continues from it (resume=DIR or the same hydra.run.dir)
    state = EvaluationState(out_dir / STATE_DIR, run_settings(cfg, ckpt))
    module = CEEvaluation(classifier, explainers, attack=attack, autoencoder_cache=cache,
                          unlabelled_findings=labels.model_only, source=source, state=state, **settings)
    sections = [LocalisationReport(), AttackReport()]
    figures = CEMapLogger(out_dir, sections)
    loggers = instantiate_dict(cfg.get("logger"))
    trainer: L.Trainer = instantiate(
        cfg.trainer, logger=loggers or False, callbacks=[figures, *build_callbacks(cfg)]
    )
    trainer.test(module, datamodule=datamodule)
    # every rank holds the synced results (so sweepers get the metric); rank 0 writes them
    results: dict[str, Any] = {
        "run": {
            "checkpoint": "none" if ckpt is None else str(ckpt),
            "data": datamodule.data_report(),
            "image_size": datamodule.image_size,
            "mask": getattr(explainers.get("ce"), "kind", "none"),
            "backbone": classifier.hparams.backbone,
            "missing_findings": list(getattr(classifier, "missing_findings", ())),
            "labels": labels.report(),  # which of the model's labels the data scores, and the rest
            # what the latent CE intervened through, and how well the autoencoder fits
            **module.autoencoder_fits,
        },
        **module.results,
    }
    for name, error in approx_errors(explainers).items():  # mask.approx: the measured error of the approximate maps
        results["run"].setdefault(name, {})["approx_error"] = error
    if trainer.is_global_zero:
        write_results(out_dir, results)
        write_report(out_dir, results, sections, figures.figures)
        if attack is not None and attack.attack.adaptive and "skipped" not in results["detection"]:
            # after the rest is saved: it takes long
            records = module.artefacts["attack"]["records"]
            results["detection"]["adaptive"] = run_adaptive(module, attack, classifier, datamodule.dataset("test"), records)
            write_results(out_dir, results)
            write_report(out_dir, results, sections, figures.figures)
        state.clear()  # the results are written: a rerun in this directory starts anew
        _print_summary(results, out_dir)
    return results, {"module": module, "trainer": trainer, "datamodule": datamodule, "figures": figures.figures}


def _print_summary(results: dict[str, Any], out_dir: Path) -> None:
    print(f"test mean AUROC: {results['classification']['auroc_mean']:.4f}")
    for method, scores in results.get("localisation", {}).items():
        print(f"pointing game {method:>12}: {scores.get('pointing_game', float('nan')):.3f}")
    if "attack" in results:
        a, d = results["attack"], results["detection"]
        print(f"attack {a['name']} eps={a['eps']}: success rate {a['success_rate']:.3f}, AUROC under attack {a['auroc_mean']:.3f}")
        for name, scores in d.items():
            if isinstance(scores, dict) and "auroc" in scores:  # one entry per detector
                print(
                    f"detection {name:>17}: AUROC {scores['auroc']:.3f} [{scores['auroc_ci_low']:.3f}, "
                    f"{scores['auroc_ci_high']:.3f}], TPR@5%FPR {scores['tpr@5fpr']:.3f}"
                )
        for name, scores in d.get("adaptive", {}).items():
            if isinstance(scores, dict) and "auroc" in scores:
                print(f"adaptive attack, {name:>9}: AUROC {scores['auroc']:.3f}")
        if "evasion" in d.get("adaptive", {}):
            e, before = d["adaptive"]["evasion"], d["adaptive"]["non_adaptive_evasion"]
            print(f"reached the goal unseen by every detector: adaptive {e['all']:.3f} [{e['all_ci_low']:.3f}, "
                  f"{e['all_ci_high']:.3f}], non-adaptive {before['all']:.3f} (n={e['n']})")
    print(f"results: {out_dir / 'results.json'}\nreport:  {out_dir / 'report.md'}")
