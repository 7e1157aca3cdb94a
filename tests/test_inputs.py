"""Inference reads what users have (issue 13, item 5), on the real test files nibabel and pydicom ship."""

from __future__ import annotations

import os
import shutil

import nibabel as nib
import nibabel.testing
import nrrd
import numpy as np
import pydicom
import pytest
import torch
from monai.bundle import ConfigWorkflow
from monai.transforms import LoadImage
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from common.data.inputs import IMAGE_PATTERNS, EnsureSpatialDimsd, image_datalist
from tools.bundle_io import REPO_ROOT, config_paths, copy_bundle, on_sys_path

ANATOMICAL = os.path.join(nibabel.testing.data_path, "anatomical.nii")
CT_SMALL = get_testdata_file("CT_small.dcm")
SLICE_Z = -75.7  # CT_small's ImagePositionPatient z; slice thickness 5 mm


def _series(folder, instance_numbers: list[int]) -> str:
    """Write CT_small as a series: slice k at z + 5k with pixels + 100k, numbered ``instance_numbers[k]``."""
    os.makedirs(folder)
    for k, number in enumerate(instance_numbers):
        ds = pydicom.dcmread(CT_SMALL)
        ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], SLICE_Z + 5 * k]
        ds.InstanceNumber, ds.SOPInstanceUID = number, generate_uid()
        ds.PixelData = (ds.pixel_array + 100 * k).astype(np.int16).tobytes()
        ds.save_as(os.path.join(folder, f"IM{number:04d}"))  # no suffix, as scanners write them
    return str(folder)


def _nrrd(path, source: str = ANATOMICAL) -> str:
    """``source`` as an NRRD with the header 3D Slicer writes (LPS space, directions, origin)."""
    image = nib.load(source)
    lps = np.diag([-1.0, -1.0, 1.0]) @ image.affine[:3]
    header = {"space": "left-posterior-superior", "space directions": lps[:, :3].T, "space origin": lps[:, 3]}
    nrrd.write(str(path), np.asarray(image.dataobj), header)
    return str(path)


def test_series_stacked_by_position_not_instance_number(tmp_path):
    series = _series(tmp_path / "series", [3, 1, 4, 2])  # numbering unrelated to position
    image = LoadImage(reader="common.data.inputs.DicomSeriesReader", image_only=True, ensure_channel_first=True)(series)
    ds = pydicom.dcmread(CT_SMALL)
    hounsfield = ds.pixel_array.T * float(ds.RescaleSlope) + float(ds.RescaleIntercept)  # MONAI's (column, row)
    assert image.shape == (1, 128, 128, 4)
    for k in range(4):
        np.testing.assert_allclose(image[0, ..., k].numpy(), hounsfield + 100 * k)
        # the affine puts voxel plane k at slice k's position (LPS -> RAS flips x and y only)
        assert float((image.affine @ torch.tensor([0.0, 0, k, 1], dtype=torch.float64))[2]) == pytest.approx(
            SLICE_Z + 5 * k
        )


def test_reader_leaves_nifti_and_nrrd_to_their_readers(tmp_path):
    loader = LoadImage(reader="common.data.inputs.DicomSeriesReader", image_only=True, ensure_channel_first=True)
    nifti, from_nrrd = loader(ANATOMICAL), loader(_nrrd(tmp_path / "anatomical.nrrd"))
    assert nifti.shape == from_nrrd.shape == (1, 33, 41, 25)
    np.testing.assert_allclose(from_nrrd.affine, nifti.affine, atol=1e-5)
    np.testing.assert_array_equal(from_nrrd.numpy(), nifti.numpy())


def test_datalist_formats_and_empty_match(tmp_path):
    shutil.copy(ANATOMICAL, tmp_path / "a.nii")
    shutil.copy(ANATOMICAL, tmp_path / "notes.txt")
    nib.save(nib.load(ANATOMICAL), tmp_path / "b.nii.gz")
    _nrrd(tmp_path / "c.nrrd")
    _series(tmp_path / "d_series", [1, 2])
    (tmp_path / "e_empty").mkdir()
    names = [os.path.basename(d["image"]) for d in image_datalist(str(tmp_path))]
    assert names == ["a.nii", "b.nii.gz", "c.nrrd", "d_series"]
    assert image_datalist(str(tmp_path / "d_series")) == [{"image": str(tmp_path / "d_series")}]
    with pytest.raises(FileNotFoundError, match=r"e_empty: no image matches \['\*.png', '\*.jpg', '\*.jpeg'\]"):
        image_datalist(str(tmp_path / "e_empty"), IMAGE_PATTERNS, dicom_series=False)
    with pytest.raises(FileNotFoundError, match="input folder not found: .*missing"):
        image_datalist(str(tmp_path / "missing"))


def test_one_slice_series_is_an_error_naming_the_file(tmp_path):
    series = _series(tmp_path / "one", [1])
    image = LoadImage(reader="common.data.inputs.DicomSeriesReader", image_only=True, ensure_channel_first=True)(series)
    with pytest.raises(ValueError, match=r"one: image has spatial shape \(128, 128\), this bundle needs a 3D"):
        EnsureSpatialDimsd("image", spatial_dims=3)({"image": image})


def test_unetr_infers_nii_nrrd_and_dicom_series(tmp_path):
    """The reference 3D bundle on ``imagesTs/`` holding one file of each format: one label map per input."""
    root = copy_bundle(os.path.join(REPO_ROOT, "bundles", "unetr_btcv_segmentation"), str(tmp_path / "bundle"))
    inputs = tmp_path / "data" / "imagesTs"
    inputs.mkdir(parents=True)
    shutil.copy(ANATOMICAL, inputs / "anatomical.nii")
    _nrrd(inputs / "volume.nrrd")
    _series(inputs / "ct_series", [2, 1, 3])

    def infer(**overrides):
        workflow = ConfigWorkflow(
            config_file=config_paths(root, ["inference.json", "demo.json"]),
            meta_file=os.path.join(root, "configs", "metadata.json"),
            workflow_type="infer",
            bundle_root=root,
            dataset_dir=str(tmp_path / "data"),
            output_dir=str(tmp_path / "out"),
            load_pretrain=False,
            pixdim=[4.0, 4.0, 4.0],  # coarse grid and small windows: the formats are under test, not the model
            roi_size=[32, 32, 32],
            precision="float32",
            **overrides,
        )
        workflow.initialize()
        workflow.run()
        workflow.finalize()

    with on_sys_path(root):
        infer()
        outputs = sorted(os.listdir(tmp_path / "out"))
        assert outputs == ["anatomical_seg.nii.gz", "ct_series_seg.nii.gz", "volume_seg.nii.gz"]
        assert nib.load(tmp_path / "out" / "ct_series_seg.nii.gz").shape[:3] == (128, 128, 3)
        _series(tmp_path / "single" / "one_slice", [1])
        with pytest.raises(Exception) as error:
            infer(input_dir=str(tmp_path / "single"))
        assert "one_slice: image has spatial shape (128, 128), this bundle needs a 3D image" in _chain(error.value)
        (tmp_path / "nothing_here").mkdir()
        with pytest.raises(Exception) as error:
            infer(input_dir=str(tmp_path / "nothing_here"))
        assert "nothing_here: no image matches ['*.nii', '*.nii.gz', '*.nrrd']" in _chain(error.value)


def _chain(error: BaseException | None) -> str:
    """The messages of an exception and its causes (MONAI's config and DataLoader layers wrap the first one)."""
    messages = []
    while error is not None:
        messages.append(str(error))
        error = error.__cause__ or error.__context__
    return "\n".join(messages)
