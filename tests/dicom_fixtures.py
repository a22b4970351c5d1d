"""DICOM files as scanners write them, written with pydicom: a DX/CR radiograph's header
(SOP class, photometric interpretation, 12 of 16 bits stored, rescale, window), explicit
VR little endian, the 128-byte preamble and ``DICM`` marker."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
CR = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage


def write_dicom(
    path: str | Path,
    stored: np.ndarray,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    signed: bool = False,
    slope: float | None = None,
    intercept: float | None = None,
    window: tuple[float, float] | None = None,
    sop_class: str = DX_FOR_PRESENTATION,
    jpeg: bool = False,
    header: dict | None = None,
) -> Path:
    """Write ``stored`` (the raw stored values, [rows, columns]) as a 16-bit-allocated DICOM, or
    with ``jpeg`` as an 8-bit JPEG baseline one (RSNA's files are); ``header`` sets more elements
    by keyword (``PatientID``, ``ViewPosition``)."""
    path = Path(path)
    stored = np.asarray(stored)
    lo, hi = (-(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1) if signed else (0, 2**bits_stored - 1)
    if stored.min() < lo or stored.max() > hi:
        raise ValueError(f"stored values {stored.min()}..{stored.max()} do not fit {bits_stored} bits")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = generate_uid()
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "DX" if sop_class == DX_FOR_PRESENTATION else "CR"
    ds.PatientID = "fixture"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(signed)
    ds.PixelSpacing = [0.139, 0.139]
    if slope is not None or intercept is not None:
        ds.RescaleSlope = f"{1.0 if slope is None else slope:g}"
        ds.RescaleIntercept = f"{0.0 if intercept is None else intercept:g}"
        ds.RescaleType = "US"
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = f"{window[0]:g}", f"{window[1]:g}"
        ds.VOILUTFunction = "LINEAR"
    for keyword, value in (header or {}).items():
        setattr(ds, keyword, value)
    if jpeg:
        if bits_stored != 8 or signed:
            raise ValueError("a JPEG baseline DICOM stores unsigned 8-bit pixels")
        encoded = io.BytesIO()
        Image.fromarray(stored.astype(np.uint8)).save(encoded, format="JPEG", quality=95)
        meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.BitsAllocated = 8
        ds.PixelData = encapsulate([encoded.getvalue()])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True  # encapsulated fragments
    else:
        ds.PixelData = stored.astype("<i2" if signed else "<u2").tobytes()
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def source_datamodule(cls, root, tmp_path, **kw):
    """A DICOM data source's datamodule over a fixture folder: 64 px, no augmentation, every
    image in train (val and test fractions 0) with its ground truth, unless ``kw`` says otherwise."""
    settings = dict(root=str(root), image_size=64, batch_size=4, augment=False, cache_dir=str(tmp_path / "cache"),
                    val_fraction=0.0, test_fraction=0.0, train_masks=True)
    return cls(**(settings | kw))


def train_item(dm, image_id):
    """The training item of ``image_id``."""
    ds = dm.dataset("train")
    return ds[ds.ids.index(image_id)]
