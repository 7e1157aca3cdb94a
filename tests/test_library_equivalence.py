"""Library calls where ours were hand-written (equal outputs shown here), and why the kept ones stay ours."""

from __future__ import annotations

import os

import numpy as np
import pydicom
import pytest
import torch
from monai.data import PydicomReader
from monai.handlers import CheckpointSaver
from monai.optimizers import WarmupCosineSchedule
from monai.transforms import LoadImage, ScaleIntensityRangePercentiles, get_largest_connected_component_mask
from scipy import ndimage

from common.data.pumit import _dicom_files, _normalise
from common.data.universal import organ_post_process
from common.demo.pumit import _write_dicom_series
from common.metrics.lovt import GlobalDice
from common.optim import LinearWarmupCosineAnnealingLR
from tools.verify import VerificationError, fake_spatial_shape


def _top_k_scipy(mask: np.ndarray, k: int) -> np.ndarray:
    """The hand-written top-k 26-connected components the universal post-processing used before."""
    labels, num = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    sizes = np.bincount(labels.ravel(), minlength=num + 1)
    if len(sizes) <= 1:
        return np.zeros_like(mask, dtype=bool)
    return np.isin(labels, np.argsort(sizes[1:])[::-1][:k] + 1)


def _blobs(seed: int, shape: tuple[int, int, int] = (24, 20, 16)) -> np.ndarray:
    """Separate boxes of distinct sizes, some touching only at a corner (one 26-connected component)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(shape, dtype=bool)
    for size in rng.choice(np.arange(1, 6), size=4, replace=False):
        corner = rng.integers(0, np.array(shape) - size)
        mask[tuple(slice(c, c + size) for c in corner)] = True
    mask[0, 0, 0] = mask[1, 1, 1] = True  # diagonal neighbours: joined by 26- but not by 6-connectivity
    return mask


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("seed", range(4))
def test_monai_top_k_components_equal_the_hand_written_ones(seed, k):
    mask = _blobs(seed)
    np.testing.assert_array_equal(
        get_largest_connected_component_mask(mask, connectivity=3, num_components=k), _top_k_scipy(mask, k)
    )


def test_monai_top_k_components_of_an_empty_mask_is_empty():
    empty = np.zeros((4, 4, 4), dtype=bool)
    assert not get_largest_connected_component_mask(empty, connectivity=3).any() and not _top_k_scipy(empty, 1).any()


def test_organ_post_process_keeps_the_largest_organ_component_and_both_tumour_hosts():
    pred = np.zeros((32, 12, 12, 12), dtype=bool)
    pred[0, :4, :4, :4] = pred[0, 8:10, 8:10, 8:10] = True  # spleen: big blob and a stray one
    pred[1, :3, 6:9, :3] = pred[2, 8:11, 0:3, 8:11] = True  # both kidneys host the kidney tumour (27)
    pred[25, 1, 7, 1] = pred[25, 9, 1, 9] = pred[25, 5, 5, 5] = True  # tumour voxels: two in hosts, one outside
    out = organ_post_process(pred, classes=[1, 2, 3, 26])
    np.testing.assert_array_equal(out[0], _top_k_scipy(pred[0], 1))
    assert out[25, 1, 7, 1] and out[25, 9, 1, 9] and not out[25, 5, 5, 5]


def test_global_dice_on_monai_confusion_matrix_equals_pixel_counts():
    torch.manual_seed(0)
    metric, tp, fp, fn = GlobalDice(), 0, 0, 0
    for _ in range(3):
        prob, label = torch.rand(2, 1, 8, 8), (torch.rand(2, 1, 8, 8) > 0.7).float()
        metric(prob, label)
        pred, target = prob >= 0.5, label > 0.5
        tp, fp, fn = tp + (pred & target).sum(), fp + (pred & ~target).sum(), fn + (~pred & target).sum()
    assert metric.aggregate().item() == pytest.approx(float(2 * tp / (2 * tp + fp + fn)), abs=1e-6)
    empty = GlobalDice()
    empty(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4))
    assert empty.aggregate().item() == 0.0, "torchmetrics gives 0 where nothing is positive"


def test_fake_spatial_shape_reads_the_metadata_patterns():
    assert fake_spatial_shape(["32*n+32", "8*n", 96, "*", "2**p"]) == [64, 8, 96, 1, 2]
    with pytest.raises(VerificationError, match="__import__"):
        fake_spatial_shape(["__import__('os')"])


def test_monai_warmup_cosine_differs_from_the_reference_schedule():
    def lrs(make) -> list[float]:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler, out = make(optimizer), []
        for _ in range(10):
            out.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return out

    ours = lrs(lambda o: LinearWarmupCosineAnnealingLR(o, warmup_epochs=3, max_epochs=10, eta_min=0.1))
    monai = lrs(lambda o: WarmupCosineSchedule(o, warmup_steps=3, t_total=10, end_lr=0.1))
    assert ours[2] == pytest.approx(1.0) and monai[2] < 0.7, "the reference reaches the base lr at epoch W - 1"
    assert ours[-1] > 0.1 and ours[-1] != pytest.approx(monai[-1]), "decay to eta_min, not a clamp at end_lr"


def test_monai_percentile_scaling_counts_the_background_that_ours_leaves_out():
    arr = np.zeros((1, 8, 8, 8), dtype=np.float32)
    arr[0, 2:6, 2:6, 2:6] = np.linspace(10, 20, 64).reshape(4, 4, 4)
    monai = ScaleIntensityRangePercentiles(lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True)(arr)
    ours = _normalise(arr)
    assert float(ours[0, 2, 2, 2]) == 0.0 and float(monai[0, 2, 2, 2]) > 0.4, "ours: 0.5th percentile of the foreground"


def test_monai_key_metric_checkpoint_is_not_written_atomically(tmp_path):
    saver = CheckpointSaver(str(tmp_path), {"model": torch.nn.Linear(1, 1)}, save_key_metric=True)
    assert saver._key_metric_checkpoint.save_handler._atomic is False, "if MONAI writes atomically, use CheckpointSaver"


def test_monai_dicom_series_follows_instance_numbers_where_ours_follows_positions(tmp_path):
    folder = str(tmp_path / "series")
    _write_dicom_series(folder, np.arange(4)[:, None, None] * np.full((4, 6, 6), 10), (2.5, 0.8, 0.8))
    for name in os.listdir(folder):  # renumbered series: instance numbers run against the slice positions
        ds = pydicom.dcmread(os.path.join(folder, name))
        ds.InstanceNumber = 5 - ds.InstanceNumber
        ds.save_as(os.path.join(folder, name))
    ours = [float(ds.pixel_array.mean()) for _, ds in _dicom_files(folder)]
    monai = LoadImage(reader=PydicomReader(), image_only=True)(folder)
    assert ours == [0.0, 10.0, 20.0, 30.0], "ours: ordered along the slice normal"
    assert [float(monai[..., i].mean()) for i in range(4)] == [30.0, 20.0, 10.0, 0.0], "monai: by InstanceNumber"
