"""What users have as inference input: NIfTI, NRRD and DICOM series folders for 3D, PNG/JPEG for 2D.

``image_datalist`` lists the images in a folder (an empty match is an error naming folder and patterns, never a
run that writes nothing); ``DicomSeriesReader`` is MONAI's ``PydicomReader`` stacking slices by position along the
slice normal rather than by ``InstanceNumber``; ``EnsureSpatialDimsd`` stops a 2D image (e.g. a one-slice series)
before it reaches a 3D network, naming the file.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pydicom
from monai.config import KeysCollection
from monai.data import PydicomReader
from monai.transforms import MapTransform

from .checks import source_name

__all__ = ["VOLUME_PATTERNS", "IMAGE_PATTERNS", "image_datalist", "is_dicom_series", "DicomSeriesReader"]
__all__ += ["EnsureSpatialDimsd"]

VOLUME_PATTERNS = ("*.nii", "*.nii.gz", "*.nrrd")
IMAGE_PATTERNS = ("*.png", "*.jpg", "*.jpeg")


def is_dicom_series(folder: str | Path) -> bool:
    """Whether ``folder`` directly holds at least one DICOM file (``.dcm`` suffix or the ``DICM`` preamble)."""
    folder = Path(folder)
    return folder.is_dir() and any(
        p.is_file() and (p.suffix.lower() == ".dcm" or pydicom.misc.is_dicom(str(p))) for p in folder.iterdir()
    )


def image_datalist(
    folder: str, patterns: str | Sequence[str] = VOLUME_PATTERNS, dicom_series: bool = True
) -> list[dict[str, str]]:
    """``[{"image": path}]``: files matching any of ``patterns`` under ``folder`` (``**`` allowed), sorted.

    With ``dicom_series``, every sub-folder of ``folder`` that holds DICOM files is one more image (a series), and
    so is ``folder`` itself when it is a series folder.
    Raises ``FileNotFoundError`` naming the folder and the patterns when nothing matches.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"input folder not found: {folder}")
    patterns = (patterns,) if isinstance(patterns, str) else tuple(patterns)
    found = {p for pattern in patterns for p in root.glob(pattern) if p.is_file()}
    if dicom_series:
        found |= {p for p in (root, *root.iterdir()) if is_dicom_series(p)}
    if not found:
        series = " or a DICOM series sub-folder" if dicom_series else ""
        raise FileNotFoundError(f"{folder}: no image matches {list(patterns)}{series}.")
    return [{"image": str(p)} for p in sorted(found)]


class DicomSeriesReader(PydicomReader):
    """``PydicomReader`` for DICOM files and series folders only, with series slices sorted by position.

    MONAI's reader stacks a series by ``InstanceNumber``, which need not follow anatomy; here the slices are
    ordered by ``ImagePositionPatient`` projected on the slice normal (from ``ImageOrientationPatient``), as
    ITK/GDCM do. Files that are not DICOM are left to the other readers (NIfTI, NRRD) of ``LoadImage``.
    """

    def verify_suffix(self, filename: Sequence[str] | str) -> bool:
        names = [filename] if isinstance(filename, (str, Path)) else list(filename)
        return all(is_dicom_series(n) or Path(n).suffix.lower() == ".dcm" for n in names)

    def _combine_dicom_series(self, data, filenames):
        positioned = [(_slice_position(ds), ds, f) for ds, f in zip(data, filenames)]
        positioned.sort(key=lambda item: item[0])
        for rank, (_, ds, _) in enumerate(positioned):
            ds.InstanceNumber = rank  # these datasets were just read for this call; the parent stacks by this number
        return super()._combine_dicom_series([ds for _, ds, _ in positioned], [f for *_, f in positioned])


def _slice_position(ds: pydicom.Dataset) -> float:
    """Distance of a slice along its normal; ``InstanceNumber`` when the geometry tags are absent."""
    if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
        return float(getattr(ds, "InstanceNumber", 0))
    orientation = np.asarray(ds.ImageOrientationPatient, dtype=float)
    return float(np.dot(np.cross(orientation[:3], orientation[3:]), np.asarray(ds.ImagePositionPatient, float)))


class EnsureSpatialDimsd(MapTransform):
    """Raise ``ValueError`` naming the file when an image does not have ``spatial_dims`` spatial dimensions.

    A one-slice DICOM series loads as a 2D image; a 3D network would otherwise fail with a raw shape error deep
    inside the sliding window. Expects channel-first images.
    """

    def __init__(self, keys: KeysCollection, spatial_dims: int = 3, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.spatial_dims = spatial_dims

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            shape = tuple(d[key].shape)  # type: ignore[attr-defined]
            if len(shape) - 1 != self.spatial_dims:
                raise ValueError(
                    f"{source_name(d, key)}: image has spatial shape {shape[1:]}, this bundle needs a "
                    f"{self.spatial_dims}D image (a DICOM series needs more than one slice)."
                )
        return d
