"""UNETR BTCV bundle: paper configuration, recipe pieces, bad input, geometry of the predictions."""

from __future__ import annotations

import json
import math
import os
import re
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow
from monai.data import MetaTensor
from monai.networks.nets import UNETR

from common.data.btcv import btcv_datalist
from common.demo.btcv import write_btcv_demo
from common.metrics.btcv import BTCVParityDice, btcv_case_dice
from common.optim import LinearWarmupCosineAnnealingLR
from common.weights.unetr import OBSOLETE_UNETR_KEYS, load_unetr_reference
from tools.bundle_io import BUNDLES_DIR, on_sys_path, parse_bundle

BUNDLE = os.path.join(BUNDLES_DIR, "unetr_btcv_segmentation")


def chained_messages(error: BaseException) -> str:
    """All messages of an exception chain (MONAI wraps transform errors in ``RuntimeError``)."""
    messages = []
    while error is not None:
        messages.append(str(error))
        error = error.__cause__ or error.__context__
    return " | ".join(messages)


def test_paper_configuration_parameter_count():
    parser = parse_bundle(BUNDLE, ["train.json"])
    net = parser.get_parsed_content("network_def")
    assert isinstance(net, UNETR)
    assert sum(p.numel() for p in net.parameters()) == 92_802_478
    assert sum(p.numel() for p in net.vit.parameters()) == 88_359_168
    assert len(net.state_dict()) == 194
    x = torch.rand(1, 1, 96, 96, 96)
    with torch.no_grad():
        _, hidden = net.vit(x)
    assert hidden[3].shape == (1, 216, 768)


def test_scheduler_matches_reference_formula():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    sched = LinearWarmupCosineAnnealingLR(opt, warmup_epochs=50, max_epochs=5000)
    lrs = []
    for _ in range(5000):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0
    assert lrs[1] == pytest.approx(1e-4 / 49)
    assert lrs[49] == pytest.approx(1e-4)
    assert lrs[50] == pytest.approx(1e-4)
    assert lrs[2525] == pytest.approx(0.5e-4 * (1 + math.cos(math.pi * 2475 / 4950)))
    assert lrs[4999] == pytest.approx(0.5e-4 * (1 + math.cos(math.pi * 4949 / 4950)))
    state = sched.state_dict()
    sched2 = LinearWarmupCosineAnnealingLR(opt, warmup_epochs=50, max_epochs=5000)
    sched2.load_state_dict(state)
    assert sched2.last_epoch == 5000


def test_case_dice_scores_absent_organs_zero():
    gt = torch.zeros(10, dtype=torch.long)
    gt[:4] = 1  # spleen, 4 voxels
    pred = torch.zeros(10, dtype=torch.long)
    pred[2:6] = 1  # 2 of 4 right, 2 wrong
    pred[8] = 6  # liver predicted, absent from ground truth
    scores = btcv_case_dice(pred, gt)
    assert scores[0].item() == pytest.approx(2 * 2 / (4 + 4))
    assert scores[5].item() == 0.0 and scores[1:].sum().item() == 0.0
    metric = BTCVParityDice()
    one_hot = torch.nn.functional.one_hot
    metric(one_hot(pred, 14).T[None].float(), one_hot(gt, 14).T[None].float())
    assert metric.aggregate().item() == pytest.approx(0.5 / 13)


def test_datalist_writes_reference_split_and_names_missing_files(tmp_path):
    data = tmp_path / "BTCV"
    data.mkdir()
    with pytest.raises(FileNotFoundError, match="imagesTr/img0001.nii.gz"):
        btcv_datalist(str(data), "training")
    split = json.loads((data / "dataset_0.json").read_text())
    assert len(split["training"]) == 24 and len(split["validation"]) == 6 and len(split["test"]) == 20
    assert split["validation"][0]["image"] == "imagesTr/img0035.nii.gz"


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("btcv") / "demo")
    return write_btcv_demo(root, num_training=2, num_validation=1, num_test=1, shape=(48, 40, 16))


def _validation_workflow(tmp_path, dataset_dir: str) -> ConfigWorkflow:
    overrides = {"dataset_dir": dataset_dir, "roi_size": [32, 32, 32], "train#trainer#max_epochs": 1, "cache_rate": 0}
    return ConfigWorkflow(
        config_file=[os.path.join(BUNDLE, "configs", c) for c in ("train.json", "demo.json")],
        meta_file=os.path.join(BUNDLE, "configs", "metadata.json"),
        workflow_type="train",
        bundle_root=str(tmp_path),
        **overrides,
    )


def test_label_out_of_range_names_the_file(tmp_path, tiny_demo):
    data = shutil.copytree(tiny_demo, str(tmp_path / "data"))
    bad = os.path.join(data, "labelsTr", "label0001.nii.gz")
    img = nib.load(bad)
    arr = np.asarray(img.dataobj).copy()
    arr[0, 0, 0] = 17
    nib.save(nib.Nifti1Image(arr, img.affine), bad)
    wf = _validation_workflow(tmp_path, data)
    wf.initialize()
    with pytest.raises(Exception) as error:
        wf.run()
    assert re.search(r"label0001\.nii\.gz: label values \[17\] are outside 0\.\.13", chained_messages(error.value))


def test_corrupt_nifti_names_the_file(tmp_path, tiny_demo):
    data = shutil.copytree(tiny_demo, str(tmp_path / "data"))
    bad = os.path.join(data, "imagesTr", "img0002.nii.gz")
    with open(bad, "wb") as f:
        f.write(b"\x1f\x8b not really a gzip stream")
    wf = _validation_workflow(tmp_path, data)
    wf.initialize()
    with pytest.raises(Exception) as error:
        wf.run()
    assert "img0002.nii.gz" in chained_messages(error.value)


def test_inference_restores_original_geometry(tmp_path, tiny_demo):
    out_dir = tmp_path / "out"
    with on_sys_path(BUNDLE):
        wf = ConfigWorkflow(
            config_file=[os.path.join(BUNDLE, "configs", c) for c in ("inference.json", "demo.json")],
            meta_file=os.path.join(BUNDLE, "configs", "metadata.json"),
            workflow_type="infer",
            bundle_root=str(tmp_path),
            dataset_dir=tiny_demo,
            output_dir=str(out_dir),
            load_pretrain=False,
            roi_size=[32, 32, 32],
        )
        wf.initialize()
        assert wf.check_properties() == []
        wf.run()
    (pred_file,) = sorted(out_dir.glob("*.nii.gz"))
    image_file = os.path.join(tiny_demo, "imagesTs", "img0004.nii.gz")
    pred, image = nib.load(str(pred_file)), nib.load(str(image_file))
    assert pred.shape == image.shape
    np.testing.assert_allclose(pred.affine, image.affine, atol=1e-4)
    assert pred.get_data_dtype() == np.uint8


def test_reference_checkpoint_loads_with_obsolete_keys(tmp_path):
    torch.manual_seed(0)
    net = UNETR(1, 14, (32, 32, 32), feature_size=8, hidden_size=96, mlp_dim=192, num_heads=4, proj_type="perceptron")
    state = {f"module.{k}": v for k, v in net.state_dict().items()}
    state["module.vit.patch_embedding.cls_token"] = torch.zeros(1, 1, 96)
    for key in OBSOLETE_UNETR_KEYS[1:]:
        state[f"module.{key}"] = torch.zeros(8, 8, 1, 1, 1)
    path = tmp_path / "UNETR_model_best_acc.pth"
    torch.save({"epoch": 10, "best_acc": 0.8, "state_dict": state}, path)
    fresh = UNETR(1, 14, (32, 32, 32), feature_size=8, hidden_size=96, mlp_dim=192, num_heads=4, proj_type="perceptron")
    with pytest.raises(RuntimeError):
        fresh.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
    assert load_unetr_reference(fresh, str(path)) == []
    x = torch.rand(1, 1, 32, 32, 32)
    net.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), net(x), rtol=0, atol=0)
    other = UNETR(1, 5, (32, 32, 32), feature_size=8, hidden_size=96, mlp_dim=192, num_heads=4, proj_type="perceptron")
    skipped = load_unetr_reference(other, str(path), strict=False)
    assert skipped == ["out.conv.conv.weight", "out.conv.conv.bias"]


@pytest.mark.parametrize("invert_probabilities", [False, True])
def test_inference_postprocessing_inverts_labels_or_probabilities(tmp_path, invert_probabilities):
    """The default inverts the argmax label (no softmax copy of the 14 maps); ``invert_probabilities`` inverts
    the probabilities first. With no resampling to undo, both give the argmax of the logits in input space."""
    image = np.full((24, 20, 16), -1000, dtype=np.int16)  # air: below the intensity window, cropped away
    image[4:20, 4:16, 2:14] = 100
    nib.save(nib.Nifti1Image(image, np.diag([1.5, 1.5, 2.0, 1.0])), tmp_path / "ct.nii.gz")
    parser = parse_bundle(BUNDLE, ["inference.json"])
    parser["invert_probabilities"] = invert_probabilities
    with on_sys_path(BUNDLE):
        data = parser.get_parsed_content("preprocessing")({"image": str(tmp_path / "ct.nii.gz")})
        post = parser.get_parsed_content("postprocessing")
    assert data["image"].shape == (1, 16, 12, 12)
    logits = torch.randn(14, 16, 12, 12, generator=torch.Generator().manual_seed(0))
    data["pred"] = MetaTensor(logits, meta=data["image"].meta)
    softmax = [t for t in post.transforms if type(t).__name__ == "Activationsd"]
    assert len(softmax) == int(invert_probabilities)
    for transform in post.transforms:
        if type(transform).__name__ != "SaveImaged":
            data = transform(data)
    assert data["pred"].shape == (1, 24, 20, 16)
    # foreground crop: the logits cover the cropped box; outside it the inverted label is background (0)
    inside = data["pred"][0, 4:20, 4:16, 2:14]
    assert torch.equal(inside.long(), logits.argmax(0))
    assert data["pred"].sum() == inside.sum()
