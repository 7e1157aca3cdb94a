"""Synthetic chest X-ray-like data for the LoVT demos and tests.

Each image is a frontal radiograph phantom (body, two dark lung fields, mediastinum, heart, spine,
ribs) with 0-2 opacities in one of six lung zones; its report names the zones in radiological
convention (the patient's right lung is on the image's left). ``make_pretraining_demo`` writes the
MIMIC-CXR-JPG layout (JPEGs, split/metadata csv.gz, reports zip) plus a tiny offline BERT folder and
builds the study index; ``make_segmentation_demo`` writes image/mask PNG folders per split.
"""

from __future__ import annotations

import csv
import gzip
import json
import logging
import os
import zipfile

import numpy as np
from PIL import Image

from ..data.mimic_cxr import build_index, index_statistics, pixel_statistics

__all__ = ["phantom", "make_pretraining_demo", "make_segmentation_demo", "write_tiny_bert"]

logger = logging.getLogger(__name__)

# zone name -> (x, y) centre in image-relative coords; patient's right lung is on the image's left
_ZONES = {
    "right upper": (0.32, 0.35),
    "right mid": (0.30, 0.52),
    "right lower": (0.30, 0.68),
    "left upper": (0.68, 0.35),
    "left mid": (0.70, 0.52),
    "left lower": (0.70, 0.68),
}
_FINDING_TEMPLATES = (
    "There is a focal opacity in the {zone} lung zone.",
    "Patchy consolidation is seen in the {zone} lung.",
    "A rounded opacity projects over the {zone} lung zone.",
)
_NORMAL_SENTENCES = (
    "No pleural effusion or pneumothorax.",
    "The mediastinal contours are normal.",
    "No acute osseous abnormality.",
    "The lungs are otherwise clear.",
)


def phantom(rng: np.random.Generator, size: tuple[int, int], n_findings: int, cardiomegaly: bool):
    """One uint8 radiograph (H, W), its finding mask and the zones of its findings."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    image = np.full((h, w), 0.12)
    body = ((xx - 0.5) / 0.46) ** 2 + ((yy - 0.55) / 0.55) ** 2 <= 1
    image[body] = 0.55
    for cx in (0.31, 0.69):
        lung = ((xx - cx) / 0.16) ** 2 + ((yy - 0.5) / 0.3) ** 2 <= 1
        image[lung] = 0.22
        ribs = lung & (np.sin(yy * 60 + (xx - cx) ** 2 * 40) > 0.6)
        image[ribs] += 0.08
    heart_r = 0.17 if cardiomegaly else 0.12
    image[((xx - 0.54) / heart_r) ** 2 + ((yy - 0.66) / 0.13) ** 2 <= 1] = 0.7
    image[np.abs(xx - 0.5) < 0.035] = 0.8  # spine / mediastinum
    mask = np.zeros((h, w), dtype=bool)
    zones = list(rng.choice(list(_ZONES), size=n_findings, replace=False)) if n_findings else []
    for zone in zones:
        cx, cy = np.array(_ZONES[zone]) + rng.normal(0, 0.02, 2)
        r = rng.uniform(0.06, 0.1)
        blob = ((xx - cx) / r) ** 2 + ((yy - cy) / (r * 1.2)) ** 2
        image += 0.35 * np.exp(-blob)
        mask |= blob <= 1
    image += rng.normal(0, 0.03, (h, w))
    return (np.clip(image, 0, 1) * 255).astype(np.uint8), mask, zones


def _report(rng: np.random.Generator, zones: list[str], cardiomegaly: bool) -> str:
    findings = [str(rng.choice(_FINDING_TEMPLATES)).format(zone=z) for z in zones]
    findings.append("The heart is enlarged." if cardiomegaly else "The heart size is normal.")
    findings += list(rng.choice(_NORMAL_SENTENCES, size=2, replace=False))
    rng.shuffle(findings)
    impression = (
        " ".join(f"{z.capitalize()} opacity, possibly pneumonia." for z in zones) if zones else "No acute process."
    )
    return f"EXAMINATION: CHEST (PA AND LAT)\n\nFINDINGS:\n {' '.join(findings)}\n\nIMPRESSION:\n {impression}\n"


def write_tiny_bert(folder: str, hidden_size: int = 64, num_layers: int = 2) -> str:
    """A tiny random-weight BERT config + a vocabulary covering the demo reports (offline text encoder)."""
    from transformers import BertConfig, BertTokenizerFast

    words = set()
    texts = [
        *_FINDING_TEMPLATES,
        *_NORMAL_SENTENCES,
        "The heart is enlarged. No acute process. opacity, possibly pneumonia.",
    ]
    for text in texts:
        for zone in _ZONES:
            words.update(text.format(zone=zone).lower().replace(".", " . ").replace(",", " , ").split())
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(words)]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=os.path.join(folder, "vocab.txt")).save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        intermediate_size=hidden_size * 2,
        max_position_embeddings=512,
    )
    config.save_pretrained(folder)
    return folder


def _write_gz_csv(path: str, rows: list[dict]) -> None:
    with gzip.open(path, "wt", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def make_pretraining_demo(
    dataset_dir: str, num_studies: int = 48, image_size: tuple[int, int] = (112, 96), seed: int = 0
) -> str:
    """Write a synthetic MIMIC-CXR-JPG + reports layout, a tiny BERT and ``lovt_index.jsonl``; return ``dataset_dir``.

    Also writes ``lovt_index_statistics.json`` (train-split pixel mean/std). Idempotent: returns at once
    when ``lovt_index.jsonl`` exists. ``image_size`` is (H, W).
    """
    index = os.path.join(dataset_dir, "lovt_index.jsonl")
    if os.path.isfile(index):
        return dataset_dir
    rng = np.random.default_rng(seed)
    jpg_root = os.path.join(dataset_dir, "mimic-cxr-jpg_2-0-0")
    report_zip = os.path.join(dataset_dir, "mimic-cxr_2-0-0", "mimic-cxr-reports.zip")
    os.makedirs(os.path.dirname(report_zip), exist_ok=True)
    metadata, split_rows = [], []
    with zipfile.ZipFile(report_zip, "w") as archive:
        for i in range(num_studies):
            subject, study = 10000000 + i // 2, 50000000 + i
            split = "train" if i < 0.7 * num_studies else "validate" if i < 0.85 * num_studies else "test"
            zones_n, cardiomegaly = int(rng.integers(0, 3)), bool(rng.random() < 0.3)
            folder = os.path.join(jpg_root, "files", f"p{str(subject)[:2]}", f"p{subject}", f"s{study}")
            os.makedirs(folder, exist_ok=True)
            image, _, zones = phantom(rng, image_size, zones_n, cardiomegaly)
            views = ["PA", "LATERAL"] + (["AP"] if i % 3 == 0 else [])
            for v, view in enumerate(views):
                dicom = f"{study:08d}-{v:02d}"
                Image.fromarray(image if view != "LATERAL" else image[:, ::-1]).save(
                    os.path.join(folder, f"{dicom}.jpg"), quality=95
                )
                metadata.append({"dicom_id": dicom, "subject_id": subject, "study_id": study, "ViewPosition": view})
                split_rows.append({"dicom_id": dicom, "study_id": study, "subject_id": subject, "split": split})
            name = f"mimic-cxr-reports/files/p{str(subject)[:2]}/p{subject}/s{study}.txt"
            archive.writestr(name, _report(rng, zones, cardiomegaly))
    _write_gz_csv(os.path.join(jpg_root, "mimic-cxr-2.0.0-metadata.csv.gz"), metadata)
    _write_gz_csv(os.path.join(jpg_root, "mimic-cxr-2.0.0-split.csv.gz"), split_rows)
    write_tiny_bert(os.path.join(dataset_dir, "text_encoder"))
    build_index(jpg_root, report_zip, index)
    index_statistics(index, jpg_root, os.path.join(dataset_dir, "lovt_index_statistics.json"))
    logger.info(f"LoVT pretraining demo data written to {dataset_dir}")
    return dataset_dir


def make_segmentation_demo(
    dataset_dir: str, num_images: int = 40, image_size: tuple[int, int] = (112, 96), seed: int = 1
) -> str:
    """Write ``<split>/{images,masks}/<id>.png`` (train / validation / test) and ``dataset_statistics.json``.

    The statistics file has the official LoVT layout (``{"train": {"num_samples", "scan": {"pixel_mean", ...}}}``).

    Every image has 1-2 opacities, the masks mark them (0/255). Idempotent on ``dataset_statistics.json``.
    """
    stats_file = os.path.join(dataset_dir, "dataset_statistics.json")
    if os.path.isfile(stats_file):
        return dataset_dir
    rng = np.random.default_rng(seed)
    splits = {"train": int(num_images * 0.6), "validation": int(num_images * 0.2)}
    splits["test"] = num_images - sum(splits.values())
    train_images = []
    for split, n in splits.items():
        for sub in ("images", "masks"):
            os.makedirs(os.path.join(dataset_dir, split, sub), exist_ok=True)
        for i in range(n):
            image, mask, _ = phantom(rng, image_size, int(rng.integers(1, 3)), bool(rng.random() < 0.3))
            Image.fromarray(image).save(os.path.join(dataset_dir, split, "images", f"{split}_{i:04d}.png"))
            Image.fromarray(mask.astype(np.uint8) * 255).save(
                os.path.join(dataset_dir, split, "masks", f"{split}_{i:04d}.png")
            )
            if split == "train":
                train_images.append(image / 255.0)
    mean, std = pixel_statistics(train_images)
    with open(stats_file, "w") as f:
        json.dump({"train": {"num_samples": splits["train"], "scan": {"pixel_mean": mean, "pixel_std": std}}}, f)
    return dataset_dir
