"""Training augmentations that move the boxes with the image.

torchvision's v2 transforms already transform ``BoundingBoxes`` together
with the image; this module only converts the project's sample dict (boxes
[K,4] as x, y, w, h with NaN rows) to and from their types.
"""

from __future__ import annotations

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2


class BoxAwareAugment:
    """Random affine (shift, scale, small rotation) and optional horizontal flip.

    Applied to a sample dict; the finding boxes (and a ``spurious_box`` if
    present) and the per-label ``masks`` [K,S,S] follow the image (the same
    draw; masks by nearest neighbour). Boxes pushed partly out of the frame are
    clipped; boxes pushed wholly out become NaN.
    """

    def __init__(
        self,
        translate: float = 0.05,
        scale: tuple[float, float] = (0.95, 1.05),
        degrees: float = 5.0,
        hflip: float = 0.0,
    ):
        steps = [v2.RandomAffine(degrees=degrees, translate=(translate, translate), scale=scale)]
        if hflip > 0:
            steps.append(v2.RandomHorizontalFlip(p=hflip))
        steps.append(v2.ClampBoundingBoxes())
        self.transform = v2.Compose(steps)

    def __call__(self, sample: dict) -> dict:
        image = sample["image"]
        h, w = image.shape[-2:]
        keys = [k for k in ("boxes", "spurious_box") if k in sample]
        stacked = torch.cat([sample[k].reshape(-1, 4) for k in keys]) if keys else torch.zeros(0, 4)
        valid = ~torch.isnan(stacked).any(dim=1)
        boxes = tv_tensors.BoundingBoxes(
            stacked[valid], format="XYWH", canvas_size=(h, w)
        )
        if "masks" in sample:
            out_image, out_boxes, out_masks = self.transform(tv_tensors.Image(image), boxes,
                                                             tv_tensors.Mask(sample["masks"].to(torch.uint8)))
            sample = dict(sample, masks=out_masks.as_subclass(torch.Tensor).bool())
        else:
            out_image, out_boxes = self.transform(tv_tensors.Image(image), boxes)
        moved = torch.full_like(stacked, float("nan"))
        out_boxes = out_boxes.as_subclass(torch.Tensor)
        # A box clamped to zero area has left the image: it is no longer there.
        gone = (out_boxes[:, 2] <= 0) | (out_boxes[:, 3] <= 0)
        out_boxes[gone] = float("nan")
        moved[valid] = out_boxes
        sample = dict(sample, image=out_image.as_subclass(torch.Tensor).clamp_(0, 1))
        start = 0
        for k in keys:
            n = sample[k].reshape(-1, 4).shape[0]
            sample[k] = moved[start : start + n].reshape(sample[k].shape)
            start += n
        return sample


class TransformedDataset(torch.utils.data.Dataset):
    """Applies a sample-dict transform on top of a data set."""

    def __init__(self, dataset: torch.utils.data.Dataset, transform):
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return self.transform(self.dataset[index])


class IndexedDataset(torch.utils.data.Dataset):
    """Adds each item's index in ``dataset`` as ``"index"``, so per-image records can name the
    image by its place in the split (``dataset[index]``) rather than by a hash of its id."""

    def __init__(self, dataset: torch.utils.data.Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return {**self.dataset[index], "index": index}


class EmptyShard(torch.utils.data.Dataset):
    """The test split of a process that gets none of its images (fewer images than processes):
    one placeholder item marked ``padding``. Lightning runs a process's test-epoch hooks, and
    with them the metrics' collective sync, only when it has a batch; the test step skips this one,
    so the process contributes nothing."""

    def __init__(self, dataset: torch.utils.data.Dataset):
        if len(dataset) == 0:  # type: ignore[arg-type]
            raise ValueError("the test split has no images")
        self.dataset = dataset

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> dict:
        return {**self.dataset[0], "padding": True}
