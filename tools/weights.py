"""``python -m tools weights BUNDLE [--source official|URL|FILE]``: official weights into ``models/`` in one command.

A bundle's ``large_files.yml`` has three parts:

- ``large_files``: MONAI's list (``path``, ``url``, ``hash_val``, ``hash_type``), every entry with a known
  sha256, so ``python -m monai.bundle download_large_files`` fetches and checks the same files;
- ``official_files``: released artefacts read only by this tool, same keys; ``hash_val: ""`` marks a hash
  the authors never published: the file is downloaded, its sha256 printed and it is reported UNVERIFIED
  (never silently); MONAI's tool would skip the check, which is why these are kept out of ``large_files``;
- ``convert`` (optional): ``{converter, src, dst, args}``: ``tools/converters/<converter>.py`` turns ``src``
  (an official layout) into ``dst``, which must load strictly into ``configs/inference.json``'s
  ``network_def`` before it is moved into place. A failed download, hash or load leaves no ``dst``.

Downloads resume from ``<path>.part`` (HTTP ``Range``), show a progress bar and check the hash before the
file takes its final name.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from typing import Any

import torch
import yaml
from tqdm import tqdm

from tools.bundle_io import BUNDLES_DIR, on_sys_path, parse_bundle

__all__ = ["WeightsError", "download", "file_hash", "fetch_weights", "read_large_files"]

CHUNK = 1 << 20


class WeightsError(RuntimeError):
    """A download, hash check, conversion or load that failed; the message names the file."""


def file_hash(path: str, hash_type: str = "sha256") -> str:
    digest = hashlib.new(hash_type)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def read_large_files(bundle: str) -> dict[str, Any]:
    """``large_files``, ``official_files`` and ``convert`` of ``bundle/large_files.yml`` (checked)."""
    path = os.path.join(bundle, "large_files.yml")
    if not os.path.isfile(path):
        raise WeightsError(f"{path}: not found; is {bundle} a bundle folder?")
    with open(path) as f:
        spec = yaml.safe_load(f) or {}
    for entry in spec.get("large_files") or []:
        if not entry.get("hash_val") or entry.get("hash_type") != "sha256":
            raise WeightsError(f"{path}: large_files entry {entry.get('path')} needs a sha256 hash_val")
    for entry in [*(spec.get("large_files") or []), *(spec.get("official_files") or [])]:
        if not entry.get("path") or not entry.get("url"):
            raise WeightsError(f"{path}: entry {entry} needs a path and a url")
        if os.path.isabs(entry["path"]) or os.path.normpath(entry["path"]).startswith(".."):
            raise WeightsError(f"{path}: {entry['path']} is outside the bundle folder")
    return {
        "files": [*(spec.get("large_files") or []), *(spec.get("official_files") or [])],
        "convert": spec.get("convert"),
    }


def download(url: str, dst: str, hash_val: str = "", hash_type: str = "sha256", progress: bool = True) -> str:
    """Download ``url`` to ``dst`` through ``dst.part`` (resumed when present).

    Returns the file's ``hash_type`` digest (checked against ``hash_val`` when given).
    Raises :class:`WeightsError` on an unreachable URL, a short read (the ``.part`` stays for a resume)
    or a hash mismatch (the ``.part`` is removed). ``dst`` appears only once complete and checked.
    """
    part = dst + ".part"
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    start = os.path.getsize(part) if os.path.exists(part) else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as e:
        if e.code == 416 and start:  # the .part is already complete
            response = None
        else:
            raise WeightsError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise WeightsError(f"{url}: unreachable ({getattr(e, 'reason', e)})") from None
    if response is not None:
        with response:
            resumed = response.status == 206
            length = response.headers.get("Content-Length")
            expected = (int(length) + (start if resumed else 0)) if length is not None else None
            mode, done = ("ab", start) if resumed else ("wb", 0)
            bar = tqdm(
                total=expected,
                initial=done,
                unit="B",
                unit_scale=True,
                desc=os.path.basename(dst),
                disable=not progress,
            )
            with open(part, mode) as f, bar:
                try:
                    for block in iter(lambda: response.read(CHUNK), b""):
                        f.write(block)
                        done += len(block)
                        bar.update(len(block))
                except (OSError, urllib.error.URLError) as e:
                    raise WeightsError(f"{url}: connection lost after {done} bytes ({e}); rerun to resume") from None
            if expected is not None and done < expected:
                raise WeightsError(f"{url}: truncated download ({done} of {expected} bytes); rerun to resume")
    actual = file_hash(part, hash_type)
    if hash_val and actual != hash_val:
        os.remove(part)
        raise WeightsError(f"{url}: {hash_type} {actual} does not match the expected {hash_val}; file removed")
    os.replace(part, dst)
    return actual


def _fetch_file(bundle: str, entry: dict[str, Any], progress: bool) -> None:
    dst = os.path.join(bundle, entry["path"])
    hash_val, hash_type = entry.get("hash_val") or "", entry.get("hash_type") or "sha256"
    if os.path.exists(dst):
        if hash_val and file_hash(dst, hash_type) != hash_val:
            raise WeightsError(f"{dst}: exists but its {hash_type} differs from {hash_val}; move it away and rerun")
        state = "hash ok" if hash_val else f"UNVERIFIED, sha256 {file_hash(dst)}"
        print(f"{entry['path']}: present ({state})")
        return
    digest = download(entry["url"], dst, hash_val, hash_type, progress)
    if hash_val:
        print(f"{entry['path']}: downloaded, {hash_type} verified")
    else:
        print(
            f"WARNING {entry['path']}: UNVERIFIED, no published hash; {hash_type} of what was downloaded: {digest} "
            "(compare it with a trusted copy before use)"
        )


def _load_strictly(bundle: str, path: str) -> str:
    """Load ``path`` into ``inference.json``'s ``network_def`` with ``strict=True``; return a summary line."""
    with on_sys_path(os.path.abspath(bundle)):
        network = parse_bundle(os.path.abspath(bundle), ["inference.json"]).get_parsed_content("network_def")
        state = torch.load(path, map_location="cpu", weights_only=True)
        try:
            network.load_state_dict(state, strict=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            raise WeightsError(f"{path}: does not load into network_def: {' '.join(first[:2])[:300]}") from None
    params = sum(v.numel() for v in state.values() if v.is_floating_point())
    return f"loaded {len(state)} tensors ({params:,} values) into {type(network).__name__} strictly"


def fetch_weights(bundle: str, source: str = "official", progress: bool = True) -> str | None:
    """Fetch, check, convert and strictly load a bundle's weights; return the written model path (or ``None``).

    ``source``: ``official`` (the listed artefacts), an ``http(s)://`` URL or a local file standing in for
    the converter's ``src`` (no hash is known for those: the computed sha256 is printed).
    """
    if not os.path.isdir(bundle) and os.path.isdir(os.path.join(BUNDLES_DIR, bundle)):
        bundle = os.path.join(BUNDLES_DIR, bundle)
    spec = read_large_files(bundle)
    recipe = spec["convert"]
    if not spec["files"] and not recipe:
        print(f"{bundle}: the authors released no weights for this bundle; train it (see docs/README.md)")
        return None
    if recipe is not None:
        dst = os.path.join(bundle, recipe["dst"])
        if os.path.exists(dst):
            raise WeightsError(f"{dst}: exists; move it away to fetch the official weights again")
    src_override = None
    if source != "official":
        if recipe is None:
            raise WeightsError(f"{bundle}: large_files.yml has no 'convert' step to apply to {source}")
        if source.startswith(("http://", "https://")):
            src_override = os.path.join(bundle, recipe["src"])
            _fetch_file(bundle, {"path": recipe["src"], "url": source}, progress)
        elif os.path.isfile(source):
            src_override = source
            print(f"WARNING {source}: local file, UNVERIFIED; sha256 {file_hash(source)}")
        else:
            raise WeightsError(f"{source}: neither 'official', a URL nor an existing file")
    for entry in spec["files"]:
        if src_override is None or entry["path"] != recipe["src"]:
            _fetch_file(bundle, entry, progress)
    if recipe is None:
        print(f"{bundle}: no conversion listed; models/model.pt comes from training (see large_files.yml)")
        return None
    from tools.__main__ import _plugin  # the converter registry of `tools convert`

    src = src_override or os.path.join(bundle, recipe["src"])
    folder = os.path.dirname(os.path.abspath(dst))
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".pt", dir=folder)
    os.close(fd)
    os.remove(tmp)  # converters refuse to write over an existing file
    try:
        _plugin("converters", recipe["converter"], "convert")(src, tmp, **(recipe.get("args") or {}))
        summary = _load_strictly(bundle, tmp)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f"{recipe['dst']}: {summary}")
    return dst
