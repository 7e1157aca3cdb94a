"""Universal Model training recipe: per-dataset RandZoom and class-ratio crops, scheduler stepped before each epoch."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.handlers import LrScheduleHandler
from monai.transforms import Compose, RandCropByLabelClassesd, RandCropByPosNegLabeld, RandZoomd

from common.data.universal import CLASS_CROP_DATASETS, ZOOM_DATASETS, ForDatasetsd, UniversalLabeld
from common.engines.handlers import EpochStartLrScheduleHandler
from common.optim import LinearWarmupCosineAnnealingLR
from tools.bundle_io import parse_bundle

BUNDLE = os.path.join(os.path.dirname(__file__), "..", "bundles", "clip_driven_universal_ct_segmentation")
ROI = 8


@pytest.fixture(scope="module")
def random_transforms() -> list:
    parser = parse_bundle(os.path.abspath(BUNDLE), ["train.json"], roi_size=[ROI] * 3, num_samples=1)
    return parser.get_parsed_content("train#random_transforms")


def _item(name: str) -> dict:
    """A 20^3 case: raw 1 (liver) ball, raw 2 (tumour) 2^3 cube at the centre, as the deterministic part leaves it."""
    grid = np.stack(np.meshgrid(*[np.arange(20)] * 3, indexing="ij"))
    raw = (((grid - 10) ** 2).sum(0) <= 6**2).astype(np.float32)
    raw[9:11, 9:11, 9:11] = 2
    data = {"image": torch.rand(1, 20, 20, 20), "label": torch.from_numpy(raw)[None], "name": name}
    return UniversalLabeld(raw_key="label_raw")(data)


def test_recipe_parameters_as_official(random_transforms):
    zoom, posneg, classes, delete = random_transforms[:4]
    assert zoom.datasets == set(ZOOM_DATASETS) == {"10_03", "10_06", "10_07", "10_08", "10_09", "10_10"}
    assert not zoom.exclude and isinstance(zoom.transform, RandZoomd)
    rz = zoom.transform.rand_zoom
    assert (zoom.transform.prob, rz.min_zoom, rz.max_zoom, rz.keep_size) == (0.3, (1.3,), (1.5,), True)
    assert list(zoom.transform.mode) == ["area", "nearest", "nearest"]
    assert posneg.datasets == classes.datasets == set(CLASS_CROP_DATASETS) == {"04", "10_03", "10_07", "10_08"}
    assert posneg.exclude and not classes.exclude
    assert isinstance(posneg.transform, RandCropByPosNegLabeld) and isinstance(
        classes.transform, RandCropByLabelClassesd
    )
    assert (posneg.transform.cropper.pos_ratio, posneg.transform.label_key) == (2 / 3, "label_raw")
    cropper = classes.transform.cropper
    assert (cropper.ratios, cropper.num_classes, classes.transform.label_key) == ([1, 1, 5], 3, "label_raw")
    assert list(delete.keys) == ["label_raw"]


@pytest.mark.parametrize(
    "name, tumour_share", [("04_LiTS/label/liver_0", 5 / 7), ("08_AbdomenCT-1K/label/Case_1", 0.0)]
)
def test_crop_centres_follow_dataset(random_transforms, name, tumour_share):
    """Tumour datasets centre crops on raw class 2 with probability 5/7; others sample foreground uniformly."""
    crops = Compose(random_transforms[1:3]).set_random_state(seed=0)
    item = _item(name)
    n = 120
    centres = [int(crops(item)[0]["label_raw"][0, ROI // 2, ROI // 2, ROI // 2]) for _ in range(n)]
    share = centres.count(2) / n
    # 8 of the 925 foreground voxels are tumour, so PosNeg crops almost never centre there (tolerance ~3 sd).
    assert abs(share - tumour_share) < 0.12, share


def test_zoom_only_for_msd(random_transforms):
    zoom = random_transforms[0].set_random_state(seed=0)
    other = _item("01_Multi-Atlas_Labeling/label/label0001")
    for _ in range(20):
        out = zoom(other)
        assert all(out[k] is other[k] for k in ("image", "label", "label_raw"))
    msd = _item("10_Decathlon/Task03_Liver/label/liver_1")
    changed = 0
    for _ in range(60):
        out = zoom(msd)
        assert out["image"].shape == (1, 20, 20, 20) and out["label"].shape == (32, 20, 20, 20)
        assert set(torch.unique(out["label_raw"]).tolist()) <= {0, 1, 2}
        changed += not torch.equal(out["label"], msd["label"])
    assert 0.12 < changed / 60 < 0.48  # prob 0.3, about 3 sd either side
    # zoom with keep_size crops the centre: the liver ball (radius 6) grows by about zoom^3 in volume.
    zoomed = ForDatasetsd(RandZoomd(["label_raw"], prob=1.0, min_zoom=1.4, max_zoom=1.4, mode="nearest"), ZOOM_DATASETS)
    assert int((zoomed(msd)["label_raw"] > 0).sum()) > int((msd["label_raw"] > 0).sum()) * 1.4**3 * 0.9


def test_selection_keys():
    identity = ForDatasetsd(lambda d: {**d, "hit": True}, ["10_09"])
    assert identity({"name": "10_Decathlon/Task09_Spleen/label/spleen_1"})["hit"]
    assert "hit" not in identity({"name": "10_Decathlon/Task03_Liver/label/liver_1"})
    assert identity({"dataset": "10_09"})["hit"]  # explicit key wins
    assert "hit" not in identity({})  # no name: labels in universal indices (MONAI Label)


def _lrs_per_epoch(handler_cls, epochs: int, start_state: dict | None = None, start_epoch: int = 0):
    """Learning rate each epoch trains at (warm-up 3 of 6 epochs, base 1), and the final scheduler state."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = LinearWarmupCosineAnnealingLR(opt, warmup_epochs=3, max_epochs=6)
    if start_state is not None:
        sched.load_state_dict(start_state)
    seen: list[float] = []
    engine = Engine(lambda e, b: seen.append(opt.param_groups[0]["lr"]))
    handler_cls(sched, print_lr=False).attach(engine)
    if start_epoch:
        engine.add_event_handler(Events.STARTED, lambda e: setattr(e.state, "epoch", start_epoch))
    engine.run([0], max_epochs=epochs)
    return seen, sched.state_dict()


def test_scheduler_steps_before_each_epoch():
    # official train.py: scheduler.step() then train, for epoch 0..5 -> closed form at 1..6
    assert _lrs_per_epoch(EpochStartLrScheduleHandler, 6)[0] == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.25, 0.0])
    # MONAI's handler steps after the epoch: the first epoch trains at warmup_start_lr = 0
    assert _lrs_per_epoch(LrScheduleHandler, 6)[0] == pytest.approx([0.0, 0.5, 1.0, 1.0, 0.75, 0.25])
    # resume after 3 epochs continues the same sequence
    state = _lrs_per_epoch(EpochStartLrScheduleHandler, 3)[1]
    resumed = _lrs_per_epoch(EpochStartLrScheduleHandler, 6, state, start_epoch=3)[0]
    assert resumed == pytest.approx([0.75, 0.25, 0.0])


def test_train_config_uses_epoch_start_stepping():
    with open(os.path.join(BUNDLE, "configs", "train.json")) as f:
        targets = [h["_target_"] for h in json.load(f)["train"]["handlers"]]
    assert "common.engines.handlers.EpochStartLrScheduleHandler" in targets and "LrScheduleHandler" not in targets
