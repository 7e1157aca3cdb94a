"""MIMIC-CXR-JPG and plain-CSV readers for LoVT pretraining.

``build_index`` turns the official layout (``mimic-cxr-jpg_2-0-0`` + the reports zip) into a JSON-lines
index with one record per study, sorted by (subject_id, study_id); ``load_datalist`` reads it back
(``fraction=0.3`` is LoVT_30: the *first* 30% of the training split). ``load_csv_datalist`` reads a
user CSV (image path, report text). Report sections follow the MIT-LCP ``section_parser`` rules and
sentences are split offline by a rule-based splitter tuned to radiology reports.
"""

from __future__ import annotations

import csv
import gzip
import json
import logging
import os
import re
import zipfile
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import list_data_collate
from monai.transforms import MapTransform, RandomizableTransform

__all__ = [
    "split_sections",
    "split_sentences",
    "report_sentences",
    "build_index",
    "load_datalist",
    "load_csv_datalist",
    "pixel_statistics",
    "index_statistics",
    "RandomFrontalImaged",
    "SentenceSwapd",
    "LoVTCollate",
]

logger = logging.getLogger(__name__)

# MIT-LCP mimic-cxr ``section_parser.normalize_section_names``: header synonyms and typos.
SECTION_NAMES = {
    "impression": "impression",
    "impressions": "impression",
    "conclusion": "impression",
    "findings and impression": "impression",
    "findings/impression": "impression",
    "findings/ impression": "impression",
    "impresson": "impression",
    "imprression": "impression",
    "imoression": "impression",
    "impressoin": "impression",
    "imprssion": "impression",
    "impresion": "impression",
    "imperssion": "impression",
    "mpression": "impression",
    "impession": "impression",
    "findings": "findings",
    "finding": "findings",
    "findins": "findings",
    "findindgs": "findings",
    "findgings": "findings",
    "findngs": "findings",
    "findnings": "findings",
    "finidngs": "findings",
    "chest, two views": "findings",
    "reference findings": "findings",
    "comparison": "comparison",
    "comparisons": "comparison",
    "indication": "indication",
    "history": "history",
    "clinical history": "history",
    "technique": "technique",
    "examination": "examination",
    "exam": "examination",
    "notification": "notification",
    "recommendation(s)": "recommendations",
    "recommendations": "recommendations",
    "addendum": "addendum",
    "wet read": "wet read",
}
_SECTION_HEADER = re.compile(r"(?m)^[ \t]*([A-Z][A-Z ()/,&-]*):[ \t]*")
_ABBREVIATIONS = {"dr", "drs", "mr", "mrs", "ms", "vs", "approx", "e.g", "i.e", "no", "st", "fig", "cm", "mm", "pt"}
_SENTENCE_END = re.compile(r"([.!?])\s+(?=[\"'(\[]?[A-Z0-9_])")
_ENUMERATOR = re.compile(r"(?:^|(?<=\s))\(?\d{1,2}[.)]\s+(?=[A-Za-z])")


def split_sections(text: str) -> dict[str, str]:
    """Split a report into normalised sections (``preamble`` holds the text before the first header)."""
    sections: dict[str, str] = {}
    matches = list(_SECTION_HEADER.finditer(text))
    starts = [m.end() for m in matches]
    ends = [m.start() for m in matches[1:]] + [len(text)] if matches else []
    sections["preamble"] = text[: matches[0].start()] if matches else text
    for m, start, end in zip(matches, starts, ends, strict=True):
        name = " ".join(m.group(1).lower().split())
        name = SECTION_NAMES.get(name, name)
        body = " ".join(text[start:end].split())
        sections[name] = f"{sections[name]} {body}".strip() if name in sections else body
    return sections


def split_sentences(text: str) -> list[str]:
    """Rule-based sentence splitter for radiology text (offline; no model download).

    Splits on . ! ? followed by whitespace and an upper-case letter or digit, except after common
    abbreviations and single letters; list enumerators ("1. ", "2) ") start a new sentence and are removed.
    """
    text = _ENUMERATOR.sub("\n", " ".join(text.replace("\n", " \n ").split(" ")))
    sentences: list[str] = []
    for chunk in re.split(r"\s*\n\s*", text):
        start = 0
        for m in _SENTENCE_END.finditer(chunk):
            last_word = re.findall(r"[\w.]+$", chunk[start : m.start()])
            word = last_word[0].lower().rstrip(".") if last_word else ""
            if m.group(1) == "." and (word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha())):
                continue
            sentences.append(chunk[start : m.end()])
            start = m.end()
        sentences.append(chunk[start:])
    return [s for s in (" ".join(s.split()) for s in sentences) if any(c.isalnum() for c in s)]


def report_sentences(text: str) -> tuple[list[str], list[str]]:
    """Findings and impression sentences of a report (a report without headers counts as findings)."""
    sections = split_sections(text)
    if "findings" not in sections and "impression" not in sections and len(sections) == 1:
        return split_sentences(sections["preamble"]), []
    return split_sentences(sections.get("findings", "")), split_sentences(sections.get("impression", ""))


def _read_csv_gz(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"MIMIC-CXR-JPG table not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="") as f:
        return list(csv.DictReader(f))


def _report_reader(reports: Path) -> Callable[[str, str], tuple[str, str] | None]:
    """Return ``read(subject_id, study_id) -> (where, text)`` over the reports zip or an extracted ``files/`` folder."""
    if reports.is_file():
        archive = zipfile.ZipFile(reports)
        names = {n.rsplit("/", 2)[-2] + "/" + n.rsplit("/", 1)[-1]: n for n in archive.namelist() if n.endswith(".txt")}

        def read(subject: str, study: str) -> tuple[str, str] | None:
            name = names.get(f"p{subject}/s{study}.txt")
            return (f"{reports}:{name}", archive.read(name).decode("utf-8", errors="replace")) if name else None

        return read
    if reports.is_dir():

        def read_dir(subject: str, study: str) -> tuple[str, str] | None:
            hits = list(reports.glob(f"**/p{subject[:2]}/p{subject}/s{study}.txt"))
            return (str(hits[0]), hits[0].read_text(errors="replace")) if hits else None

        return read_dir
    raise FileNotFoundError(f"MIMIC-CXR reports not found (zip or folder expected): {reports}")


def build_index(jpg_dir: str, reports: str, output: str, min_tokens: int = 3, check_images: bool = True) -> dict:
    """Write the JSON-lines study index for LoVT and return counts of kept and skipped studies.

    Args:
        jpg_dir: the ``mimic-cxr-jpg_2-0-0`` folder (``files/``, ``mimic-cxr-2.0.0-{split,metadata}.csv.gz``).
        reports: ``mimic-cxr-reports.zip`` or a folder holding ``files/pXX/pXXXXXXXX/sXXXXXXXX.txt``.
        output: the ``.jsonl`` file to write (one record per study, sorted by subject_id, study_id).
        min_tokens: studies whose findings + impression have fewer whitespace tokens are dropped.
        check_images: skip images missing on disk (reported with a count).

    Images absent from the split CSV are excluded (counted in the log), never assigned to a split; an empty report
    file is an error naming it.
    """
    root = Path(jpg_dir)
    split = {r["dicom_id"]: r["split"] for r in _read_csv_gz(root / "mimic-cxr-2.0.0-split.csv.gz")}
    studies: dict[tuple[int, int], dict[str, Any]] = {}
    missing_images = not_in_split = 0
    for row in _read_csv_gz(root / "mimic-cxr-2.0.0-metadata.csv.gz"):
        if row.get("ViewPosition") not in ("PA", "AP"):
            continue
        subject, study, dicom = row["subject_id"], row["study_id"], row["dicom_id"]
        rel = f"files/p{subject[:2]}/p{subject}/s{study}/{dicom}.jpg"
        if check_images and not (root / rel).is_file():
            missing_images += 1
            continue
        if dicom not in split:
            not_in_split += 1  # never guessed: an unlisted image could be a test image
            continue
        record = studies.setdefault(
            (int(subject), int(study)),
            {"subject_id": int(subject), "study_id": int(study), "split": split[dicom], "images": []},
        )
        record["images"].append(rel)
    read = _report_reader(Path(reports))
    counts = {"kept": 0, "missing_report": 0, "short_report": 0, "missing_images": missing_images}
    counts["not_in_split_csv"] = not_in_split
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    with open(output, "w") as f:
        for key in sorted(studies):
            record = studies[key]
            report = read(str(record["subject_id"]), str(record["study_id"]))
            if report is None:
                counts["missing_report"] += 1
                continue
            where, text = report
            if not text.strip():
                raise ValueError(f"{where}: empty report.")
            findings, impression = report_sentences(text)
            sentences = findings + impression
            if sum(len(s.split()) for s in sentences) < min_tokens:
                counts["short_report"] += 1
                continue
            f.write(
                json.dumps(
                    {
                        "subject_id": record["subject_id"],
                        "study_id": record["study_id"],
                        "split": record["split"],
                        "frontal_images": record["images"],
                        "findings_sentences": findings,
                        "impression_sentences": impression,
                        "sentences": sentences,
                    }
                )
                + "\n"
            )
            counts["kept"] += 1
    skipped = {k: v for k, v in counts.items() if k != "kept" and v}
    if skipped:
        logger.warning(f"build_index({jpg_dir}): kept {counts['kept']} studies, skipped {skipped}.")
    return counts


def load_datalist(index: str, dataset_dir: str, split: str = "train", fraction: float = 1.0) -> list[dict]:
    """Datalist of one split of a ``build_index`` file: ``{"image": [frontal paths], "sentences": [...]}``.

    ``fraction < 1`` keeps the *first* round(N * fraction) studies in index order (LoVT_30 = 0.3 of train).
    """
    if not os.path.isfile(index):
        raise FileNotFoundError(f"LoVT study index not found: {index} (create it with build_index).")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}.")
    records = []
    with open(index) as f:
        for line_no, line in enumerate(f, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{index}:{line_no}: not a JSON record ({e}).") from e
            if record["split"] == split:
                records.append(record)
    records = records[: round(len(records) * fraction)]
    return [
        {
            "image": [os.path.join(dataset_dir, p) for p in r["frontal_images"]],
            "sentences": r["sentences"],
            "study_id": r["study_id"],
        }
        for r in records
    ]


def load_csv_datalist(
    csv_file: str, base_dir: str | None = None, image_col: str = "image", report_col: str = "report"
) -> list[dict]:
    """Datalist from a CSV of (image path, report text); rows with a missing image or empty report are skipped.

    Paths are relative to ``base_dir`` (default: the CSV's folder). Reports with section headers keep
    findings + impression; plain text is used whole. Skipped rows are logged with a count.
    """
    base = Path(base_dir) if base_dir is not None else Path(csv_file).parent
    if not os.path.isfile(csv_file):
        raise FileNotFoundError(f"Report CSV not found: {csv_file}")
    with open(csv_file, newline="") as f:
        reader = csv.DictReader(f)
        missing = {image_col, report_col} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{csv_file}: missing column(s) {sorted(missing)}; found {reader.fieldnames}.")
        rows = list(reader)
    data, bad = [], {"missing_image": [], "empty_report": []}
    for line_no, row in enumerate(rows, 2):
        path = base / row[image_col]
        findings, impression = report_sentences(row[report_col] or "")
        if not path.is_file():
            bad["missing_image"].append(line_no)
        elif not findings + impression:
            bad["empty_report"].append(line_no)
        else:
            data.append({"image": [str(path)], "sentences": findings + impression})
    for reason, lines in bad.items():
        if lines:
            logger.warning(f"{csv_file}: skipped {len(lines)} row(s) with {reason} (lines {lines[:10]}...).")
    return data


def pixel_statistics(images: Iterable[np.ndarray]) -> tuple[float, float]:
    """Dataset pixel mean and std: var = mean of per-image variances + variance of per-image means."""
    means, variances = [], []
    for image in images:
        a = np.asarray(image, dtype=np.float64)
        means.append(a.mean())
        variances.append(a.var())
    if not means:
        raise ValueError("pixel_statistics needs at least one image.")
    return float(np.mean(means)), float(np.sqrt(np.mean(variances) + np.var(means)))


class RandomFrontalImaged(RandomizableTransform, MapTransform):
    """Pick one of a study's frontal images at random at every load (a single path passes through)."""

    def __init__(self, keys: KeysCollection) -> None:
        RandomizableTransform.__init__(self, prob=1.0)
        MapTransform.__init__(self, keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            if isinstance(d[key], (list, tuple)):
                d[key] = d[key][self.R.randint(len(d[key]))]
        return d


class SentenceSwapd(RandomizableTransform, MapTransform):
    """LoVT report augmentation: Geometric(p) many random sentence-pair swaps, each applied with ``prob``.

    The number of swaps counts failures before the first success (torch's ``Geometric`` convention).
    """

    def __init__(self, keys: KeysCollection, prob: float = 0.6, geometric_p: float = 0.4) -> None:
        RandomizableTransform.__init__(self, prob=prob)
        MapTransform.__init__(self, keys)
        self.geometric_p = geometric_p

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            sentences = list(d[key])
            for _ in range(self.R.geometric(self.geometric_p) - 1):
                if len(sentences) > 1 and self.R.rand() < self.prob:
                    i, j = self.R.choice(len(sentences), 2, replace=False)
                    sentences[i], sentences[j] = sentences[j], sentences[i]
            d[key] = sentences
        return d


class LoVTCollate:
    """Collate LoVT samples: images as MONAI does, reports tokenised so BERT runs once per report.

    Sentences are tokenised without special tokens and concatenated until ``max_length - 2`` tokens;
    the sentences that no longer fit are dropped (a first sentence longer than that is truncated).
    Adds ``input_ids``, ``attention_mask``, ``token_sentence`` ([B, L], sentence index per token, -1 for
    [CLS]/[SEP]/padding) and ``num_sentences`` (int) to the batch.
    """

    def __init__(self, tokenizer: Any, max_length: int = 512, text_key: str = "sentences") -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.text_key = text_key

    def tokenize(self, sentences: Sequence[str]) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        owner: list[int] = []
        budget = self.max_length - 2
        for k, sentence in enumerate(sentences):
            tokens = self.tokenizer(sentence, add_special_tokens=False)["input_ids"]
            if len(ids) + len(tokens) > budget:
                if not ids:
                    ids, owner = tokens[:budget], [0] * min(len(tokens), budget)
                break
            ids += tokens
            owner += [k] * len(tokens)
        if not ids:
            raise ValueError("LoVTCollate: a report without any sentence reached the collate function.")
        return [self.tokenizer.cls_token_id, *ids, self.tokenizer.sep_token_id], [-1, *owner, -1]

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        encoded = [self.tokenize(s[self.text_key]) for s in samples]
        length = max(len(ids) for ids, _ in encoded)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(samples), length), pad, dtype=torch.long)
        token_sentence = torch.full((len(samples), length), -1, dtype=torch.long)
        for i, (ids, owner) in enumerate(encoded):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            token_sentence[i, : len(owner)] = torch.tensor(owner)
        rest = [{k: v for k, v in s.items() if k != self.text_key} for s in samples]
        batch = list_data_collate(rest)
        batch["input_ids"] = input_ids
        batch["attention_mask"] = (
            torch.arange(length)[None] < torch.tensor([len(e[0]) for e in encoded])[:, None]
        ).long()
        batch["token_sentence"] = token_sentence
        batch["num_sentences"] = int(token_sentence.max()) + 1
        batch[self.text_key] = [list(s[self.text_key]) for s in samples]
        return batch


def index_statistics(
    index: str, dataset_dir: str, output: str, split: str = "train", max_studies: int | None = None
) -> dict[str, float]:
    """Pixel mean/std (intensities in [0, 1]) of each study's first frontal image in ``split``; writes ``output``."""
    from PIL import Image

    records = load_datalist(index, dataset_dir, split)[:max_studies]
    mean, std = pixel_statistics(np.asarray(Image.open(r["image"][0]).convert("L")) / 255.0 for r in records)
    stats = {"pixel_mean": mean, "pixel_std": std, "split": split, "num_images": len(records)}
    with open(output, "w") as f:
        json.dump(stats, f, indent=4)
    return stats
