"""CEEvaluation: CE maps and CAMs on the test split, scored against the lesion boxes."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from causal_ie import validators
from causal_ie.attacks.evaluation import AttackEvaluation
from causal_ie.explain.explainers import Explainer, LatentCE, select_maps
from causal_ie.explain.intervals import classification_intervals, localisation_intervals
from causal_ie.explain.metrics import DEFAULT_THRESHOLDS, DeletionInsertion, localisation_metrics
from causal_ie.interventions import InterventionSpec, resolve_layer
from causal_ie.interventions.autoencoder import AutoencoderCache, cache_path
from causal_ie.io import atomic_open
from causal_ie.lightning.resume import (
    EvaluationState,
    EvaluationStopped,
    StopSignals,
    forward_to_children,
    load_metric_states,
    metric_states,
    pad_empty_states,
    rng_state,
    set_rng_state,
)
from causal_ie.models import Classifier
from causal_ie.models.findings import finding_aurocs, predicted_mask
from causal_ie.precision import full_precision
from causal_ie.rows import Rows, patient_codes
from causal_ie.models.auroc import auroc_targets, label_auroc

log = logging.getLogger(__name__)


def ground_truth(batch: dict) -> torch.Tensor:
    """The batch's lesion ground truth: ``masks`` [B, K, H, W] where the source has pixels
    (VinDr-CXR's readers, segmentations), else ``boxes`` [B, K, 4]."""
    return batch["masks"] if "masks" in batch else batch["boxes"]


def box_pairs(
    labels: torch.Tensor, truth: torch.Tensor, predicted: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(image index, finding index) of every present finding that has ground truth, a box
    (``truth`` [B, K, 4], NaN: none) or a non-empty mask ([B, K, H, W]), and that the classifier
    predicts (``predicted`` [K] bool)."""
    has = truth.flatten(2).any(dim=-1) if truth.ndim == 4 else ~torch.isnan(truth).any(dim=-1)
    keep = (labels > 0.5) & has
    if predicted is not None:
        keep &= predicted.to(keep.device)
    return torch.nonzero(keep, as_tuple=True)


def fit_autoencoders(
    explainers: Mapping[str, Explainer],
    classifier: nn.Module,
    train_images: Callable[[], Iterable[Tensor]],
    cache: AutoencoderCache | None,
    strategy: Any = None,
) -> dict[str, dict[str, Any]]:
    """Fit (or load from ``cache``) the autoencoder of every latent explainer with
    ``space=autoencoder``, on the classifier's device and in its dtype; returns each one's
    ``{"space", "reconstruction_l1", "activation_l1"}`` (the run block of results.json).

    ``train_images()`` gives a fresh pass over the training images. With a Lightning
    ``strategy`` of several processes, only global rank 0 fits (or loads) and writes the
    cache; the weights then go to every process by ``strategy.broadcast``, which the others
    store at the same cache path (unless it already holds them: a shared file system) and
    load from there, so all processes explain with rank 0's autoencoder, bit for bit.
    """
    fitting = {n: e for n, e in explainers.items() if isinstance(e, LatentCE) and e.space == "autoencoder"}
    if not fitting:
        return {}
    if cache is None:
        raise ValueError(
            f"explainers {sorted(fitting)} intervene through an autoencoder: CEEvaluation needs "
            "autoencoder_cache=AutoencoderCache(directory, key) to fit it (evaluate.py passes paths.cache_dir)"
        )
    distributed = strategy is not None and int(getattr(strategy, "world_size", 1)) > 1
    rank_zero = not distributed or bool(strategy.is_global_zero)
    states: dict[str, dict[str, Tensor]] | None = {}
    if rank_zero:
        for name, explainer in fitting.items():
            space = explainer.fit_autoencoder(classifier, train_images, cache.directory, cache.key)
            states[name] = {k: v.detach().cpu() for k, v in space.autoencoder.state_dict().items()}
    if distributed:
        states = strategy.broadcast(states, src=0)
        if not rank_zero:
            for name, explainer in fitting.items():
                path = cache_path(cache.directory, cache.key, resolve_layer(classifier, explainer.layer), explainer.autoencoder)
                if not _holds(path, states[name]):
                    with atomic_open(path, "wb") as f:
                        torch.save(states[name], f)
                explainer.fit_autoencoder(classifier, _rank_zero_fits(path), cache.directory, cache.key)
    assert states is not None
    return {
        name: {
            "space": "autoencoder",
            "reconstruction_l1": float(states[name]["reconstruction_l1"]),
            "activation_l1": float(states[name]["activation_l1"]),
        }
        for name in fitting
    }


def _holds(path, state: Mapping[str, Tensor]) -> bool:
    """Whether ``path`` already holds exactly ``state`` (e.g. rank 0 wrote it on a shared file system)."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # missing or unreadable: write it
        return False
    return saved.keys() == state.keys() and all(
        saved[k].dtype == v.dtype and torch.equal(saved[k], v) for k, v in state.items()
    )


def _rank_zero_fits(path) -> Callable[[], Iterator[Tensor]]:
    """Training batches for a process other than rank 0: it must load, never train."""

    def fail() -> Iterator[Tensor]:
        raise RuntimeError(f"this process could not load the autoencoder that global rank 0 fitted ({path})")

    return fail


class CEEvaluation(L.LightningModule):
    """Runs in ``Trainer.test``: classification AUROC, and for every finding with a
    box, each explainer's map scored by localisation (pointing game, IoBB/IoU,
    energy pointing game) and faithfulness (deletion/insertion AUC).

    Metrics are torchmetrics, so under DDP each process scores its shard and
    ``compute`` syncs them: the numbers equal a single-process run. After the
    test epoch, ``results`` holds the nested results (keys in
    :mod:`causal_ie.outputs.schema`) and ``artefacts`` what the report sections draw:
    ``localisation.examples``, a few (image, box, maps) per finding, and with an
    attack the attack study's ``attack`` artefacts.

    With ``state`` (an :class:`~causal_ie.lightning.resume.EvaluationState`) the test loop
    is resumable: every ``checkpoint_every`` batches, or when ``checkpoint_minutes`` have
    passed since the last save, and on SIGTERM, SIGINT or SIGUSR1, each process saves what it
    has accumulated; a signal then stops the run (:class:`~causal_ie.lightning.resume.EvaluationStopped`).
    A run that finds a saved state continues after its last saved batch.
    """

    def __init__(
        self,
        classifier: Classifier,
        explainers: Mapping[str, Explainer],
        thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
        deletion_steps: int = 10,
        deletion: InterventionSpec | None = None,
        faithfulness: bool = True,
        examples_per_finding: int = 2,
        attack: AttackEvaluation | None = None,
        autoencoder_cache: AutoencoderCache | None = None,
        n_boot: int = 2000,
        seed: int = 0,
        unlabelled_findings: Sequence[str] = (),
        source: str = "the classifier",
        state: EvaluationState | None = None,
        checkpoint_every: int | None = 10,
        checkpoint_minutes: float = 5.0,
    ):
        super().__init__()
        self.source = source  # for messages: "checkpoint outputs/.../best.ckpt"
        if not explainers:
            raise ValueError("CEEvaluation needs at least one explainer (mask= and/or cams=)")
        self.classifier = classifier.eval()
        for p in self.classifier.parameters():
            p.requires_grad_(False)
        self.findings = tuple(classifier.findings)
        self.predicted = predicted_mask(classifier)  # findings a pretrained model lacks are not scored
        # nor are the model's outputs that the data does not annotate (their labels are NaN):
        # they are explained and attacked, and listed in results.json run.labels
        self.scored = self.predicted & torch.tensor([f not in unlabelled_findings for f in self.findings])
        self.explainers = dict(explainers)
        self.thresholds = tuple(thresholds)
        self.auroc = label_auroc(len(self.findings))
        self.localisation = nn.ModuleDict(
            {name: localisation_metrics(self.thresholds) for name in self.explainers}
        )
        self.faithfulness = nn.ModuleDict(
            {
                name: DeletionInsertion(self.classifier, n_steps=deletion_steps, intervention=deletion)
                for name in self.explainers
            }
            if faithfulness
            else {}
        )
        self.examples_per_finding = examples_per_finding
        self.attack = attack
        # per-image and per-pair values (with their patients) for the 95 % intervals
        self.n_boot, self.seed = int(n_boot), int(seed)
        self.image_rows = Rows()
        self.pair_rows = Rows()
        self.examples: list[dict[str, Any]] = []
        self.results: dict[str, Any] = {}
        self.artefacts: dict[str, dict[str, Any]] = {}
        self._pairs_seen = torch.zeros((), dtype=torch.long)
        self._images_seen = torch.zeros((), dtype=torch.long)
        # latent explainers with space=autoencoder are fitted in on_test_start; what they report
        self.autoencoder_cache = autoencoder_cache
        self.autoencoder_fits: dict[str, dict[str, Any]] = {}
        # resumable test loop (causal_ie.lightning.resume)
        self.state = state if checkpoint_every is not None else None  # null: not resumable
        self.checkpoint_every = 0 if checkpoint_every is None else validators.count("evaluation.checkpoint_every",
                                                                                      checkpoint_every)
        self.checkpoint_minutes = validators.number("evaluation.checkpoint_minutes", checkpoint_minutes, 0.0)
        self.signals: StopSignals | None = None
        self.resumed_batches = 0  # batches a saved state had already seen (skipped)
        self.state_saves: list[float] = []  # seconds each save took
        self._resumed_rng: dict[str, Any] | None = None
        self._batches_done = 0
        self._last_save = 0.0

    def on_test_start(self) -> None:
        """Fit (or load) the latent explainers' autoencoders (:func:`fit_autoencoders`) now that
        Lightning has put the classifier on its device: the training runs there, not on the CPU
        before ``trainer.test``. Under DDP rank 0 fits and the others get its weights."""
        strategy = self.trainer.strategy if self.trainer.world_size > 1 else None
        self.autoencoder_fits = fit_autoencoders(
            self.explainers, self.classifier, self._train_images, self.autoencoder_cache, strategy
        )
        if self.state is not None:
            launcher = self.trainer.strategy.launcher if self.trainer.is_global_zero else None
            self.signals = StopSignals(forward_to_children(launcher))
            self.signals.install()

    def on_test_end(self) -> None:
        if self.signals is not None:
            self.signals.restore()
            self.signals = None

    def _train_images(self) -> Iterator[Tensor]:
        """One pass over the datamodule's training images (the autoencoder's training data)."""
        datamodule = self.trainer.datamodule
        if datamodule is None:
            raise RuntimeError("the latent autoencoder trains on the training images: pass datamodule= to trainer.test")
        datamodule.setup("fit")
        return (batch["image"] for batch in datamodule.train_dataloader())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)

    def on_test_epoch_start(self) -> None:
        self.examples = []
        self._pairs_seen = torch.zeros((), dtype=torch.long, device=self.device)
        self._images_seen = torch.zeros((), dtype=torch.long, device=self.device)
        self.resumed_batches, self._resumed_rng, self._batches_done = 0, None, 0
        self._last_save = time.monotonic()
        if self.state is not None:
            saved = self.state.load(self.global_rank, self.trainer.world_size)
            if saved is not None:
                self._load_loop_state(saved)

    # -- resumable test loop ----------------------------------------------------------------
    def loop_state(self) -> dict[str, Any]:
        """What the test loop has accumulated so far on this process (see :meth:`_load_loop_state`)."""
        return {
            "metrics": metric_states(self, skip=[self.classifier]),
            "examples": self.examples,
            "pairs_seen": int(self._pairs_seen),
            "images_seen": int(self._images_seen),
            "attack": None if self.attack is None else self.attack.loop_state(),
            "rng": rng_state(),
        }

    def _load_loop_state(self, saved: Mapping[str, Any]) -> None:
        load_metric_states(self, saved["metrics"], self.device, skip=[self.classifier])
        self.examples = list(saved["examples"])
        self._pairs_seen.fill_(int(saved["pairs_seen"]))
        self._images_seen.fill_(int(saved["images_seen"]))
        if self.attack is not None:
            self.attack.load_loop_state(saved["attack"])
        self.resumed_batches = self._batches_done = int(saved["batches"])
        self._resumed_rng = saved["rng"]  # restored when the first unseen batch starts
        log.info("resuming the evaluation from %s: %d test batch(es) of process %d already done",
                 self.state.directory, self.resumed_batches, self.global_rank)

    def save_state(self, complete: bool = False) -> None:
        """Save this process's test-loop state now (atomically)."""
        assert self.state is not None
        seconds = self.state.save(self.global_rank, self.trainer.world_size, self._batches_done, complete,
                                  self.loop_state())
        self.state_saves.append(seconds)
        self._last_save = time.monotonic()

    def on_test_batch_start(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._resumed_rng is not None and batch_idx == self.resumed_batches:
            set_rng_state(self._resumed_rng)  # the streams as they were after the last saved batch
            self._resumed_rng = None

    def on_test_batch_end(self, outputs: Any, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.state is None or batch_idx < self.resumed_batches:
            return
        self._batches_done = batch_idx + 1
        stop = self.signals is not None and self.signals.received is not None
        due = (self._batches_done - self.resumed_batches) % self.checkpoint_every == 0
        late = time.monotonic() - self._last_save >= 60.0 * self.checkpoint_minutes
        if stop or due or late:
            self.save_state()
        if stop:
            assert self.signals is not None and self.signals.at is not None
            if self.trainer.is_global_zero and self.trainer.world_size > 1:
                # Lightning kills the other processes when this one raises: let them save first
                late_ranks = self.state.wait_for(range(1, self.trainer.world_size), self.signals.at, timeout=60.0)
                if late_ranks:
                    log.warning("process(es) %s did not save within 60 s: they resume from their last save", late_ranks)
            raise EvaluationStopped(self.signals.received, self.state.directory, self._batches_done)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        if batch_idx < self.resumed_batches:
            return  # seen before the run was stopped: its contribution is in the restored state
        if "padding" in batch:
            return  # the placeholder of a process with no test images (EmptyShard)
        images, labels, truth = batch["image"], batch["labels"], ground_truth(batch)
        # measurements are float32 under *-mixed too (causal_ie.precision); CE maps: the explainers
        with torch.no_grad(), full_precision(self.device):
            logits = self.classifier(images)
        self._check_finite(batch, images, logits)
        probs = logits.sigmoid()
        # unknown labels (NaN) are left out of each finding's AUROC and of its interval
        self.auroc.update(probs.nan_to_num(0.0), auroc_targets(labels))
        self._images_seen += images.shape[0]
        patients = patient_codes(batch, images.device)
        self.image_rows.update(torch.cat([patients[:, None], probs.nan_to_num(0.0).double(), labels.double()], 1))
        img_idx, finding_idx = box_pairs(labels, truth, self.predicted)
        # the attack study needs every finding's clean CE map; the box pairs are a selection of them
        clean_maps = {}
        if self.attack is not None:
            clean_maps = {n: self.explainers[n].all_findings(self.classifier, images) for n in self.attack.explainers}
            self.attack.update(self.classifier, batch, clean_maps, clean_probs=probs)
        if img_idx.numel() == 0:
            return
        self._pairs_seen += img_idx.numel()
        pair_boxes = truth[img_idx, finding_idx]  # boxes [P, 4] or masks [P, H, W]: the metrics take both
        maps = {}
        per_pair = [patients[img_idx]]
        for name, explainer in self.explainers.items():
            if name in clean_maps:
                maps[name] = select_maps(clean_maps[name], img_idx, finding_idx).detach()
            else:
                maps[name] = explainer(self.classifier, images, img_idx, finding_idx).detach()
            self.localisation[name].update(maps[name], pair_boxes)
            metrics = self.localisation[name]
            iou, iobb = metrics["box"].pair_overlaps(maps[name], pair_boxes)
            per_pair += [metrics["pointing_game"].pair_hits(maps[name], pair_boxes), iou.to(images.device), iobb.to(images.device)]
            if name in self.faithfulness:
                self.faithfulness[name].update(images[img_idx], maps[name], finding_idx)
        self.pair_rows.update(torch.stack([v.double().to(images.device) for v in per_pair], 1))
        self._keep_examples(batch, probs, img_idx, finding_idx, maps)

    def _check_finite(self, batch: dict, images: torch.Tensor, logits: torch.Tensor) -> None:
        """NaN or Inf pixels, or logits of findings the model claims to predict, would turn into
        chance-level numbers in results.json: stop with the images and findings they hit."""
        ids = batch.get("id")
        bad_pixels = ~torch.isfinite(images.flatten(1)).all(dim=1)
        if bool(bad_pixels.any()):
            rows = bad_pixels.nonzero().flatten().tolist()
            named = [str(ids[i]) for i in rows[:5]] if ids is not None else rows[:5]
            raise ValueError(f"{len(rows)} test image(s) hold NaN or Inf pixels (e.g. {', '.join(map(str, named))}): "
                             "check the data files and data.* settings")
        claimed = self.predicted.to(logits.device)
        bad = ~torch.isfinite(logits) & claimed
        if bool(bad.any()):
            findings = [f for f, hit in zip(self.findings, bad.any(dim=0).tolist()) if hit]
            raise ValueError(
                f"{self.source} returns NaN or Inf logits for {', '.join(findings)} on "
                f"{int(bad.any(dim=1).sum())} of {logits.shape[0]} images of this batch (e.g. its weights are NaN): "
                "nothing is scored from it"
            )

    def _keep_examples(self, batch, probs, img_idx, finding_idx, maps) -> None:
        if not self.trainer.is_global_zero:
            return
        counts: dict[str, int] = {}
        for ex in self.examples:
            counts[ex["finding"]] = counts.get(ex["finding"], 0) + 1
        for p, (i, k) in enumerate(zip(img_idx.tolist(), finding_idx.tolist())):
            name = self.findings[k]
            if counts.get(name, 0) >= self.examples_per_finding:
                continue
            counts[name] = counts.get(name, 0) + 1
            self.examples.append(
                {
                    "id": batch["id"][i],
                    "finding": name,
                    "prob": float(probs[i, k]),
                    "image": batch["image"][i, 0].float().cpu().numpy(),
                    "box": batch["boxes"][i, k].cpu().tolist(),
                    **({"mask": batch["masks"][i, k].cpu().numpy()} if "masks" in batch else {}),
                    "maps": {m: v[p].float().cpu().numpy() for m, v in maps.items()},
                }
            )

    def on_test_epoch_end(self) -> None:
        if self.state is not None:  # a stop from here on repeats no batch
            self.save_state(complete=True)
            log.info("evaluation state: %d save(s) of process %d took %.3f s in all", len(self.state_saves),
                     self.global_rank, sum(self.state_saves))
        pad_empty_states(self, skip=[self.classifier])  # a process without images syncs empty states
        auroc_mean, per_finding = finding_aurocs(self.auroc.compute(), self.scored)
        self.auroc.reset()
        results: dict[str, Any] = {
            "classification": {
                "auroc_mean": auroc_mean,
                "auroc": dict(zip(self.findings, per_finding)),
            },
            "localisation": {},
            "faithfulness": {},
        }
        counts = torch.stack([self._pairs_seen, self._images_seen])
        if self.trainer.world_size > 1:
            counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        results["localisation_pairs"] = int(counts[0])
        results["classification"]["num_images"] = int(counts[1])
        for name in self.explainers:
            loc = self.localisation[name]
            results["localisation"][name] = {k: float(v) for k, v in loc.compute().items()}
            loc.reset()
            if name in self.faithfulness:
                faith = self.faithfulness[name]
                results["faithfulness"][name] = {k: float(v) for k, v in faith.compute().items()}
                faith.reset()
        self._add_intervals(results)
        self.artefacts = {"localisation": {"examples": self.examples}}
        if self.attack is not None:
            attack_results, self.artefacts["attack"] = self.attack.compute()
            results.update(attack_results)
        self.results = results
        ce = results["localisation"].get("ce", {})
        if "pointing_game" in ce:
            self.log("test/ce_pointing_game", ce["pointing_game"], rank_zero_only=True)
        self.log("test/auroc_mean", results["classification"]["auroc_mean"], rank_zero_only=True)
        if self.attack is not None:
            self.log("test/attack_success_rate", results["attack"]["success_rate"], rank_zero_only=True)
            for name, scores in results["detection"].items():  # every selected detector's AUROC
                if isinstance(scores, dict) and "auroc" in scores:
                    self.log(f"test/detection_{name}_auroc", scores["auroc"], rank_zero_only=True)

    def _add_intervals(self, results: dict[str, Any]) -> None:
        """95 % patient-bootstrap intervals beside the AUROCs, pointing games and IoBB/IoU
        accuracies, and each CE method's differences to the other methods."""
        images = self.image_rows.compute().cpu().numpy()
        pairs = self.pair_rows.compute().cpu().numpy()
        self.image_rows.reset()
        self.pair_rows.reset()
        k = len(self.findings)
        if len(images):
            groups = [str(int(g)) for g in images[:, 0]]
            bounds = classification_intervals(
                images[:, 1 : 1 + k], images[:, 1 + k :], groups, self.scored.numpy(), self.findings,
                self.n_boot, self.seed,
            )
            per_finding = bounds.pop("auroc")
            results["classification"].update(bounds)
            results["classification"]["auroc"].update(per_finding)
        if len(pairs) and len({int(g) for g in pairs[:, 0]}) >= 1:
            groups = [str(int(g)) for g in pairs[:, 0]]
            per_method = {
                name: {"hit": pairs[:, 1 + 3 * i], "iou": pairs[:, 2 + 3 * i], "iobb": pairs[:, 3 + 3 * i]}
                for i, name in enumerate(self.explainers)
            }
            for name, bounds in localisation_intervals(per_method, groups, self.thresholds, self.n_boot, self.seed).items():
                results["localisation"][name].update(bounds)
