"""Label spaces: spellings, aliases and merges, the alignment of a data set's labels to a
model's outputs (checked against hand-written expectations), and what a datamodule and a
checkpoint make of them."""

from __future__ import annotations

import math

import pytest
import torch

from causal_ie.data import FINDINGS, NIH14
from causal_ie.labels import LabelSpace, align, label_key, model_labels

nan = math.nan
# torchxrayvision 1.5.7's default 18 pathologies (xrv.datasets.default_pathologies), written out
XRV18 = LabelSpace(
    ("Atelectasis", "Consolidation", "Infiltration", "Pneumothorax", "Edema", "Emphysema", "Fibrosis", "Effusion",
     "Pneumonia", "Pleural_Thickening", "Cardiomegaly", "Nodule", "Mass", "Hernia", "Lung Lesion", "Fracture",
     "Lung Opacity", "Enlarged Cardiomediastinum"),
    "xrv18",
)
# VinDr-CXR's local labels as its train.csv spells them (a subset), with its merged Nodule/Mass
VINDR = LabelSpace(
    ("Aortic enlargement", "Cardiomegaly", "Pleural effusion", "Nodule/Mass", "Pulmonary fibrosis", "Infiltration"),
    "vindr", merges={"Nodule/Mass": ("Nodule", "Mass")},
)


def test_label_keys_ignore_case_underscores_and_dashes():
    assert label_key("Pleural_Thickening") == label_key("pleural thickening") == label_key(" Pleural-Thickening ")
    assert NIH14.find("pleural thickening") == FINDINGS.index("Pleural_Thickening")
    assert NIH14.index("Infiltrate") == FINDINGS.index("Infiltration")  # NIH's own alias
    assert NIH14.find("Pleural Effusion") == FINDINGS.index("Effusion")  # the field's respelling
    assert "Lung Opacity" not in NIH14
    with pytest.raises(ValueError, match=r"unknown label 'Opacity' in nih14; expected one of Atelectasis, "):
        NIH14.index("Opacity")


def test_bad_label_spaces_are_refused_by_name():
    with pytest.raises(ValueError, match=r"labels \['Effusion', 'effusion'\] are the same label spelled twice"):
        LabelSpace(("Effusion", "effusion"), "mine")
    with pytest.raises(ValueError, match="has no labels"):
        LabelSpace((), "mine")
    with pytest.raises(ValueError, match=r"merges name \['Nodule/Mass'\], which are not among its labels"):
        LabelSpace(("Nodule",), "mine", merges={"Nodule/Mass": ("Nodule", "Mass")})
    with pytest.raises(ValueError, match="labels must be a list of names"):
        LabelSpace.from_value("Effusion")


def test_a_label_space_survives_its_plain_form():
    again = LabelSpace.from_value(VINDR.as_dict())
    assert again == VINDR and again.merges == {"Nodule/Mass": ("Nodule", "Mass")}
    assert LabelSpace.from_value(["A", "B"], "two").names == ("A", "B")


def test_nih_data_on_the_18_output_model():
    alignment = align(NIH14, XRV18)
    assert alignment.columns[:14] == tuple((FINDINGS.index(n),) for n in XRV18.names[:14])
    assert alignment.model_only == ("Lung Lesion", "Fracture", "Lung Opacity", "Enlarged Cardiomediastinum")
    assert alignment.data_only == () and len(alignment.scored) == 14
    assert not alignment.identity and align(NIH14, NIH14).identity
    assert alignment.report() == {
        "model": "xrv18", "data": "nih14", "scored": list(XRV18.names[:14]),
        "model_only": ["Lung Lesion", "Fracture", "Lung Opacity", "Enlarged Cardiomediastinum"], "data_only": [],
    }


def test_relabelling_by_hand():
    # VinDr-style data (D=6) for a 4-output model: Effusion (alias), Nodule and Mass (both from
    # the merged Nodule/Mass), Fibrosis (alias), and Fracture, which VinDr's subset lacks
    model = LabelSpace(("Effusion", "Nodule", "Mass", "Fibrosis", "Fracture"), "mine")
    alignment = align(VINDR, model)
    assert alignment.columns == ((2,), (3,), (3,), (4,), ())
    assert alignment.data_only == ("Aortic enlargement", "Cardiomegaly", "Infiltration")
    labels = torch.tensor([[1, 0, 1, 1, 0, 0], [0, 1, 0, 0, nan, 1]], dtype=torch.float32)
    boxes = torch.full((2, 6, 4), nan)
    boxes[0, 2] = torch.tensor([10.0, 20, 30, 40])  # the effusion
    boxes[0, 3] = torch.tensor([1.0, 2, 3, 4])  # the nodule/mass
    out, out_boxes = alignment.relabel(labels, boxes)
    expected = torch.tensor([[1, 1, 1, 0, nan], [0, 0, 0, nan, nan]])
    torch.testing.assert_close(out, expected, equal_nan=True)
    assert out_boxes[0, 0].tolist() == [10, 20, 30, 40]
    assert out_boxes[0, 1].tolist() == out_boxes[0, 2].tolist() == [1, 2, 3, 4]
    assert out_boxes[0, 3:].isnan().all() and out_boxes[1].isnan().all()


def test_a_model_label_merging_two_data_labels():
    # the model predicts "Nodule/Mass"; NIH annotates Nodule and Mass apart
    model = LabelSpace(("Nodule/Mass", "Effusion"), "merged", merges={"Nodule/Mass": ("Nodule", "Mass")})
    alignment = align(NIH14, model)
    nodule, mass, effusion = (FINDINGS.index(n) for n in ("Nodule", "Mass", "Effusion"))
    assert alignment.columns == ((nodule, mass), (effusion,))
    labels = torch.zeros(4, 14)
    boxes = torch.full((4, 14, 4), nan)
    labels[0, nodule] = 1  # one present: present, its box
    boxes[0, nodule] = torch.tensor([5.0, 5, 2, 2])
    labels[1, [nodule, mass]] = 1  # both with boxes: present, no single box
    boxes[1, nodule] = torch.tensor([5.0, 5, 2, 2])
    boxes[1, mass] = torch.tensor([9.0, 9, 2, 2])
    labels[2, mass] = nan  # one unknown, the other absent: unknown
    out, out_boxes = alignment.relabel(labels, boxes)
    torch.testing.assert_close(out[:, 0], torch.tensor([1.0, 1.0, nan, 0.0]), equal_nan=True)
    assert out_boxes[0, 0].tolist() == [5, 5, 2, 2] and out_boxes[1:, 0].isnan().all()


def test_model_labels_of_a_classifier():
    from causal_ie.models import Classifier

    assert model_labels(Classifier(backbone="resnet18")) == NIH14
    mine = Classifier(backbone="resnet18", labels=["Effusion", "Fracture"])
    assert model_labels(mine).names == ("Effusion", "Fracture") and mine.hparams.labels["names"] == ["Effusion", "Fracture"]
    old = Classifier(backbone="resnet18", findings=list(FINDINGS[:3]))  # a checkpoint from before label spaces
    assert model_labels(old).names == FINDINGS[:3]


def test_a_checkpoint_records_its_label_space(tmp_path):
    import lightning as L

    from causal_ie.models import Classifier

    model = Classifier(backbone="resnet18", labels=VINDR)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, max_epochs=0)
    trainer.strategy.connect(model)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    loaded = Classifier.load_from_checkpoint(path, map_location="cpu")
    assert loaded.labels == VINDR and loaded.findings == VINDR.names
    assert loaded.eval()(torch.rand(1, 1, 32, 32)).shape == (1, len(VINDR))


def test_the_datamodule_serves_the_models_labels():
    from causal_ie.data.sources import SyntheticDataModule

    dm = SyntheticDataModule(image_size=32, synthetic={"num_train": 4, "num_val": 2, "num_test": 3}, augment=False)
    raw = dm.dataset("test")[0]
    alignment = dm.align_labels(XRV18)
    assert dm.findings == XRV18.names
    item = dm.dataset("test")[0]
    order = [FINDINGS.index(n) for n in XRV18.names[:14]]
    assert item["labels"].shape == (18,) and item["boxes"].shape == (18, 4)
    torch.testing.assert_close(item["labels"][:14], raw["labels"][order].float())
    assert item["labels"][14:].isnan().all() and item["boxes"][14:].isnan().all()
    torch.testing.assert_close(item["boxes"][:14], raw["boxes"][order].float(), equal_nan=True)
    assert torch.equal(item["image"], raw["image"])
    assert dm.label_matrix("test").shape == (3, 18)
    assert alignment.model_only == ("Lung Lesion", "Fracture", "Lung Opacity", "Enlarged Cardiomediastinum")
    with pytest.raises(ValueError, match=r"the model's labels \(mine: Fracture\) share none with data=synthetic"):
        dm.align_labels(LabelSpace(("Fracture",), "mine"))
