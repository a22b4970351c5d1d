"""The 14 ChestX-ray14 findings, in the CheXNet / NIH order: the label space of NIH,
SyntheticCXR and ChestMNIST (:data:`NIH14`). A model or another data set brings its own
:class:`~causal_ie.labels.LabelSpace`."""

from causal_ie.labels import LabelSpace

FINDINGS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
NUM_FINDINGS = len(FINDINGS)

# Spellings found in the NIH files that differ from FINDINGS.
ALIASES = {"Infiltrate": "Infiltration", "Pleural Thickening": "Pleural_Thickening"}

NIH14 = LabelSpace(FINDINGS, "nih14", ALIASES)


def finding_index(name: str) -> int:
    """Index of a finding in FINDINGS; accepts the NIH aliases.

    Raises ValueError naming the valid findings when ``name`` is unknown.
    """
    canonical = ALIASES.get(name, name)
    try:
        return FINDINGS.index(canonical)
    except ValueError:
        raise ValueError(
            f"unknown finding {name!r}; expected one of {', '.join(FINDINGS)}"
        ) from None
