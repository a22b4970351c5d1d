"""A data set served in a model's label space (torchxrayvision's ``relabel_dataset``, per item)."""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset

from causal_ie.labels import LabelAlignment


class RelabelledDataset(Dataset):
    """``dataset``'s items with ``labels`` [D], ``boxes`` [D, 4] and ``masks`` [D, H, W] in the
    model's order ([M], [M, 4], [M, H, W]): NaN labels and boxes for the outputs the data does not annotate, and the
    data's labels the model lacks dropped (``alignment.data_only``)."""

    def __init__(self, dataset: Dataset, alignment: LabelAlignment):
        self.dataset = dataset
        self.alignment = alignment

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.dataset[index])
        item["labels"], item["boxes"] = self.alignment.relabel(item["labels"], item.get("boxes"))
        if item["boxes"] is None:
            del item["boxes"]
        if "masks" in item:
            item["masks"] = self.alignment.relabel_masks(item["masks"])
        return item
