"""Label spaces: the labels a model predicts or a data set annotates, and how two of them align.

A model has its own outputs (torchxrayvision's ``densenet121-res224-all`` has 18, a
CheXpert model 11), a data set its own annotations (NIH's 14, VinDr-CXR's
``Nodule/Mass``). :class:`LabelSpace` holds one such list with the spellings it
accepts; :func:`align` matches a data set's labels to a model's by name, so an
evaluation scores the labels both have and lists the rest. An unknown label is NaN
everywhere (a model output the data does not annotate, an uncertain label left out).

Names match across spaces after :func:`label_key` (case, ``_``/``-``/spaces) and
the field's common respellings in :data:`COMMON_ALIASES`; a space adds its own
``aliases`` and declares ``merges``: one of its labels that stands for several
labels of other spaces (VinDr-CXR's ``Nodule/Mass`` for Nodule and Mass).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

# Respellings of the same finding between NIH, CheXpert, VinDr-CXR, PadChest and
# torchxrayvision (keys and values as label_key writes them)
COMMON_ALIASES: dict[str, str] = {
    "infiltrate": "infiltration",
    "pleural effusion": "effusion",
    "pulmonary fibrosis": "fibrosis",
}


def label_key(name: str) -> str:
    """The spelling-free key of a label name: lower case, ``_``/``-``/runs of spaces as one space."""
    return re.sub(r"[\s_\-]+", " ", str(name)).strip().lower()


@dataclass(frozen=True)
class LabelSpace:
    """An ordered list of label names (a model's outputs or a data set's columns).

    Args:
        names: the labels, in output/column order; unique after :func:`label_key`.
        name: what the space is (``nih14``, ``xrv:densenet121-res224-all``, ...), for messages.
        aliases: other spellings -> a name of ``names`` (``{"Infiltrate": "Infiltration"}``).
        merges: a name of ``names`` -> the labels of other spaces it stands for
            (``{"Nodule/Mass": ("Nodule", "Mass")}``).
    """

    names: tuple[str, ...]
    name: str = "custom"
    aliases: Mapping[str, str] = field(default_factory=dict)
    merges: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", tuple(str(n) for n in self.names))
        object.__setattr__(self, "aliases", {str(k): str(v) for k, v in dict(self.aliases).items()})
        object.__setattr__(self, "merges", {str(k): tuple(str(m) for m in v) for k, v in dict(self.merges).items()})
        if not self.names:
            raise ValueError(f"label space {self.name!r} has no labels")
        keys = [label_key(n) for n in self.names]
        if "" in keys:
            raise ValueError(f"label space {self.name!r}: empty label name in {list(self.names)}")
        doubled = sorted({n for n, k in zip(self.names, keys) if keys.count(k) > 1})
        if doubled:
            raise ValueError(f"label space {self.name!r}: labels {doubled} are the same label spelled twice")
        for what, table in (("aliases", self.aliases.values()), ("merges", self.merges)):
            unknown = sorted(set(table) - set(self.names))
            if unknown:
                raise ValueError(f"label space {self.name!r}: {what} name {unknown}, which are not among its labels")

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __getitem__(self, i: int) -> str:
        return self.names[i]

    def _keys(self) -> dict[str, int]:
        """label_key of every accepted spelling -> index."""
        keys = {label_key(n): i for i, n in enumerate(self.names)}
        for alias, target in self.aliases.items():
            keys.setdefault(label_key(alias), self.names.index(target))
        for alias, target in COMMON_ALIASES.items():
            if target in keys:
                keys.setdefault(alias, keys[target])
            elif alias in keys:
                keys.setdefault(target, keys[alias])
        return keys

    def find(self, name: str) -> int | None:
        """Index of ``name`` (any accepted spelling), None if the space does not hold it."""
        return self._keys().get(label_key(name))

    def index(self, name: str) -> int:
        """Index of ``name``; ValueError naming the space's labels when it holds none such."""
        found = self.find(name)
        if found is None:
            raise ValueError(f"unknown label {name!r} in {self.name}; expected one of {', '.join(self.names)}")
        return found

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.find(name) is not None

    def as_dict(self) -> dict[str, Any]:
        """Plain data (a checkpoint's hyper-parameters, results.json): :meth:`from_value` reads it back."""
        return {"name": self.name, "names": list(self.names), "aliases": dict(self.aliases),
                "merges": {k: list(v) for k, v in self.merges.items()}}

    @classmethod
    def from_value(cls, value: "LabelSpace | Mapping[str, Any] | Sequence[str]", name: str = "custom") -> "LabelSpace":
        """A LabelSpace from itself, its :meth:`as_dict`, or a plain list of names."""
        if isinstance(value, LabelSpace):
            return value
        if isinstance(value, Mapping):
            return cls(tuple(value["names"]), str(value.get("name", name)), dict(value.get("aliases") or {}),
                       {k: tuple(v) for k, v in dict(value.get("merges") or {}).items()})
        if isinstance(value, str) or not isinstance(value, Iterable):
            raise ValueError(f"labels must be a list of names or a label space, got {value!r}")
        return cls(tuple(value), name)


@dataclass(frozen=True)
class LabelAlignment:
    """How a data set's labels (``data``) give ground truth for a model's outputs (``model``).

    ``columns[j]`` holds the data columns that annotate model output j: one for a label
    both have, several when the model's label merges data labels (present when any is),
    none for an output the data does not annotate (its labels are NaN).
    """

    data: LabelSpace
    model: LabelSpace
    columns: tuple[tuple[int, ...], ...]

    @property
    def identity(self) -> bool:
        return self.data.names == self.model.names and all(c == (j,) for j, c in enumerate(self.columns))

    @property
    def scored(self) -> tuple[str, ...]:
        """Model outputs with ground truth in the data."""
        return tuple(m for m, c in zip(self.model.names, self.columns) if c)

    @property
    def model_only(self) -> tuple[str, ...]:
        """Model outputs the data does not annotate (explained, not scored)."""
        return tuple(m for m, c in zip(self.model.names, self.columns) if not c)

    @property
    def data_only(self) -> tuple[str, ...]:
        """Data labels the model does not predict (not scored)."""
        used = {d for c in self.columns for d in c}
        return tuple(d for i, d in enumerate(self.data.names) if i not in used)

    def report(self) -> dict[str, Any]:
        """results.json ``run.labels``."""
        return {"model": self.model.name, "data": self.data.name, "scored": list(self.scored),
                "model_only": list(self.model_only), "data_only": list(self.data_only)}

    def relabel(self, labels: Tensor, boxes: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Data ``labels`` [..., D] (NaN: unknown) and ``boxes`` [..., D, 4] (NaN: none) in the
        model's order: [..., M] and [..., M, 4].

        A merged output is present when any of its data labels is, absent when all are
        known absent, NaN otherwise; it has a box only when exactly one of its data labels
        has one (two boxes do not make one box)."""
        labels = torch.as_tensor(labels)
        shape = labels.shape[:-1]
        out = torch.full((*shape, len(self.model)), float("nan"), dtype=torch.float32)
        box_out = None if boxes is None else torch.full((*shape, len(self.model), 4), float("nan"), dtype=torch.float32)
        for j, cols in enumerate(self.columns):
            if not cols:
                continue
            part = labels[..., list(cols)].float()
            present = (part > 0.5).any(-1)
            known_absent = (~torch.isnan(part)).all(-1) & ~present
            out[..., j] = torch.where(present, 1.0, torch.where(known_absent, 0.0, float("nan")))
            if boxes is not None:
                b = torch.as_tensor(boxes)[..., list(cols), :].float()
                has = ~torch.isnan(b).any(-1)
                one = has.sum(-1) == 1
                pick = has.float().argmax(-1, keepdim=True)[..., None].expand(*shape, 1, 4)
                chosen = b.gather(-2, pick).squeeze(-2)
                box_out[..., j, :] = torch.where(one[..., None], chosen, float("nan"))
        return out, box_out

    def relabel_masks(self, masks: Tensor) -> Tensor:
        """Data ``masks`` [..., D, H, W] (bool) in the model's order [..., M, H, W]: a merged
        output's mask is the union of its data labels' (unlike a box, masks unite); an output
        the data does not annotate has none."""
        masks = torch.as_tensor(masks).bool()
        lead = masks.shape[:-3]
        out = torch.zeros((*lead, len(self.model), *masks.shape[-2:]), dtype=torch.bool)
        for j, cols in enumerate(self.columns):
            if cols:
                out[..., j, :, :] = masks[..., list(cols), :, :].any(-3)
        return out


def align(data: LabelSpace, model: LabelSpace) -> LabelAlignment:
    """Match ``data``'s labels to ``model``'s outputs by name (aliases included), and through
    the merges either side declares (a data label ``Nodule/Mass`` merging Nodule and Mass
    annotates both model outputs; a model output merging Nodule and Mass is annotated by both)."""
    columns: list[tuple[int, ...]] = []
    for j, name in enumerate(model.names):
        exact = data.find(name)
        if exact is not None:
            columns.append((exact,))
            continue
        # a data label that merges this output's label
        merged = [i for i, d in enumerate(data.names) if any(model.find(m) == j for m in data.merges.get(d, ()))]
        if merged:
            columns.append((merged[0],))
            continue
        # this output merges several data labels
        members = [data.find(m) for m in model.merges.get(name, ())]
        columns.append(tuple(i for i in members if i is not None))
    return LabelAlignment(data, model, tuple(columns))


def model_labels(model: Any) -> LabelSpace:
    """A classifier's label space: its ``labels``, else one built from its ``findings`` names."""
    labels = getattr(model, "labels", None)
    if isinstance(labels, LabelSpace):
        return labels
    findings = getattr(model, "findings", None)
    if findings is None:
        raise ValueError(f"{type(model).__name__} declares no labels: give it a `labels` LabelSpace or `findings` names")
    return LabelSpace(tuple(findings), type(model).__name__)
