"""Google's radiologist-adjudicated labels of NIH ChestX-ray14 images (Majkowska et al. 2020),
through torchxrayvision's ``NIH_Google_Dataset``.

4,376 NIH images (1,695 patients) re-read by a panel of radiologists for four findings:
``Airspace opacity``, ``Fracture``, ``Nodule or mass`` and ``Pneumothorax`` (``YES``/``NO``),
in Google's two sets (``Set Id``: ``val`` 2,414 images, ``test`` 1,962). torchxrayvision ships
them joined to NIH's metadata (``google2019_nih-chest-xray-labels.csv.gz``; image, patient,
view) and names the labels ``Lung Opacity``, ``Fracture``, ``Nodule/Mass`` and
``Pneumothorax``. The images are the NIH download's PNGs (``images/`` or
``images_0NN/images/``). ``Nodule/Mass`` stands for NIH's Nodule and Mass.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from causal_ie.data.errors import DataError, read_table, require_columns
from causal_ie.data.nih import image_dirs, image_index
from causal_ie.labels import LabelSpace

SHIPPED = "google2019_nih-chest-xray-labels.csv.gz"
COLUMNS = ("Image Index", "Patient ID", "View Position", "Fracture", "Pneumothorax", "Airspace opacity",
           "Nodule or mass", "Set Id")
SETS = ("val", "test")
VIEWS = ("PA", "AP")


def labels_file(path: str | None) -> Path:
    """The labels CSV: ``path``, or the copy torchxrayvision ships."""
    if path is None:
        import torchxrayvision as xrv

        return Path(os.path.dirname(xrv.__file__)) / "data" / SHIPPED
    found = Path(path).expanduser()
    if not found.is_file():
        raise DataError(f"data.labels_file={path}: no such file (leave it null for the copy torchxrayvision ships)")
    return found


def check_table(path: Path) -> None:
    header = read_table(path, "NIH Google labels", nrows=0).columns
    require_columns(path, header, COLUMNS, f"torchxrayvision's NIH Google labels have {', '.join(COLUMNS)}")


def xrv_dataset(root: Path, table: Path, views: list[str]) -> Any:
    import torchxrayvision as xrv

    return xrv.datasets.NIH_Google_Dataset(imgpath=str(root), csvpath=str(table), views=list(views),
                                           unique_patients=False)


def label_space(reader: Any) -> LabelSpace:
    return LabelSpace(tuple(reader.pathologies), "nih_google", merges={"Nodule/Mass": ("Nodule", "Mass")})


def image_paths(root: Path, names: list[str]) -> list[Path]:
    """Each PNG under the NIH folder's ``images/`` or ``images_0NN/images/`` (a name not found:
    its place under ``images/``, reported missing by the reader)."""
    dirs = image_dirs(root)
    if not dirs:
        raise DataError(f"no image folder in {root} (data.root): expected {root / 'images'}/*.png or "
                        f"{root / 'images_001' / 'images'}/*.png (the NIH tarballs unpacked)")
    index = image_index(dirs)
    return [index.get(n, root / "images" / n) for n in names]
