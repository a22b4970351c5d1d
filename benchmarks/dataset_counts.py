"""Counts of the radiologists' ground truth as read from the real metadata torchxrayvision ships
(its package data/ folder), for the README's data-set sections.

    python benchmarks/dataset_counts.py

VinDr-CXR (``vinbigdata-train.csv.gz``, the Kaggle training set): images, readers, annotation
rows, and per label the boxes and the images with at least one box (any reader) and with a box
of at least 2 readers (``data.readers=majority`` can only mark those). SIIM-ACR
(``siim-pneumothorax-train-rle.csv.gz``): rows, images, images with a mask, components. RSNA
Pneumonia (``kaggle_stage_2_train_labels.csv.zip`` and the DICOM headers table): rows, images,
boxes, images by number of boxes, per view. CheXpert (``chexpert_train.csv.gz``): images, patients,
views, and per label the positive, negative, uncertain (-1) and blank entries of the frontal
images. NIH Google (``google2019_nih-chest-xray-labels.csv.gz``): images and patients per set,
views, positives per label, and how many of its images NIH's boxes cover. Written to
benchmarks/results/dataset_counts.json and .md (atomically).
"""

from __future__ import annotations

import gzip
import json
import os
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from causal_ie.io import atomic_write_text  # noqa: E402
from causal_ie.outputs.tables import markdown_table  # noqa: E402


def xrv_file(name: str) -> str:
    import torchxrayvision as xrv

    return os.path.join(os.path.dirname(xrv.__file__), "data", name)


def vindr_counts() -> dict:
    with gzip.open(xrv_file("vinbigdata-train.csv.gz"), "rt") as f:
        rows = pd.read_csv(f)
    boxes = rows[rows["class_name"] != "No finding"]
    readers = boxes.groupby(["class_name", "image_id"])["rad_id"].nunique()
    per_label = {}
    for name, of_label in boxes.groupby("class_name"):
        per_label[name] = {
            "boxes": int(len(of_label)),
            "images": int(of_label["image_id"].nunique()),
            "images_2_readers": int((readers.loc[name] >= 2).sum()),
        }
    return {
        "file": "vinbigdata-train.csv.gz",
        "rows": int(len(rows)),
        "images": int(rows["image_id"].nunique()),
        "images_no_finding_only": int(rows.groupby("image_id")["class_name"].agg(lambda c: (c == "No finding").all()).sum()),
        "readers": int(rows["rad_id"].nunique()),
        "readers_per_image": {str(k): int(v) for k, v in rows.groupby("image_id")["rad_id"].nunique().value_counts().items()},
        "boxes": int(len(boxes)),
        "per_label": dict(sorted(per_label.items(), key=lambda kv: -kv[1]["boxes"])),
    }


def siim_counts() -> dict:
    with gzip.open(xrv_file("siim-pneumothorax-train-rle.csv.gz"), "rt") as f:
        rows = pd.read_csv(f, dtype=str)
    positive = rows[rows[" EncodedPixels"].str.strip() != "-1"]
    per_image = positive.groupby("ImageId").size()
    return {
        "file": "siim-pneumothorax-train-rle.csv.gz",
        "rows": int(len(rows)),
        "images": int(rows["ImageId"].nunique()),
        "images_with_pneumothorax": int(per_image.size),
        "components": int(len(positive)),
        "images_by_components": {str(k): int(v) for k, v in per_image.value_counts().sort_index().items()},
    }


def rsna_counts() -> dict:
    rows = pd.read_csv(xrv_file("kaggle_stage_2_train_labels.csv.zip"))
    views = pd.read_csv(xrv_file("kaggle_stage_2_train_images_dicom_headers.csv.gz"),
                        index_col="PatientID")["ViewPosition"]
    boxes = rows[rows["Target"] == 1]
    images = rows.drop_duplicates("patientId").set_index("patientId")
    per_view = {}
    for view, of_view in images.join(views, how="left").groupby("ViewPosition"):
        per_view[str(view)] = {"images": int(len(of_view)), "with_boxes": int((of_view["Target"] == 1).sum()),
                               "boxes": int(boxes["patientId"].isin(of_view.index).sum())}
    return {
        "file": "kaggle_stage_2_train_labels.csv.zip",
        "rows": int(len(rows)),
        "images": int(len(images)),
        "images_with_boxes": int(boxes["patientId"].nunique()),
        "boxes": int(len(boxes)),
        "images_by_boxes": {str(k): int(v) for k, v in boxes.groupby("patientId").size().value_counts().sort_index().items()},
        "per_view": per_view,
    }


def chexpert_counts() -> dict:
    rows = pd.read_csv(xrv_file("chexpert_train.csv.gz"))
    view = rows["AP/PA"].where(rows["Frontal/Lateral"] == "Frontal", "L")
    frontal = rows[view.isin(["PA", "AP"])]
    per_label = {}
    for name in rows.columns[6:]:
        values = frontal[name]
        per_label[name] = {"positive": int((values == 1).sum()), "negative": int((values == 0).sum()),
                           "uncertain": int((values == -1).sum()), "blank": int(values.isna().sum())}
    return {
        "file": "chexpert_train.csv.gz",
        "images": int(len(rows)),
        "patients": int(rows["Path"].str.extract(r"(patient\d+)", expand=False).nunique()),
        "views": {str(k): int(v) for k, v in view.value_counts().items()},
        "frontal_images": int(len(frontal)),
        "per_label_frontal": per_label,
    }


def nih_google_counts() -> dict:
    rows = pd.read_csv(xrv_file("google2019_nih-chest-xray-labels.csv.gz"))
    boxes = pd.read_csv(xrv_file("BBox_List_2017.csv.gz"))
    boxed = boxes[boxes["Image Index"].isin(rows["Image Index"])]
    findings = ["Airspace opacity", "Fracture", "Nodule or mass", "Pneumothorax"]
    return {
        "file": "google2019_nih-chest-xray-labels.csv.gz",
        "images": int(len(rows)),
        "patients": int(rows["Patient ID"].nunique()),
        "sets": {s: {"images": int(len(g)), "patients": int(g["Patient ID"].nunique()),
                     **{f: int((g[f] == "YES").sum()) for f in findings}} for s, g in rows.groupby("Set Id")},
        "views": {str(k): int(v) for k, v in rows["View Position"].value_counts().items()},
        "images_with_nih_boxes": int(boxed["Image Index"].nunique()),
    }


def main() -> None:
    counts = {"vindr": vindr_counts(), "siim": siim_counts(), "rsna": rsna_counts(), "chexpert": chexpert_counts(),
              "nih_google": nih_google_counts()}
    out = ROOT / "benchmarks" / "results"
    atomic_write_text(out / "dataset_counts.json", json.dumps(counts, indent=2) + "\n")
    v = counts["vindr"]
    table = markdown_table(["label", "boxes", "images with a box", "images with boxes of >= 2 readers"],
                           [[k, c["boxes"], c["images"], c["images_2_readers"]] for k, c in v["per_label"].items()])
    md = (f"# Ground truth in the real metadata torchxrayvision ships\n\n## VinDr-CXR ({v['file']})\n\n"
          f"{v['rows']} rows, {v['images']} images ({v['images_no_finding_only']} with only 'No finding'), "
          f"{v['readers']} readers, readers per image {v['readers_per_image']}, {v['boxes']} boxes.\n\n{table}\n")
    s = counts["siim"]
    md += (f"\n## SIIM-ACR Pneumothorax ({s['file']})\n\n{s['rows']} rows, {s['images']} images, "
           f"{s['images_with_pneumothorax']} with a pneumothorax mask of {s['components']} components in all; "
           f"images by number of components {s['images_by_components']}.\n")
    r = counts["rsna"]
    md += (f"\n## RSNA Pneumonia ({r['file']})\n\n{r['rows']} rows, {r['images']} images, {r['images_with_boxes']} "
           f"with an opacity box, {r['boxes']} boxes; images by number of boxes {r['images_by_boxes']}.\n\n"
           + markdown_table(["view", "images", "images with a box", "boxes"],
                            [[v, c["images"], c["with_boxes"], c["boxes"]] for v, c in r["per_view"].items()]) + "\n")
    c = counts["chexpert"]
    md += (f"\n## CheXpert ({c['file']}, the training set)\n\n{c['images']} images of {c['patients']} patients; views "
           f"{c['views']}. Label entries of the {c['frontal_images']} frontal images as the CSV holds them, before "
           "a No Finding image's labels are set to 0 (uncertain: -1; blank: not mentioned, read as negative):\n\n"
           + markdown_table(["label", "positive", "negative", "uncertain", "blank"],
                            [[k, v["positive"], v["negative"], v["uncertain"], v["blank"]]
                             for k, v in c["per_label_frontal"].items()]) + "\n")
    g = counts["nih_google"]
    md += (f"\n## NIH Google labels ({g['file']})\n\n{g['images']} images of {g['patients']} patients; views "
           f"{g['views']}; {g['images_with_nih_boxes']} of them have an NIH box.\n\n"
           + markdown_table(["set", "images", "patients", "Airspace opacity", "Fracture", "Nodule or mass",
                             "Pneumothorax"],
                            [[k, v["images"], v["patients"], v["Airspace opacity"], v["Fracture"],
                              v["Nodule or mass"], v["Pneumothorax"]] for k, v in g["sets"].items()]) + "\n")
    atomic_write_text(out / "dataset_counts.md", md)
    print(md)


if __name__ == "__main__":
    main()
