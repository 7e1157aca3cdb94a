"""PUMIT data readers (mixed 2D / 3D, spacing errors), demo data, checkpoint conversion and loading."""

import json
import os
import re

import nibabel as nib
import numpy as np
import pytest
import torch

from common.data.pumit import (
    DABucketBatchSampler,
    LoadPUMITImaged,
    PadToTokenGridd,
    PUMITCropd,
    PUMITPrepareBatch,
    load_medmnist_npz,
    load_pumit_datalist,
    read_spacing,
)
from common.demo.btcv import write_btcv_demo
from common.demo.pumit import write_btcv_pretraining_datalist, write_medmnist_demo, write_pretraining_demo
from common.networks.pumit import Tokenizer, ViT, ViTForMIM
from common.weights.pumit import load_pretrained_vit, load_weights
from tools.converters.pumit import convert


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return write_pretraining_demo(str(tmp_path_factory.mktemp("pumit") / "demo"))


def test_demo_datalist_mixes_2d_and_3d_with_spacing(demo_dir):
    items = load_pumit_datalist(os.path.join(demo_dir, "datalist.json"))
    by_kind = {i["dataset"]: i for i in items}
    assert by_kind["ct_iso"]["aniso_d"] == 0 and by_kind["ct_thick"]["aniso_d"] == 1
    assert by_kind["mr_t2"]["aniso_d"] == 2 and by_kind["xray"]["aniso_d"] == 5
    assert by_kind["ct_thick"]["spacing"] == pytest.approx([2.5, 0.7, 0.7], rel=1e-6)  # thick axis moved first
    assert by_kind["dicom_ct"]["spacing"] == pytest.approx([5.0, 0.8, 0.8]) and by_kind["dicom_ct"]["aniso_d"] == 2
    assert write_pretraining_demo(demo_dir) == demo_dir  # idempotent


def test_loader_crop_and_batches(demo_dir):
    items = load_pumit_datalist(os.path.join(demo_dir, "datalist.json"))
    load, crop = LoadPUMITImaged(), PUMITCropd(tz=1, tx=2)
    shapes = {}
    for item in items:
        d = crop(load(item))
        assert 0.0 <= float(d["image"].min()) and float(d["image"].max()) <= 1.0
        shapes[d["aniso_d"]] = tuple(d["image"].shape)
    assert shapes == {0: (1, 16, 32, 32), 1: (1, 8, 32, 32), 2: (1, 4, 32, 32), 5: (1, 1, 32, 32)}
    padded = PadToTokenGridd()(load(items[2]))  # 12 slices at DA 1 -> multiple of 8
    assert tuple(padded["image"].shape) == (1, 16, 64, 64)
    for batch in DABucketBatchSampler(items, batch_size=3, num_batches=10):
        assert len({items[i]["aniso_d"] for i in batch}) == 1
    image, target, args, kwargs = PUMITPrepareBatch(target_key="image")(
        {"image": torch.zeros(2, 1, 4, 8, 8), "aniso_d": torch.tensor([2, 2])}
    )
    assert target is image and kwargs == {"aniso_d": 2} and args == ()
    with pytest.raises(ValueError, match="share one aniso_d"):
        PUMITPrepareBatch()({"image": torch.zeros(2, 1, 4, 8, 8), "aniso_d": torch.tensor([0, 2])})


@pytest.mark.parametrize("zooms, message", [((1.0, 1.0, 0.0), "positive"), ((np.nan, 1.0, 1.0), "positive")])
def test_bad_spacing_names_the_file(tmp_path, zooms, message):
    path = str(tmp_path / "bad.nii.gz")
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4))
    img.header["pixdim"][1:4] = zooms  # as a broken writer would store it
    nib.save(img, path)
    with pytest.raises(ValueError, match=re.escape(path) + ".*" + message):
        read_spacing(path)


def test_dicom_without_pixel_spacing_names_the_file(tmp_path, demo_dir):
    import pydicom

    src = os.path.join(demo_dir, "dicom_ct", "series0")
    dst = tmp_path / "series"
    dst.mkdir()
    for name in sorted(os.listdir(src)):
        ds = pydicom.dcmread(os.path.join(src, name))
        if name.endswith("003.dcm"):
            del ds.PixelSpacing
        ds.save_as(str(dst / name))
    with pytest.raises(ValueError, match=r"slice003\.dcm: .*PixelSpacing"):
        read_spacing(str(dst))


def test_missing_image_and_unknown_format(tmp_path):
    listing = tmp_path / "datalist.json"
    listing.write_text(json.dumps({"training": [{"image": "nope.nii.gz"}]}))
    with pytest.raises(FileNotFoundError, match="nope.nii.gz"):
        load_pumit_datalist(str(listing))
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(ValueError, match=r"x\.txt: unsupported"):
        read_spacing(str(tmp_path / "x.txt"))


def test_btcv_demo_as_pumit_datalist_keeps_splits(tmp_path):
    btcv = write_btcv_demo(str(tmp_path / "btcv"), num_training=2, num_validation=1, shape=(32, 32, 8))
    path = write_btcv_pretraining_datalist(btcv)
    train, val = load_pumit_datalist(path, "training"), load_pumit_datalist(path, "validation")
    assert len(train) == 2 and len(val) == 1 and not {i["image"] for i in train} & {i["image"] for i in val}
    assert all(i["aniso_d"] == 1 and "label" not in i for i in train + val)  # 2.5 / 0.9 mm -> DA 1


def test_medmnist_npz(tmp_path):
    root = write_medmnist_demo(str(tmp_path / "mm"), num_classes=3, per_split=6)
    items = load_medmnist_npz(os.path.join(root, "organmnist3d.npz"), "test")
    assert len(items) == 6 and items[0]["image"].shape == (1, 28, 28, 28) and {i["label"] for i in items} == {0, 1, 2}
    with pytest.raises(KeyError, match="missing array 'nope_images'"):
        load_medmnist_npz(os.path.join(root, "organmnist3d.npz"), "nope")


def _official_tokenizer_layout(tok: Tokenizer) -> dict:
    """Our tokenizer's weights renamed to the official SimpleVQTokenizer layout (upsample blocks named)."""
    out = {}
    for k, v in tok.state_dict().items():
        m = re.match(r"^decoder\.(\d+)\.(\d+)\.(.+)$", k)
        if m:
            j = int(m.group(2))
            k = f"decoder.{m.group(1)}." + ("transposed_conv" if j == 0 else f"conv.{j - 1}") + f".{m.group(3)}"
        out[k] = v
    return out


def test_convert_official_tokenizer_checkpoint(tmp_path):
    torch.manual_seed(0)
    tok = Tokenizer().eval()
    src, dst = str(tmp_path / "simple-soft.ckpt"), str(tmp_path / "tok.pt")
    official = _official_tokenizer_layout(tok)
    assert "decoder.6.transposed_conv.weight" in official
    del official["quantize.proj.weight"], official["quantize.proj.bias"]  # older checkpoints lack proj
    torch.save({"state_dict": official, "epoch": 3}, src)
    convert(src, dst)
    converted = torch.load(dst, weights_only=True)
    torch.testing.assert_close(converted["decoder.6.0.weight"], tok.decoder[6][0].weight)
    torch.testing.assert_close(converted["quantize.proj.weight"], tok.quantize.embedding.weight)  # dot-product init


def test_official_mim_checkpoint_into_mim_and_downstream(tmp_path):
    torch.manual_seed(0)
    tok = Tokenizer(down_channels=(8, 8, 16), up_channels=(8, 8, 16), num_codes=32, code_dim=16)
    mim = ViTForMIM(ViT(embed_dim=32, depth=2, num_heads=2, pos_embed_shape=(2, 4, 4)), tok)
    official = {}
    for k, v in mim.state_dict().items():
        k = k.removeprefix("vit.").replace("patch_embed.", "patch_embed.proj.")
        official[k] = v
    official["rope.ω0"] = torch.zeros(3)
    src = str(tmp_path / "pumit-b.ckpt")
    torch.save({"state_dict": official}, src)
    fresh = ViTForMIM(ViT(embed_dim=32, depth=2, num_heads=2, pos_embed_shape=(2, 4, 4)), tok)
    load_weights(fresh, src)
    torch.testing.assert_close(fresh.mask_token, mim.mask_token)
    down = ViT(
        in_channels=1,
        patch_size=(4, 16, 16),
        adaptive_patch_embed=False,
        embed_dim=32,
        depth=2,
        num_heads=2,
        pos_embed_shape=(3, 3, 3),
    )
    load_pretrained_vit(down, src)
    w = mim.vit.patch_embed.weight
    expected = w.reshape(32, 3, 4, 4, 16, 16).sum(dim=3).sum(dim=1, keepdim=True) / 1
    torch.testing.assert_close(down.patch_embed.weight, expected)
    torch.testing.assert_close(down.blocks[1].mlp.w3.weight, mim.vit.blocks[1].mlp.w3.weight)
