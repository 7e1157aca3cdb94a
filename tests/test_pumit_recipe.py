"""PUMIT recipe elements: step-wise warm-up cosine schedule, gradient clipping, 8-flip TTA, CHAOS overlay,
pre-training scale augmentation and offline preparation."""

from __future__ import annotations

import math
import os

import pytest
import torch
from monai.bundle import ConfigParser
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.inferers import SimpleInferer

from common.engines.pumit import FlipTTAInferer, GradientClipHandler, WarmupCosineStepLR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BTCV = os.path.join(ROOT, "bundles", "pumit_btcv_segmentation", "configs")
PRETRAIN = os.path.join(ROOT, "bundles", "pumit_pretraining", "configs")


def _parser(folder: str, files: list[str]) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([os.path.join(folder, f) for f in files])
    return parser


def _lrs(scheduler: WarmupCosineStepLR, steps: int) -> list[float]:
    lrs = []
    for _ in range(steps):
        lrs.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return lrs


def test_schedule_values_at_given_steps():
    """BTCV/CHAOS recipe: timm cosine, warm-up prefix 5000, t_initial = max_steps 50000, lr_min 1e-6, every 100."""
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    sched = WarmupCosineStepLR(opt, warmup_steps=5000, t_initial=50000, lr_min=1e-6, update_every=100)
    expected = {
        0: 0.0,
        99: 0.0,  # held until the next update
        100: 1e-4 * 100 / 5000,
        2550: 1e-4 * 2500 / 5000,
        5000: 1e-4,
        30000: 1e-6 + 0.5 * (1e-4 - 1e-6),  # (30000 - 5000) / 50000 = 1/2: cos(pi/2) = 0
        49999: 1e-6 + 0.5 * (1e-4 - 1e-6) * (1 + math.cos(math.pi * 44900 / 50000)),
    }
    for step, lr in expected.items():
        assert sched.lr_at(step, 1e-4) == pytest.approx(lr, rel=1e-9, abs=1e-15), step
    # stepping the scheduler once per iteration gives the same values as the closed form
    sched = WarmupCosineStepLR(opt, warmup_steps=50, t_initial=300, lr_min=1e-6, update_every=10)
    lrs = _lrs(sched, 400)
    assert lrs[:10] == [0.0] * 10
    assert lrs[10] == pytest.approx(1e-4 * 10 / 50)
    assert lrs[55] == pytest.approx(1e-4)  # t = 50: end of warm-up, start of the cosine
    assert lrs[200] == pytest.approx(1e-6 + 0.5 * (1e-4 - 1e-6) * (1 + math.cos(math.pi * 150 / 300)))
    assert lrs[399] == pytest.approx(1e-6)  # past warm-up + t_initial: held at lr_min
    assert len(set(lrs[60:70])) == 1 and lrs[60] != lrs[70]


def _clip_trainer(max_norm: float | None) -> tuple[SupervisedTrainer, list[float]]:
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 1)
    data = [{"image": torch.randn(2, 4) * 100, "label": torch.full((2, 1), 1e3)}]
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=data,
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.0),
        loss_function=torch.nn.MSELoss(),
        train_handlers=[GradientClipHandler(max_norm)] if max_norm else [],
    )
    norms: list[float] = []
    trainer.add_event_handler(
        IterationEvents.BACKWARD_COMPLETED,
        lambda e: norms.append(float(torch.cat([p.grad.flatten() for p in net.parameters()]).norm())),
    )
    return trainer, norms


def test_gradient_clip_before_optimiser_step():
    trainer, norms = _clip_trainer(None)
    trainer.run()
    assert norms[0] > 10.0  # the unclipped gradient is large
    trainer, norms = _clip_trainer(1.0)
    trainer.run()
    assert norms[0] == pytest.approx(1.0, rel=1e-5)


def test_flip_tta_equals_hand_written_average():
    torch.manual_seed(0)
    net = torch.nn.Conv3d(2, 3, 3, padding=1).eval()  # not flip-equivariant
    x = torch.randn(1, 2, 4, 6, 5)
    flips = [[], [2], [3], [4], [2, 3], [2, 4], [3, 4], [2, 3, 4]]
    with torch.no_grad():
        expected = sum(
            torch.flip(net(torch.flip(x, f) if f else x).softmax(1), f) if f else net(x).softmax(1) for f in flips
        ) / len(flips)
        got = FlipTTAInferer(SimpleInferer())(x, net)
        plain = FlipTTAInferer(SimpleInferer(), enabled=False)(x, net)
    assert len(FlipTTAInferer(SimpleInferer()).flips) == 8
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(plain, net(x).softmax(1).detach(), atol=1e-6)
    assert not torch.allclose(got, plain, atol=1e-4)


def test_btcv_configs_carry_the_recipe():
    train = _parser(BTCV, ["train.json"])
    assert train["max_steps"] == 50000 and train["warmup_steps"] == 5000 and train["lr_update_every"] == 100
    assert train["lr_scheduler"]["_target_"].endswith("WarmupCosineStepLR")
    handlers = {h["_target_"]: h for h in train["train"]["handlers"]}
    assert handlers["common.engines.pumit.GradientClipHandler"]["max_norm"] == "@grad_clip_norm"
    assert train["grad_clip_norm"] == 1.0 and train["lr_epoch_level"] is False
    evaluate = _parser(BTCV, ["train.json", "evaluate.json"])
    assert evaluate["tta"] is True
    inferer = evaluate.get_parsed_content("validate#inferer", instantiate=True)
    assert isinstance(inferer, FlipTTAInferer) and len(inferer.flips) == 8
    infer = _parser(BTCV, ["inference.json"])
    assert infer["tta"] is False
    assert len(infer.get_parsed_content("inferer", instantiate=True).inferer.flips) == 1


def _write_chaos_case(folder: str, channels: int, label: bool, seed: int) -> None:
    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    affine = np.diag([1.6, 1.6, 9.0, 1.0])
    shape = (40, 40, 6)
    img = rng.uniform(1, 500, (*shape, channels)).astype(np.float32)
    nib.save(nib.Nifti1Image(img if channels > 1 else img[..., 0], affine), os.path.join(folder, "image.nii.gz"))
    if label:
        lab = rng.integers(0, 5, shape).astype(np.uint8)
        nib.save(nib.Nifti1Image(lab, affine), os.path.join(folder, "label.nii.gz"))


def test_chaos_overlay_two_channels_and_recipe(tmp_path):
    from common.data.pumit import chaos_datalist

    for case, label in (("1", True), ("2", True)):
        _write_chaos_case(str(tmp_path / "Train" / case / "T1DUAL"), 2, label, int(case))
        _write_chaos_case(str(tmp_path / "Train" / case / "T2SPIR"), 1, label, 10 + int(case))
    parser = _parser(BTCV, ["train.json", "train_chaos.json"])
    assert parser["pixdim"] == [9.0, 1.62109, 1.62109] and parser["roi_size"] == [32, 192, 192]
    assert parser["batch_size"] == 8 and parser["num_classes"] == 5
    assert parser.get_parsed_content("vit_def#pos_embed_shape") == [8, 12, 12]
    assert parser.get_parsed_content("vit_def#in_channels") == 2
    parser["dataset_dir"] = str(tmp_path)
    parser["val_cases"] = ["2"]
    parser["roi_size"] = [4, 32, 32]
    train = parser.get_parsed_content("train#dataset#data")
    assert [os.path.basename(os.path.dirname(d["image"])) for d in train] == ["T1DUAL", "T2SPIR"]
    assert len(parser.get_parsed_content("validate#dataset#data")) == 2
    transform = parser.get_parsed_content("train#preprocessing")
    for item in train:  # in/out phase and T2SPIR (repeated) both reach the network as 2 z-scored channels
        out = transform(item)
        assert tuple(out["image"].shape) == (2, 4, 32, 32) and tuple(out["label"].shape) == (1, 4, 32, 32)
        assert float(out["image"].mean()) == pytest.approx(0.0, abs=0.6)
    parser["vit_def#embed_dim"], parser["vit_def#depth"], parser["vit_def#num_heads"] = 32, 4, 2
    parser["vit_def#pos_embed_shape"] = [1, 2, 2]
    parser["network_def#out_indexes"] = [0, 1, 2, 3]
    parser["network_def#decoder_channels"], parser["network_def#full_res_channels"] = [16] * 4, [8, 8, 16]
    net = parser.get_parsed_content("network_def").eval()
    with torch.no_grad():
        assert tuple(net(torch.randn(1, 2, 8, 32, 32)).shape) == (1, 5, 8, 32, 32)
    with pytest.raises(FileNotFoundError, match="label"):
        os.remove(tmp_path / "Train" / "2" / "T2SPIR" / "label.nii.gz")
        chaos_datalist(str(tmp_path))


def test_chaos_submission_round_trip(tmp_path):
    import numpy as np
    from monai.data import MetaTensor
    from PIL import Image

    from common.data.pumit import CHAOS_LABEL_VALUES, CHAOSSubmissionWriterd, chaos_label_from_png

    rng = np.random.default_rng(0)
    pngs = [np.asarray(CHAOS_LABEL_VALUES, np.uint8)[rng.integers(0, 5, (6, 5))] for _ in range(3)]
    label = chaos_label_from_png(pngs)  # the voxel grid of image.nii.gz
    pred = MetaTensor(torch.as_tensor(label)[None], meta={"filename_or_obj": "/x/Test/7/T2SPIR/image.nii.gz"})
    CHAOSSubmissionWriterd("pred", output_dir=str(tmp_path))({"pred": pred})
    written = sorted((tmp_path / "Task5" / "MR" / "7" / "T2SPIR" / "Results").glob("*.png"))
    assert [p.name for p in written] == ["result000.png", "result001.png", "result002.png"]
    for png, path in zip(pngs, written):
        assert np.array_equal(np.asarray(Image.open(path)), png)  # exact inverse of the official label reading
    liver = np.asarray(Image.open(tmp_path / "Task3" / "MR" / "7" / "T2SPIR" / "Results" / "result001.png"))
    assert np.array_equal(liver, np.where(pngs[1] == 63, 63, 0))
    with pytest.raises(ValueError, match="grey values"):
        chaos_label_from_png([np.full((2, 2), 7, np.uint8)])


def test_chaos_template_tree(tmp_path):
    from common.data.pumit import chaos_submission_template

    chaos_submission_template(str(tmp_path))
    dirs = {os.path.relpath(r, tmp_path) for r, _, _ in os.walk(tmp_path)} - {"."}
    assert len(dirs) == 1052 - 0  # the official template zip lists 1052 folders
    assert os.path.isdir(tmp_path / "Task3" / "MR" / "40" / "T1DUAL" / "Results")
    assert not os.path.exists(tmp_path / "Task3" / "CT")


def test_chaos_inference_overlay_parses(tmp_path):
    parser = _parser(BTCV, ["inference.json", "inference_chaos.json"])
    parser["output_dir"] = str(tmp_path)
    assert parser["tta"] is True  # the official CHAOS prediction always uses the 8 flips
    assert len(parser.get_parsed_content("inferer").inferer.flips) == 8
    names = [type(t).__name__ for t in parser.get_parsed_content("postprocessing").transforms]
    assert names == ["Invertd", "AsDiscreted", "CHAOSSubmissionWriterd"]
    parser.get_parsed_content("submission_template")
    assert os.path.isdir(tmp_path / "submit" / "Task5" / "MR" / "1" / "T2SPIR" / "Results")


def _da_formula(spacing, scale) -> int:
    r = min(max(spacing[0] * scale[0] / (min(spacing[1:]) * scale[1]), 1.0), 32.0)
    return int(math.floor(math.log2(r) + 1e-9))


def test_scale_augmentation_changes_da_as_the_formula_says():
    from common.data.pumit import RandScaleDABatchSampler

    data = [
        {"spacing": [3.0, 0.75, 0.75], "weight": 1.0},  # DA 2 unscaled
        {"spacing": [1.0, 1.0, 1.0], "weight": 1.0},  # isotropic: depth scale allowed
        {"spacing": [1e8, 0.2, 0.2], "weight": 1.0},  # 2D: DA 5 whatever the scale
    ]
    fixed = RandScaleDABatchSampler(data, 2, 1, scale_x=(2.0, 2.0), scale_x_p=1.0, scale_z_p=0.0)
    assert fixed.draw(0) == {"aniso_d": 1, "scale": (1.0, 2.0, 2.0)}  # r = 3 / 1.5 = 2
    assert fixed.draw(2)["aniso_d"] == 5
    sampler = RandScaleDABatchSampler(data, batch_size=4, num_batches=50, seed=1, buffer_size=64)
    seen_da, seen_z = set(), set()
    for batch in sampler:
        assert len(batch) == 4 and len({t["aniso_d"] for _, t in batch}) == 1  # one DA per batch
        for index, trans in batch:
            spacing, scale = data[index]["spacing"], trans["scale"]
            assert trans["aniso_d"] == _da_formula(spacing, scale)
            assert 0.75 <= scale[1] <= 2.0 and scale[1] == scale[2] and 0.8 <= scale[0] <= 1.25
            if spacing[0] > 1.5 * min(spacing[1:]):
                assert scale[0] == 1.0  # depth scale only for near-isotropic images
            if index == 0:
                seen_da.add(trans["aniso_d"])
            if index == 1:
                seen_z.add(scale[0] != 1.0)
    assert seen_da == {1, 2} and seen_z == {True, False}  # the 3 mm CT lands in two DA buckets
    # in-plane scale capped by the image size: 100 px wide, crop 16 * 10 px -> scale_x <= 100 / 160 -> 0.75
    capped = RandScaleDABatchSampler([{"spacing": [1, 1, 1], "shape": [1, 50, 100, 100]}], 1, 1, scale_x_p=1.0)
    assert capped.draw(0)["scale"][1] == 0.75
    # batches are dealt round-robin to ranks
    ranks = [list(RandScaleDABatchSampler(data, 2, 6, seed=3, rank=r, num_replicas=2)) for r in (0, 1)]
    single = list(RandScaleDABatchSampler(data, 2, 12, seed=3))
    assert ranks[0] == single[0::2] and ranks[1] == single[1::2]


def test_scaled_crop_and_loader_agree_with_the_sampler(tmp_path):
    import nibabel as nib
    import numpy as np
    from monai.transforms import Compose

    from common.data.pumit import LoadPUMITImaged, PUMITCropd, PUMITSampledDataset

    path = str(tmp_path / "ct.nii.gz")
    vol = np.random.default_rng(0).uniform(0, 100, (64, 64, 24)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.diag([0.75, 0.75, 3.0, 1.0])), path)
    crop = PUMITCropd("image", tz=2, tx=2)
    dataset = PUMITSampledDataset([{"image": path}], Compose([LoadPUMITImaged("image"), crop]))
    plain = dataset[0]
    assert plain["aniso_d"] == 2 and tuple(plain["image"].shape) == (1, 8, 32, 32)
    scaled = dataset[(0, {"aniso_d": 1, "scale": (1.0, 2.0, 2.0)})]
    assert scaled["aniso_d"] == 1  # the loader recomputes DA from spacing * scale: same as the sampler
    assert tuple(scaled["image"].shape) == (1, 16, 32, 32)  # (tz * 16 >> 1, 16 tx, 16 tx)
    assert scaled["spacing"].tolist() == pytest.approx([3.0, 1.5, 1.5])


def test_prepare_writes_arrays_and_manifest(tmp_path):
    import json

    import nibabel as nib
    import numpy as np
    from PIL import Image

    from common.data.pumit import LoadPUMITImaged, load_pumit_datalist, read_image
    from tools.preparers.pumit import main as prepare

    src = tmp_path / "raw"
    src.mkdir()
    vol = np.zeros((40, 36, 10), np.float32)
    vol[4:30, 6:34, 2:9] = np.random.default_rng(0).uniform(10, 100, (26, 28, 7))  # foreground box
    nib.save(nib.Nifti1Image(vol, np.diag([0.8, 0.8, 4.0, 1.0])), str(src / "ct.nii.gz"))
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (30, 20), dtype=np.uint8)).save(src / "x.png")
    listing = {
        "datasets": {"ct": {"weight": 2.0}},
        "training": [{"image": "ct.nii.gz", "dataset": "ct"}, {"image": "x.png", "spacing": [0.2, 0.2]}],
        "validation": [{"image": "ct.nii.gz", "dataset": "ct"}],
    }
    (src / "datalist.json").write_text(json.dumps(listing))
    out = tmp_path / "prepared"
    target = prepare(str(src), str(out), max_in_plane=14)
    items = load_pumit_datalist(target)
    assert [i["weight"] for i in items] == [2.0, 1.0]
    assert [i["aniso_d"] for i in items] == [1, 5]  # resizing makes r = 4 / (0.8 * 26 / 14) = 2.7
    ct, xray = items
    arr = np.load(ct["image"])
    assert arr.dtype == np.float16 and arr.shape == (7, 14, 15)  # foreground crop 7 x 26 x 28, short side -> 14
    assert ct["spacing"] == pytest.approx([4.0, 0.8 * 26 / 14, 0.8 * 28 / 15])
    original, _ = read_image(str(src / "x.png"))
    _, _, h, w = original.shape
    assert ct["shape"] == [7, 14, 15] and xray["shape"] == [1, round(h * 14 / w), 14]
    assert xray["spacing"] == pytest.approx([1e8, 0.2 * h / xray["shape"][1], 0.2 * w / 14])
    loaded = LoadPUMITImaged("image")(dict(xray))  # training reads the array, spacing from the manifest
    assert tuple(loaded["image"].shape) == (1, *xray["shape"]) and loaded["aniso_d"] == 5
    assert loaded["spacing"].tolist() == pytest.approx(xray["spacing"])
    with pytest.raises(FileExistsError, match="overwritten"):
        prepare(str(src), str(out))


def test_lpips_only_from_local_weights(tmp_path):
    from common.losses.pumit import LPIPS, TokenizerLoss, _vgg16_features

    with pytest.raises(FileNotFoundError, match="never downloaded"):
        LPIPS(str(tmp_path / "vgg16.pth"), str(tmp_path / "vgg.pth"))
    torch.manual_seed(0)
    torch.save({f"features.{k}": v for k, v in _vgg16_features().state_dict().items()}, tmp_path / "vgg16.pth")
    torch.save(
        {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate([64, 128, 256, 512, 512])},
        tmp_path / "vgg.pth",
    )
    parser = _parser(PRETRAIN, ["train.json"])
    assert parser.get_parsed_content("perceptual") is None  # off unless weights are given
    parser["lpips_vgg_weights"] = str(tmp_path / "vgg16.pth")
    parser["lpips_lin_weights"] = str(tmp_path / "missing.pth")
    with pytest.raises(Exception, match="lin_weights"):
        parser.get_parsed_content("perceptual")
    parser["lpips_lin_weights"] = str(tmp_path / "vgg.pth")
    lpips = parser.get_parsed_content("perceptual")
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    assert float(lpips(x, x)) == pytest.approx(0.0, abs=1e-6) and float(lpips(x, y)) > 0
    loss = TokenizerLoss(perceptual=lpips, max_perceptual_slices=2).train()
    assert not lpips.training
    logits = torch.randn(1, 2, 2, 2, 8)
    out = {"pred": y[:1, :, None].expand(1, 3, 3, 32, 32), "logits": logits, "probs": logits.softmax(-1)}
    with_lpips = loss(out, x[:1, :, None].expand(1, 3, 3, 32, 32))
    assert float(with_lpips) > float(TokenizerLoss()(out, x[:1, :, None].expand(1, 3, 3, 32, 32)))


def test_prior_term_matches_the_official_formula(monkeypatch):
    """Official soft quantizer: p_mean = all_gather(p_mean.detach()).mean(0) - p_mean.detach() + p_mean,
    loss = sum p_mean log p_mean; the value uses every rank, the gradient only the local part."""
    import torch.distributed as dist

    from common.losses import pumit as losses

    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, 16, requires_grad=True)
    probs = logits.softmax(-1)
    local = probs.flatten(0, -2).mean(0)
    assert float(losses.prior_entropy_loss(probs)) == pytest.approx(float((local * local.log()).sum()), rel=1e-6)
    other = torch.rand(16).softmax(0)  # another rank's mean distribution
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_gather", lambda out, x: [out[0].copy_(x), out[1].copy_(other)])
    loss = losses.prior_entropy_loss(probs)
    both = (local + other) / 2
    assert float(loss) == pytest.approx(float((both * both.log()).sum()), rel=1e-6)
    (grad,) = torch.autograd.grad(loss, logits, retain_graph=True)
    official = torch.stack([local.detach(), other]).mean(0) - local.detach() + local  # gradient: local part only
    (expected,) = torch.autograd.grad((official * official.log()).sum(), logits)
    assert torch.allclose(grad, expected, atol=1e-7) and float(grad.abs().sum()) > 0


def test_codebook_usage_handler_counts_codes_and_perplexity():
    from ignite.engine import Engine

    from common.engines.pumit import CodebookUsageHandler

    eye = torch.eye(8)
    batches = [eye[[0, 0, 1, 1]], eye[[2, 2, 3, 3]]]  # epoch: 4 codes used, uniform over them

    def step(engine, batch):
        return [{"pred": {"probs": batch[:2]}}, {"pred": {"probs": batch[2:]}}]  # decollated

    engine = Engine(step)
    monitor = CodebookUsageHandler()
    monitor.attach(engine)
    engine.run(batches, max_epochs=2)
    assert monitor.history == [
        {"epoch": 1, "used": 4, "perplexity": pytest.approx(4.0)},
        {"epoch": 2, "used": 4, "perplexity": pytest.approx(4.0)},
    ]


def test_codebook_monitor_only_in_the_tokenizer_stage():
    from common.engines.pumit import CodebookUsageHandler

    tok = _parser(PRETRAIN, ["train.json"])
    index = [h["_target_"] for h in tok["train"]["handlers"]].index("common.engines.pumit.CodebookUsageHandler")
    assert isinstance(tok.get_parsed_content(f"train#handlers#{index}"), CodebookUsageHandler)
    mim = _parser(PRETRAIN, ["train.json", "train_mim.json"])
    assert mim.get_parsed_content(f"train#handlers#{index}") is None  # MIM outputs carry no code probabilities
