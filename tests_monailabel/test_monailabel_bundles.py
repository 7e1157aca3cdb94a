"""MONAI Label's monaibundle tasks on every bundle whose metadata lists ``supported_apps["monailabel"]``.

This runs in its own environment (``.venv-monailabel``, created by ``.ci/run``) because the real
``monailabel`` package pins its own torchvision; the main test run never collects this folder.
Each bundle is placed as ``<app>/model/<name>`` the way the monaibundle sample app installs it, with
its demo overlay merged into ``train.json``/``inference.json`` (the small network its demo weights fit).
``BundleTrainTask`` trains two epochs from a ``LocalDatastore`` with the overrides MONAI Label applies
(``train#dataset#data``, ``train#trainer#max_epochs``, ``device``, a prepended ``CheckpointLoader``);
``BundleInferTask`` then labels a demo image, and the label must come back in the input's geometry.
Training counts its trainer runs (MONAI Label's ``run_id: ""`` resolves every top-level entry: exactly
one). A second test infers at the real network size: only the demo overlay's data keys are merged.
"""

from __future__ import annotations

import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monailabel.datastore.local import LocalDatastore
from monailabel.tasks.infer.basic_infer import CallBackTypes
from monailabel.tasks.infer.bundle import BundleInferTask
from monailabel.tasks.train.bundle import BundleTrainTask
from PIL import Image

from tests.conftest import BUNDLES, demo_dataset
from tools.bundle_io import copy_bundle, load_metadata, on_sys_path

LABEL_APPS = [b for b in BUNDLES if "monailabel" in load_metadata(b).get("supported_apps", {})]
pytestmark = pytest.mark.parametrize("bundle", LABEL_APPS, ids=[os.path.basename(b) for b in LABEL_APPS])
# demo-overlay keys that only point at the demo data (or its offline text encoder), not at network size
DATA_KEYS = (
    "dataset_dir",
    "demo_data",
    "data_root",
    "word_embedder",
    "image_glob",
    "pretrained_encoder",
    "num_workers",
)
PROMPTS = ("Bilateral pulmonary infection, two infected areas.", "Unilateral pulmonary infection, one infected area.")


def _ext(path: str) -> str:
    return ".nii.gz" if path.endswith(".nii.gz") else os.path.splitext(path)[1]


def _merge_demo(root: str, config: str, dataset_dir: str, real_size: bool = False, append: dict | None = None) -> None:
    """Write ``[config, demo.json]`` merged as ``config``: the app folder holds one config per task.

    ``real_size`` keeps only the demo overlay's ``DATA_KEYS`` (the network and its input size stay real);
    ``append`` extends top-level lists.
    """
    paths = [os.path.join(root, "configs", n) for n in (config, "demo.json")]
    if real_size:
        merged = ConfigParser.load_config_files(paths[0])
        with open(paths[1]) as f:  # raw: the overlay's ``network_def#...`` keys only resolve on top of the config
            demo = json.load(f)
        merged.update({k: v for k, v in demo.items() if k in DATA_KEYS})
    else:
        merged = ConfigParser.load_config_files(paths)
    merged["dataset_dir"] = dataset_dir
    for key, value in (append or {}).items():
        merged[key] = merged.get(key, []) + value if isinstance(value, list) else value
    with open(paths[0], "w") as f:
        json.dump(merged, f, indent=4)


def _count_trainer_runs(path: str) -> dict:
    """Additions to ``train.json`` that append a line to ``path`` each time the trainer starts a run.

    The handler is attached once even when ``initialize`` is evaluated twice (MONAI's ``run`` with ``run_id ""``
    and ``init_id=None``, as MONAI Label calls it, evaluates every top-level list, ``initialize`` included).
    """
    started = f"lambda engine: open({path!r}, 'a').write('started\\n')"
    attach = "@train#trainer.add_event_handler(ignite.engine.Events.STARTED, @count_trainer_runs)"
    attached = "@train#trainer.has_event_handler(@count_trainer_runs, ignite.engine.Events.STARTED)"
    return {
        "imports": ["$import ignite"],
        "count_trainer_runs": f"${started}",
        "initialize": [f"${attached} or {attach}"],
    }


def _app_bundle(bundle: str, dataset_dir: str, app_dir: str, real_size: bool = False, runs_file: str = "") -> str:
    root = copy_bundle(bundle, os.path.join(app_dir, "model", os.path.basename(bundle)))
    if os.path.exists(os.path.join(root, "configs", "train.json")):
        _merge_demo(root, "train.json", dataset_dir, append=_count_trainer_runs(runs_file) if runs_file else None)
    _merge_demo(root, "inference.json", dataset_dir, real_size=real_size)
    return root


def _demo_records(root: str) -> list[dict]:
    """The demo training datalist (image + label files) as the merged train config reads it."""
    with on_sys_path(root):
        parser = ConfigParser()
        parser.read_config(os.path.join(root, "configs", "train.json"))
        parser["bundle_root"] = root
        return list(parser.get_parsed_content("train#dataset#data"))


def _datastore(records: list[dict], folder: str) -> LocalDatastore:
    """A MONAI Label datastore: images in ``folder``, final labels under ``labels/final`` with the same names."""
    os.makedirs(os.path.join(folder, "labels", "final"))
    extensions = set()
    for i, record in enumerate(records):
        ext = _ext(record["image"])
        extensions.add(f"*{ext}")
        shutil.copy(record["image"], os.path.join(folder, f"case_{i:03d}{ext}"))
        shutil.copy(record["label"], os.path.join(folder, "labels", "final", f"case_{i:03d}{ext}"))
    return LocalDatastore(folder, extensions=sorted(extensions), auto_reload=False)


def _initial_checkpoint(root: str) -> dict[str, torch.Tensor]:
    """Save a freshly initialised ``network_def`` as ``models/model.pt`` so training prepends MONAI Label's loader."""
    with on_sys_path(root):
        parser = ConfigParser()
        parser.read_config(os.path.join(root, "configs", "inference.json"))
        parser["bundle_root"] = root
        state = {k: v.clone() for k, v in parser.get_parsed_content("network_def").state_dict().items()}
    torch.save({"model": state}, os.path.join(root, "models", "model.pt"))
    return state


def _assert_same_geometry(label_path: str, image_path: str) -> None:
    if image_path.endswith((".nii", ".nii.gz")):
        label, image = nib.load(label_path), nib.load(image_path)
        assert label.shape[:3] == image.shape[:3], (label.shape, image.shape)
        np.testing.assert_allclose(label.affine, image.affine, atol=1e-3)
    else:
        assert Image.open(label_path).size == Image.open(image_path).size


def _infer(root: str, image: str) -> None:
    """``BundleInferTask`` labels ``image`` (once per prompt for text-prompted bundles) in its geometry."""
    task = BundleInferTask(root, {})
    assert task.is_valid()
    prompts = PROMPTS if "text" in getattr(task, "displayable_configs", {}) else (None,)
    outputs = []
    for prompt in prompts:
        seen: dict = {}
        callbacks = {
            CallBackTypes.PRE_TRANSFORMS: lambda d, seen=seen: seen.update(pre=dict(d)) or d,
            CallBackTypes.INFERER: lambda d, seen=seen: seen.update(pred=d["pred"].clone()) or d,
        }
        # a label file of integers: PNG (2D bundles) cannot hold the float labels written by default
        request = {"image": image, "device": "cpu", "result_dtype": "uint8"}
        request |= {} if prompt is None else {"text": prompt}
        label_path, _ = task(request, callbacks)
        assert os.path.isfile(label_path)
        _assert_same_geometry(label_path, image)
        if prompt is not None:
            assert torch.is_tensor(seen["pre"]["text"]), "the request text must be embedded by the preprocessing"
        outputs.append(seen["pred"])
    if len(outputs) == 2:
        assert not torch.allclose(outputs[0], outputs[1]), "the text prompt must reach the network"


def test_train_then_infer_in_monailabel(bundle, demo_data_dirs, tmp_path, tmp_path_factory):
    data = demo_dataset(bundle, demo_data_dirs, tmp_path_factory)
    runs_file = str(tmp_path / "trainer_runs.txt")
    root = _app_bundle(bundle, data, str(tmp_path / "app"), runs_file=runs_file)
    records = _demo_records(root)
    tasks = load_metadata(root).get("monailabel_tasks", ["infer", "train"])

    initial = _initial_checkpoint(root)
    if "train" in tasks:
        trainer = BundleTrainTask(root, {})
        assert trainer.is_valid()
        # 2 epochs: UNETR's official warm-up trains epoch 0 at learning rate 0
        request = {"model": os.path.basename(root), "max_epochs": 2, "device": "cpu", "val_split": 0.5}
        request.update(multi_gpu=False, pretrained=True, run_id="")  # run_id "" is what MONAI Label's clients send
        trainer(request, _datastore(records, str(tmp_path / "datastore")))
        with open(runs_file) as f:
            assert f.read().count("started") == 1, "MONAI Label's request must run the trainer exactly once"
        trained = torch.load(os.path.join(root, "models", "model.pt"), map_location="cpu", weights_only=True)
        trained = trained.get("model", trained)
        assert trained.keys() == initial.keys(), "model.pt keys must equal network_def's (loaded non-strictly)"
        assert any(not torch.equal(trained[k], initial[k]) for k in initial), "training must change the weights"
    _infer(root, records[0]["image"])


def test_infer_at_real_network_size(bundle, demo_data_dirs, tmp_path, tmp_path_factory):
    """The served network at its real size (random weights) labels a demo image through MONAI Label."""
    data = demo_dataset(bundle, demo_data_dirs, tmp_path_factory)
    root = _app_bundle(bundle, data, str(tmp_path / "app"), real_size=True)
    _initial_checkpoint(root)
    _infer(root, _demo_records(root)[0]["image"])
