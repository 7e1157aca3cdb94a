"""BTCV (Synapse multi-organ CT) layout: label names, the ``dataset_0.json`` split and its datalists."""

from __future__ import annotations

import json
import os

from monai.data import load_decathlon_datalist

BTCV_LABELS: dict[int, str] = {
    0: "background",
    1: "spleen",
    2: "right kidney",
    3: "left kidney",
    4: "gallbladder",
    5: "esophagus",
    6: "liver",
    7: "stomach",
    8: "aorta",
    9: "inferior vena cava",
    10: "portal and splenic veins",
    11: "pancreas",
    12: "right adrenal gland",
    13: "left adrenal gland",
}
TRAINING_CASES = [*range(1, 11), *range(21, 35)]
VALIDATION_CASES = list(range(35, 41))
TEST_CASES = list(range(61, 81))


def btcv_split_json(training: list[int], validation: list[int], test: list[int]) -> dict:
    """The research-contributions ``dataset_0.json`` content for the given case numbers."""

    def pair(i: int) -> dict[str, str]:
        return {"image": f"imagesTr/img{i:04d}.nii.gz", "label": f"labelsTr/label{i:04d}.nii.gz"}

    return {
        "description": "btcv yucheng",
        "labels": {str(k): v for k, v in BTCV_LABELS.items()},
        "modality": {"0": "CT"},
        "name": "btcv",
        "numTest": len(test),
        "numTraining": len(training) + len(validation),
        "tensorImageSize": "3D",
        "training": [pair(i) for i in training],
        "validation": [pair(i) for i in validation],
        "test": [f"imagesTs/img{i:04d}.nii.gz" for i in test],
    }


def write_default_split(dataset_dir: str) -> str:
    """Write the reference 24/6 split as ``dataset_0.json`` (never over an existing file)."""
    path = os.path.join(dataset_dir, "dataset_0.json")
    if os.path.exists(path):
        raise FileExistsError(f"{path} already exists; refusing to overwrite it")
    with open(path, "w") as f:
        json.dump(btcv_split_json(TRAINING_CASES, VALIDATION_CASES, TEST_CASES), f, indent=4)
    return path


def btcv_datalist(dataset_dir: str, split: str = "training", datalist_json: str = "dataset_0.json") -> list[dict]:
    """Datalist of one split of ``<dataset_dir>/dataset_0.json`` with every listed file checked to exist.

    When the json is missing the reference split is written first, so a plain Decathlon-style folder
    (``imagesTr``, ``labelsTr``, ``imagesTs``) works as is.
    """
    json_path = os.path.join(dataset_dir, datalist_json)
    if not os.path.isdir(dataset_dir):
        raise FileNotFoundError(f"dataset_dir {dataset_dir!r} does not exist; point 'dataset_dir' at the BTCV folder")
    if not os.path.exists(json_path):
        write_default_split(dataset_dir)
    with open(json_path) as f:
        content = json.load(f)
    if split not in content:
        raise KeyError(f"{json_path} has no '{split}' list (found: {sorted(content)})")
    data = load_decathlon_datalist(
        json_path, is_segmentation=split != "test", data_list_key=split, base_dir=dataset_dir
    )
    for item in data:
        for key, path in item.items():
            if isinstance(path, str) and not os.path.exists(path):
                raise FileNotFoundError(f"{json_path} lists {key} {path!r} in '{split}', but that file does not exist")
    return data
