"""The exported LoVT encoder loads into MONAI FlexibleUNet / resnet50 / LoVTSegNet and gives the same features."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import FlexibleUNet, resnet50

from common.networks.lovt import LoVTImageEncoder, LoVTSegNet
from common.weights.lovt import export_image_encoder, extract_lovt_image_encoder, image_encoder_weights


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    encoder = LoVTImageEncoder(d_z=16, hidden_dim=32).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics so a wrong mapping would show
        for m in encoder.backbone.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    folder = tmp_path_factory.mktemp("lovt")
    full = {f"image_encoder.{k}": v for k, v in encoder.state_dict().items()}  # as in the pretraining model.pt
    torch.save(full, folder / "model.pt")
    path = export_image_encoder(str(folder / "model.pt"), str(folder / "resnet50_encoder.pt"))
    return encoder, path


def test_export_loads_into_flexible_unet_with_same_features(exported):
    encoder, path = exported
    state = torch.load(path, weights_only=True)
    assert "conv1.weight" in state and not any(k.startswith(("fc.", "backbone.")) for k in state)
    unet = FlexibleUNet(in_channels=3, out_channels=1, backbone="resnet50", spatial_dims=2).eval()
    unet.encoder.load_state_dict(state)  # strict, no key editing
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(unet.encoder(x), encoder.backbone(x), strict=True):
            torch.testing.assert_close(a, b)


def test_export_loads_into_monai_resnet50(exported):
    encoder, path = exported
    net = resnet50(
        pretrained=path, spatial_dims=2, n_input_channels=3, conv1_t_stride=2, feed_forward=False, bias_downsample=False
    ).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(net(x), encoder.backbone(x)[-1].mean((2, 3)))


def test_segnet_initialises_from_export(exported):
    encoder, path = exported
    net = LoVTSegNet(head="linear", encoder_weights=image_encoder_weights(path)).eval()
    for key, value in encoder.backbone.state_dict().items():
        torch.testing.assert_close(net.encoder.state_dict()[key], value)
    with pytest.raises(KeyError, match="no ResNet50"):
        extract_lovt_image_encoder({"foo": torch.zeros(1)})
