"""Synthetic QaTa-COV19-like demo data: faint chest-X-ray-like PNGs whose lesion zones are written in the text.

The lesions are low-contrast blobs inside the lung thirds that the QaTa-style sentence names; look-alike blobs
(not labelled) sit in the other lung thirds, so only the text tells the network which opacities are lesions.
The tree is exactly QaTa's (``img/covid_k.png``, ``labelcol/mask_covid_k.png``, ``<Split>_text.xlsx``); a small
random-BERT vocabulary is written to ``text_encoder/`` for offline embedding.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from ..data.lvit_templates import QATA_WORDS, ZONES, describe, lung_ellipses, zone_mask

__all__ = ["demo_word_embedder", "make_lvit_demo"]


def _random_zones(rng: np.random.Generator) -> set[tuple[str, str]]:
    sides = [s for s in ("left", "right") if rng.random() < 0.5] or [str(rng.choice(["left", "right"]))]
    zones = set()
    for side in sides:
        start = int(rng.integers(0, 3))
        stop = int(rng.integers(start + 1, 4)) if rng.random() < 0.5 else start + 1
        zones |= {(side, z) for z in ZONES[start:stop]}
    return zones


def _chest(size: int, rng: np.random.Generator) -> np.ndarray:
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32)
    img = np.full((size, size), 40.0, dtype=np.float32)
    img[((rows - 0.55 * size) / (0.48 * size)) ** 2 + ((cols - 0.5 * size) / (0.45 * size)) ** 2 <= 1] = 150.0
    for cr, cc, rr, rc in lung_ellipses(size).values():
        img[((rows - cr) / rr) ** 2 + ((cols - cc) / rc) ** 2 <= 1] = 75.0
    img[np.abs(cols - 0.5 * size) < 0.04 * size] = 170.0
    return img + rng.normal(0, 8.0, img.shape).astype(np.float32)


def _blobs(size: int, allowed: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """A mask of ``count`` merged round blobs centred inside ``allowed`` and clipped to it."""
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32)
    field = np.zeros((size, size), dtype=np.float32)
    ys, xs = np.nonzero(allowed)
    for _ in range(count):
        k = int(rng.integers(0, len(ys)))
        r = rng.uniform(0.04, 0.07) * size
        field += np.exp(-((rows - ys[k]) ** 2 + (cols - xs[k]) ** 2) / (2 * r**2))
    return ((field > 0.5) & allowed).astype(np.float32)


def _opacities(
    size: int, zones: set[tuple[str, str]], distractors: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """The lesion mask (blobs in the named zones) and a distractor mask (look-alike blobs elsewhere in the lungs).

    The distractors are what makes the text informative: from the image alone a lesion and a
    distractor are indistinguishable, the sentence says which zones are infected.
    """
    named = zone_mask(zones, size) > 0
    lesion = _blobs(size, named, 2 * len(zones), rng)
    others = (zone_mask({(s, z) for s in ("left", "right") for z in ZONES}, size) > 0) & ~named
    if distractors == 0 or not others.any():
        return lesion, np.zeros_like(lesion)
    return lesion, _blobs(size, others, distractors, rng)


def make_lvit_demo(
    dataset_dir: str,
    n_train: int = 24,
    n_val: int = 8,
    n_test: int = 8,
    size: int = 224,
    contrast: float = 6.0,
    distractors: int = 2,
    seed: int = 0,
) -> str:
    """Write the demo tree to ``dataset_dir`` (skipped when already complete) and return ``dataset_dir``.

    ``contrast`` is the lesion brightness over lung tissue in grey levels (noise sigma 8), faint on purpose.
    ``distractors`` look-alike blobs are added outside the named zones (none when every zone is named).
    """
    from openpyxl import Workbook

    counts = {"Train": n_train, "Val": n_val, "Test": n_test}
    done = os.path.join(dataset_dir, ".lvit_demo_complete")
    if os.path.isfile(done):
        return dataset_dir
    for split in counts:
        if os.path.exists(os.path.join(dataset_dir, f"{split}_Folder")):
            raise FileExistsError(
                f"{dataset_dir}/{split}_Folder exists but is not a complete demo; refusing to overwrite"
            )
    rng = np.random.default_rng(seed)
    index = 0
    for split, n in counts.items():
        folder = os.path.join(dataset_dir, f"{split}_Folder")
        for sub in ("img", "labelcol"):
            os.makedirs(os.path.join(folder, sub), exist_ok=True)
        book = Workbook()
        sheet = book.active
        sheet.append(["Image", "Description"])
        for _ in range(n):
            index += 1
            zones = _random_zones(rng)
            mask, distractor = _opacities(size, zones, distractors, rng)
            opacity = np.maximum(mask, distractor)
            img = np.clip(_chest(size, rng) + contrast * opacity, 0, 255).astype(np.uint8)
            name = f"covid_{index}.png"
            Image.fromarray(img).convert("RGB").save(os.path.join(folder, "img", name))
            Image.fromarray((mask * 255).astype(np.uint8)).save(os.path.join(folder, "labelcol", f"mask_{name}"))
            sheet.append([f"mask_{name}", describe(zones)])
        book.save(os.path.join(folder, f"{split}_text.xlsx"))
    with open(os.path.join(dataset_dir, "vocab_words.txt"), "w") as f:
        f.write("\n".join(QATA_WORDS) + "\n")
    with open(done, "w") as f:
        f.write(f"seed={seed} counts={counts}\n")
    return dataset_dir


def demo_word_embedder(dataset_dir: str, hidden_size: int = 768, num_layers: int = 1, seed: int = 0):
    """The demo's offline text encoder: a random-weight BERT over the QaTa-style vocabulary (no download).

    Its word vectors carry word identity and order, which is all the demo sentences need; real runs use
    ``bert-base-uncased``.
    """
    from ..text.lvit_embed import random_bert_word_embedder

    return random_bert_word_embedder(
        QATA_WORDS, os.path.join(dataset_dir, "text_encoder"), hidden_size=hidden_size, num_layers=num_layers, seed=seed
    )
