"""``python -m tools prepare pumit SRC OUT``: decode, resample and normalise every PUMIT image once.

``SRC`` is a PUMIT data list (JSON, or a folder holding ``datalist.json``) of NIfTI / PNG / DICOM images.
Each image is read depth-first and normalised to [0, 1] (``common.data.pumit.read_image``), cropped to its
foreground (values above 0), resized in-plane so the shorter side is at most ``max_in_plane`` (spacing
scaled to match) and written as a float16 ``(D, H, W)`` array ``OUT/data/<split>/<n>.npy``.
``OUT/datalist.json`` lists them with ``spacing`` and ``shape`` (the official ``images-meta.csv``), in the
same data-list format, so training points ``dataset_dir`` at ``OUT`` and reads arrays instead of decoding
the originals every epoch. ``OUT`` must not hold a data list already (nothing is overwritten).
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from monai.transforms import CropForeground

from common.data.pumit import load_pumit_datalist, read_image


def _prepare_one(path: str, spacing: list[float] | None, max_in_plane: int) -> tuple[np.ndarray, list[float]]:
    arr, sp = read_image(path, spacing)
    arr = np.asarray(CropForeground(select_fn=lambda x: x > 0, allow_smaller=True)(arr))
    sp = list(sp)
    short = min(arr.shape[2:])
    if short > max_in_plane:
        size = [round(s * max_in_plane / short) for s in arr.shape[2:]]
        resized = torch.nn.functional.interpolate(torch.from_numpy(arr)[None], size=[arr.shape[1], *size], mode="area")
        sp = [sp[0], sp[1] * arr.shape[2] / size[0], sp[2] * arr.shape[3] / size[1]]
        arr = resized[0].numpy()
    return arr[0].astype(np.float16), sp


def main(src: str, out: str, max_in_plane: int = 512) -> str:
    """Write ``OUT/data/<split>/<n>.npy`` and ``OUT/datalist.json``; return the data list path."""
    datalist = os.path.join(src, "datalist.json") if os.path.isdir(src) else src
    target = os.path.join(out, "datalist.json")
    if os.path.exists(target):
        raise FileExistsError(f"{target} already exists; choose an empty output folder (nothing is overwritten).")
    with open(datalist) as f:
        content = json.load(f)
    prepared: dict = {"datasets": content.get("datasets", {})}
    for split in ("training", "validation"):
        if split not in content:
            continue
        folder = os.path.join(out, "data", split)
        os.makedirs(folder, exist_ok=True)
        entries = []
        for n, (item, raw) in enumerate(zip(load_pumit_datalist(datalist, split), content[split])):
            arr, spacing = _prepare_one(item["image"], raw.get("spacing"), max_in_plane)
            name = f"{n:06d}.npy"
            if os.path.exists(os.path.join(folder, name)):
                raise FileExistsError(f"{os.path.join(folder, name)} already exists; nothing is overwritten.")
            np.save(os.path.join(folder, name), arr)
            entries.append(
                {
                    "image": f"data/{split}/{name}",
                    "dataset": item["dataset"],
                    "spacing": spacing,
                    "shape": list(arr.shape),
                    "source": os.path.relpath(item["image"], out),
                }
            )
        prepared[split] = entries
    with open(target + ".tmp", "w") as f:  # the data list appears only once every array is written
        f.write(json.dumps(prepared, indent=4) + "\n")
    os.replace(target + ".tmp", target)
    print(f"wrote {sum(len(v) for k, v in prepared.items() if k != 'datasets')} arrays and {target}")
    return target
