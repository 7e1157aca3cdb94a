"""Inference backends: engines agree with torch, the engine cache is keyed and rebuilt, bad cases fall back."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from monai.data import MetaTensor
from monai.inferers import SimpleInferer, SlidingWindowInferer
from monai.networks.nets import UNETR
from monai.transforms import Invertd, Resized

from common.engines import backends
from common.engines.backends import BackendInferer, CompiledNetwork, EngineError
from common.text.lvit_embed import TextPromptedInferer
from tests.conftest import BUNDLES
from tools.bundle_io import parse_bundle

pytest.importorskip("openvino", reason="the openvino backend tests need `pip install openvino`")

torch.set_num_threads(1)
_BY_NAME = {os.path.basename(b): b for b in BUNDLES}
# bundles whose inference runs one image network: (config overrides making it tiny, input shapes, inferer)
_SEGMENTERS = {
    "unetr_btcv_segmentation": (
        {
            "roi_size": [32, 32, 32],
            "network_def#hidden_size": 48,
            "network_def#mlp_dim": 96,
            "network_def#num_heads": 4,
        },
        [(1, 1, 40, 36, 32)],
        "sliding",
    ),
    "pumit_btcv_segmentation": ({}, [(1, 1, 10, 40, 36)], "sliding"),
    # the demo roi 32x32x64 does not export (see the bundle docs); 64^3 and the real 96^3 do
    "clip_driven_universal_ct_segmentation": ({"roi_size": [64, 64, 64]}, [(1, 1, 72, 64, 64)], "sliding"),
    "lvit_qata_covid19_segmentation": (
        {"img_size": 64, "network_def#base_channels": 8, "num_text_tokens": 10, "text_dim": 32},
        [(1, 3, 64, 64), (1, 10, 32)],
        "text",
    ),
    "lovt_cxr_segmentation": ({"image_size": 64, "pretrained_encoder": None}, [(1, 3, 64, 64)], "simple"),
}


def _network(bundle: str, overrides: dict) -> tuple[torch.nn.Module, dict]:
    parser = parse_bundle(_BY_NAME[bundle], ["inference.json", "demo.json"])
    for key, value in overrides.items():
        parser[key] = value
    torch.manual_seed(0)
    return parser.get_parsed_content("network_def").eval(), parser


def _inferer(kind: str, parser) -> object:
    if kind == "sliding":
        return SlidingWindowInferer(parser.get_parsed_content("roi_size"), sw_batch_size=2, overlap=0.5)
    return TextPromptedInferer(embedder=None) if kind == "text" else SimpleInferer()


@pytest.mark.parametrize("bundle", sorted(_SEGMENTERS))
def test_openvino_matches_torch(bundle, tmp_path):
    overrides, shapes, kind = _SEGMENTERS[bundle]
    network, parser = _network(bundle, overrides)
    inputs = [torch.rand(s) for s in shapes]
    inner = _inferer(kind, parser)
    engine = BackendInferer(inner, "openvino", cache_dir=str(tmp_path), batch_size=2, fallback=False)
    with torch.no_grad():
        expected = inner(inputs[0], network, *inputs[1:])
        got = engine(inputs[0], network, *inputs[1:])
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-3), (got - expected).abs().max()
    assert len(list(tmp_path.glob("*.onnx"))) == 1  # one compiled window shape, the last batch padded


def _tiny_unetr() -> torch.nn.Module:
    torch.manual_seed(0)
    return UNETR(1, 3, (16, 16, 16), feature_size=4, hidden_size=32, mlp_dim=64, num_heads=2, proj_type="perceptron")


def test_onnxruntime_sliding_window_pads_last_batch(tmp_path):
    network = _tiny_unetr().eval()
    inner = SlidingWindowInferer((16, 16, 16), sw_batch_size=4, overlap=0.25)
    x = torch.rand(1, 1, 24, 20, 16)  # 2 x 2 x 1 windows... padded up to the fixed batch of 4 where short
    engine = BackendInferer(inner, "onnxruntime", cache_dir=str(tmp_path), batch_size=4, fallback=False)
    with torch.no_grad():
        expected, got = inner(x, network), engine(x, network)
    assert torch.allclose(got, expected, atol=1e-4)
    manifests = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    assert [m["inputs"] for m in manifests] == [[[[4, 1, 16, 16, 16], "float32"]]]


def test_engine_cache_keyed_by_weights_and_shape(tmp_path, monkeypatch, caplog):
    network = _tiny_unetr().eval()
    exports = []
    real_export = backends._export_onnx
    monkeypatch.setattr(backends, "_export_onnx", lambda *a: exports.append(a[1][0].shape) or real_export(*a))
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        first = CompiledNetwork(network, "openvino", cache_dir=str(tmp_path))(x)
        assert len(exports) == 1
        with caplog.at_level(logging.INFO, logger=backends.__name__):
            again = CompiledNetwork(network, "openvino", cache_dir=str(tmp_path))(x)  # a new process's view
        assert len(exports) == 1 and "loading cached engine" in caplog.text
        assert torch.equal(first, again)
        CompiledNetwork(network, "openvino", cache_dir=str(tmp_path))(torch.rand(2, 1, 16, 16, 16))
        assert len(exports) == 2  # new input shape: new entry

        inferer = BackendInferer(SimpleInferer(), "openvino", cache_dir=str(tmp_path), fallback=False)
        inferer(x, network)
        for p in network.parameters():  # e.g. a checkpoint loaded after the first case
            p.add_(0.01)
        changed = inferer(x, network)
        assert len(exports) == 3
        assert torch.allclose(changed, network(x), atol=1e-4)
    assert len(list(tmp_path.glob("*.onnx"))) == 3


def test_stale_cache_entry_is_rebuilt(tmp_path, caplog):
    network = _tiny_unetr().eval()
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        expected = CompiledNetwork(network, "openvino", cache_dir=str(tmp_path))(x)
        (onnx_path,) = tmp_path.glob("*.onnx")
        onnx_path.write_bytes(b"not a model")  # truncated / foreign file under our name
        with caplog.at_level(logging.WARNING, logger=backends.__name__):
            got = CompiledNetwork(network, "openvino", cache_dir=str(tmp_path))(x)
        assert "unreadable" in caplog.text and "rebuilding" in caplog.text
        (manifest,) = tmp_path.glob("*.json")
        manifest.write_text(json.dumps({"weights": "something else"}))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=backends.__name__):
            again = CompiledNetwork(network, "openvino", cache_dir=str(tmp_path))(x)
        assert "does not match its manifest" in caplog.text
    assert torch.equal(got, expected) and torch.equal(again, expected)


class _Unexportable(torch.nn.Module):
    """``kthvalue`` has no ONNX translation (opset 17)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.kthvalue(x, 2, dim=1, keepdim=True).values + 1


def test_missing_engine_falls_back_only_when_allowed(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if not installed
    network = _tiny_unetr().eval()
    x = torch.rand(1, 1, 16, 16, 16)
    strict = BackendInferer(SimpleInferer(), "openvino", cache_dir=str(tmp_path), fallback=False)
    with pytest.raises(EngineError, match="pip install openvino"):
        strict(x, network)
    lenient = BackendInferer(SimpleInferer(), "openvino", cache_dir=str(tmp_path), fallback=True)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger=backends.__name__):
        out = lenient(x, network)
    assert "not installed" in caplog.text and "falling back to torch" in caplog.text
    assert torch.equal(out, network(x))


def test_uncompilable_network_falls_back_only_when_allowed(tmp_path, caplog):
    x = torch.rand(2, 3)
    strict = BackendInferer(SimpleInferer(), "onnxruntime", cache_dir=str(tmp_path), fallback=False)
    with pytest.raises(EngineError, match="ONNX export of _Unexportable failed: .*kthvalue"):
        strict(x, _Unexportable())
    lenient = BackendInferer(SimpleInferer(), "onnxruntime", cache_dir=str(tmp_path), fallback=True)
    with caplog.at_level(logging.WARNING, logger=backends.__name__):
        out = lenient(x, _Unexportable())
    assert "falling back to torch" in caplog.text
    assert torch.equal(out, _Unexportable()(x))


def test_unsupported_precision_is_named():
    with pytest.raises(EngineError, match="onnxruntime runs float32"):
        CompiledNetwork(_tiny_unetr(), "onnxruntime", precision="bfloat16")
    with pytest.raises(ValueError, match="unknown backend 'tensorrt'"):
        BackendInferer(SimpleInferer(), "tensorrt")


# bundles whose CPU default is an engine: not the pretraining bundles (their encoders return dicts) nor the
# Universal Model (OpenVINO agrees and is 1.5x faster, but peaks at 6.2 GB against torch's 3.8 GB)
_ENGINE_DEFAULT = set(_SEGMENTERS) - {"clip_driven_universal_ct_segmentation"}


@pytest.mark.parametrize("bundle", sorted(_BY_NAME))
def test_inference_configs_expose_backend(bundle):
    """Inference and evaluation go through ``BackendInferer``: engine on CPU where it agrees, torch on CUDA."""
    for name in (["inference.json"], ["train.json", "evaluate.json"]):
        parser = parse_bundle(_BY_NAME[bundle], name)
        cpu_default = "openvino" if bundle in _ENGINE_DEFAULT else "torch"
        assert parser.get_parsed_content("backend") == ("torch" if torch.cuda.is_available() else cpu_default)
        assert parser.get_parsed_content("precision") in backends.PRECISIONS["torch"]
        assert "common.engines.backends.BackendInferer" in json.dumps(parser.config), name


def test_benchmark_agreement_metrics():
    """The benchmark's agreement columns: equal labels and Dice of label maps, softmax and sigmoid."""
    from tools.benchmarks.inference import _agreement

    ref = torch.zeros(1, 3, 4, 5)
    ref[:, 0] = 1.0
    ref[:, 1, :2] = 2.0  # class 1 on 10 of 20 pixels, class 0 elsewhere
    moved = ref.clone()
    moved[:, 1, :2, 0] = 0.0  # 2 of those pixels go back to class 0
    result = _agreement(torch.softmax(moved, 1), torch.softmax(ref, 1), "softmax")
    assert result["label_agreement"] == pytest.approx(18 / 20)
    assert result["dice"] == pytest.approx((2 * 8 / 18 + 2 * 10 / 22) / 2)
    same = _agreement(torch.sigmoid(ref), torch.sigmoid(ref), "sigmoid")
    assert same == {"max_abs_diff": 0.0, "label_agreement": 1.0, "dice": 1.0}


@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
def test_engine_output_keeps_the_input_trace_so_invertd_restores_the_size(backend, tmp_path):
    """2D bundles (and MONAI Label) undo ``Resized`` with ``Invertd``, which reads the trace off the prediction."""
    pytest.importorskip(backend)
    preprocessing = Resized(keys="image", spatial_size=(16, 16))
    data = preprocessing({"image": MetaTensor(torch.rand(3, 32, 24))})
    network = torch.nn.Conv2d(3, 1, 3, padding=1).eval()
    engine = BackendInferer(SimpleInferer(), backend, cache_dir=str(tmp_path), fallback=False)
    with torch.no_grad():
        data["pred"] = engine(data["image"][None], network)[0]
    assert isinstance(data["pred"], MetaTensor)
    restored = Invertd(keys="pred", transform=preprocessing, orig_keys="image")(data)["pred"]
    assert restored.shape == (1, 32, 24)


_FORK_AFTER_ENGINE = """
import gc, os, sys, time
import torch
from common.engines.backends import CompiledNetwork
engine = CompiledNetwork(torch.nn.Conv2d(1, 1, 3).eval(), "openvino", cache_dir=sys.argv[1])
engine(torch.rand(1, 1, 8, 8))
pid = os.fork()
if pid == 0:  # a DataLoader worker: the parent's engine is freed here by the garbage collector
    del engine
    gc.collect()
    os._exit(0)
deadline = time.time() + 60
while time.time() < deadline:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        sys.exit(os.waitstatus_to_exitcode(status))
    time.sleep(0.2)
os.kill(pid, 9)
sys.exit("the forked child hung freeing the parent's engine")
"""


def test_engine_freed_in_a_forked_child_does_not_hang_it(tmp_path):
    """MONAI Label trains (forking DataLoader workers) in the process that compiled engines to serve labels."""
    result = subprocess.run(
        [sys.executable, "-c", _FORK_AFTER_ENGINE, str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
