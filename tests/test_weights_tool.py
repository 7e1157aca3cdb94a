"""``python -m tools weights``: artefacts served from a loopback HTTP server, official layouts built in the test."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import re
import threading

import pytest
import torch
import yaml
from monai.bundle import download_large_files
from monai.networks.nets import UNETR

from tools.bundle_io import REPO_ROOT, discover_bundles
from tools.weights import WeightsError, download, fetch_weights, read_large_files

NET = {
    "_target_": "monai.networks.nets.UNETR",
    "in_channels": 1,
    "out_channels": 2,
    "img_size": 16,
    "feature_size": 4,
    "hidden_size": 32,
    "mlp_dim": 64,
    "num_heads": 2,
}


class _Server(http.server.ThreadingHTTPServer):
    files: dict[str, bytes]
    truncate: set[str]
    ranges: list[str]


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.files``; honours ``Range``; for names in ``server.truncate`` it announces the full
    length but sends only half of the bytes, then closes (a dropped connection)."""

    def do_GET(self) -> None:  # noqa: N802
        name = self.path.lstrip("/")
        if name not in self.server.files:
            self.send_error(404)
            return
        body = self.server.files[name]
        start = 0
        header = self.headers.get("Range")
        if header:
            self.server.ranges.append(header)
            start = int(header.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        payload = body[start:]
        if name in self.server.truncate:
            payload = payload[: len(payload) // 2]
            self.close_connection = True
        self.wfile.write(payload)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def server():
    httpd = _Server(("127.0.0.1", 0), _Handler)
    httpd.files, httpd.truncate, httpd.ranges = {}, set(), []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _url(server, name: str) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/{name}"


def _official_unetr_checkpoint() -> tuple[bytes, UNETR]:
    """research-contributions' ``trainer.py`` layout: ``{"epoch", "best_acc", "state_dict"}``, DDP ``module.``."""
    torch.manual_seed(0)
    net = UNETR(**{k: v for k, v in NET.items() if k != "_target_"}).eval()
    state = {"module." + k: v for k, v in net.state_dict().items()}
    state["module.vit.patch_embedding.cls_token"] = torch.zeros(1, 1, 32)  # obsolete key of older MONAI
    buffer = io.BytesIO()
    torch.save({"epoch": 800, "best_acc": 0.8, "state_dict": state}, buffer)
    return buffer.getvalue(), net


def _bundle(tmp_path, server, files: dict[str, bytes], hashes: dict[str, str]) -> str:
    root = tmp_path / "bundle"
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    (root / "configs" / "inference.json").write_text(json.dumps({"network_def": NET}, indent=4))
    (root / "configs" / "metadata.json").write_text(json.dumps({"version": "0.1.0"}))
    server.files.update(files)
    spec = {
        "large_files": [
            {"path": "models/embedding.pth", "url": _url(server, "embedding.pth"), "hash_val": hashes["embedding.pth"]}
            | {"hash_type": "sha256"}
        ],
        "official_files": [
            {"path": "models/official/UNETR_model_best_acc.pth", "url": _url(server, "unetr.pth")}
            | {"hash_val": hashes.get("unetr.pth", ""), "hash_type": "sha256"}
        ],
        "convert": {"converter": "unetr", "src": "models/official/UNETR_model_best_acc.pth", "dst": "models/model.pt"},
    }
    (root / "large_files.yml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(root)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture()
def artefacts():
    ckpt, net = _official_unetr_checkpoint()
    embedding = b"embedding bytes" * 100
    return {"unetr.pth": ckpt, "embedding.pth": embedding}, net


def test_official_download_converts_and_loads_strictly(tmp_path, server, artefacts, capsys):
    files, net = artefacts
    bundle = _bundle(tmp_path, server, files, {"embedding.pth": _sha(files["embedding.pth"])})
    dst = fetch_weights(bundle, progress=False)
    out = capsys.readouterr().out
    assert "models/embedding.pth: downloaded, sha256 verified" in out
    assert f"UNVERIFIED, no published hash; sha256 of what was downloaded: {_sha(files['unetr.pth'])}" in out
    assert "loaded" in out and "into UNETR strictly" in out
    loaded = UNETR(**{k: v for k, v in NET.items() if k != "_target_"}).eval()
    loaded.load_state_dict(torch.load(dst, weights_only=True), strict=True)
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x))
    with pytest.raises(WeightsError, match="exists"):  # never over the user's model.pt
        fetch_weights(bundle, progress=False)


def test_monai_download_large_files_reads_the_same_file(tmp_path, server, artefacts):
    files, _ = artefacts
    bundle = _bundle(tmp_path, server, files, {"embedding.pth": _sha(files["embedding.pth"])})
    download_large_files(bundle_path=bundle)  # what `python -m monai.bundle download_large_files` runs
    assert (tmp_path / "bundle" / "models" / "embedding.pth").read_bytes() == files["embedding.pth"]


def test_wrong_hash_leaves_no_model(tmp_path, server, artefacts):
    files, _ = artefacts
    bundle = _bundle(tmp_path, server, files, {"embedding.pth": _sha(files["embedding.pth"]), "unetr.pth": "0" * 64})
    with pytest.raises(WeightsError, match="does not match the expected"):
        fetch_weights(bundle, progress=False)
    models = tmp_path / "bundle" / "models"
    assert not (models / "model.pt").exists() and not list(models.rglob("*.part"))
    assert not (models / "official" / "UNETR_model_best_acc.pth").exists()


def test_truncated_download_resumes(tmp_path, server, artefacts):
    files, _ = artefacts
    hashes = {"embedding.pth": _sha(files["embedding.pth"]), "unetr.pth": _sha(files["unetr.pth"])}
    bundle = _bundle(tmp_path, server, files, hashes)
    server.truncate.add("unetr.pth")
    with pytest.raises(WeightsError, match="truncated download .* rerun to resume"):
        fetch_weights(bundle, progress=False)
    models = tmp_path / "bundle" / "models"
    part = models / "official" / "UNETR_model_best_acc.pth.part"
    assert part.exists() and 0 < part.stat().st_size < len(files["unetr.pth"])
    assert not (models / "model.pt").exists()
    server.truncate.clear()
    assert fetch_weights(bundle, progress=False) == str(models / "model.pt")
    assert server.ranges == [f"bytes={len(files['unetr.pth']) // 2}-"]  # resumed, not restarted


def test_unreachable_url_and_wrong_layout(tmp_path, server, artefacts):
    files, _ = artefacts
    bundle = _bundle(tmp_path, server, files, {"embedding.pth": _sha(files["embedding.pth"])})
    with pytest.raises(WeightsError, match="unreachable"):
        download("http://127.0.0.1:9/none.pth", str(tmp_path / "x.pth"))
    with pytest.raises(WeightsError, match="HTTP 404"):
        fetch_weights(bundle, source=_url(server, "missing.pth"), progress=False)
    other = tmp_path / "other.pth"  # a checkpoint of another network: converted, then refused by the strict load
    torch.save({"state_dict": {"module.conv.weight": torch.zeros(2, 2)}}, other)
    with pytest.raises(WeightsError, match="does not load into network_def"):
        fetch_weights(bundle, source=str(other), progress=False)
    assert not (tmp_path / "bundle" / "models" / "model.pt").exists()
    assert [p.name for p in (tmp_path / "bundle" / "models").iterdir() if p.name.startswith(".tmp_")] == []


@pytest.mark.parametrize("bundle", discover_bundles(), ids=os.path.basename)
def test_bundle_large_files_are_readable_by_both_tools(bundle):
    from monai.bundle import ConfigParser

    from tools.verify import check_large_files

    spec = read_large_files(bundle)
    check_large_files(bundle)  # every MONAI entry has a sha256
    parser = ConfigParser()
    parser.read_config(os.path.join(bundle, "large_files.yml"))
    for entry in parser.get()["large_files"]:  # what download_large_files passes to download_url
        assert set(entry) == {"path", "url", "hash_val", "hash_type"} and len(entry["hash_val"]) == 64
    for entry in spec["files"]:
        assert entry["url"].startswith("https://") and entry["path"].startswith("models/")
    recipe = spec["convert"]
    if recipe is not None:
        assert os.path.isfile(os.path.join(REPO_ROOT, "tools", "converters", recipe["converter"] + ".py"))
        assert recipe["src"] in {e["path"] for e in spec["files"]}
        with open(os.path.join(bundle, "configs", "inference.json")) as f:
            assert recipe["dst"].removeprefix("models/") in f.read()  # the file inference loads


def test_text_encoders_are_pinned_and_cache_keys_name_the_commit(tmp_path, caplog):
    from common.text.cache import PINNED_REVISIONS, encoder_key, is_commit

    for bundle in discover_bundles():
        for name in os.listdir(os.path.join(bundle, "configs")):
            with open(os.path.join(bundle, "configs", name)) as f:
                config = json.load(f) if name.endswith(".json") else {}
            if isinstance(config.get("text_revision"), str) or "text_revision" in config:
                assert is_commit(config["text_revision"]), f"{bundle}/{name}: text_revision not a commit"
    assert all(is_commit(r) for r in PINNED_REVISIONS.values())
    commit = PINNED_REVISIONS["bert-base-uncased"]
    assert encoder_key("bert-base-uncased", commit) == f"bert-base-uncased@{commit}"
    assert encoder_key(str(tmp_path), None) == f"{tmp_path}@local"
    with caplog.at_level("WARNING"):
        assert encoder_key("bert-base-uncased", "main") == "bert-base-uncased@main"
    assert "not pinned to a commit" in caplog.text


@pytest.mark.parametrize("bundle", discover_bundles(), ids=os.path.basename)
def test_zoo_verify_bundle_min_mode_offline(tmp_path, bundle, monkeypatch):
    """The model zoo's ``ci/verify_bundle.py -m min``, offline: large files (present ones hash-checked by MONAI's
    ``download_url``, as the zoo calls it), necessary and preferred files with ``models/model.pt`` from a tiny
    demo network, metadata against schema 20240725 and the changelog."""
    import monai.apps.utils
    from monai.apps.utils import download_url

    from tools.bundle_io import copy_bundle, on_sys_path, parse_bundle
    from tools.verify import check_metadata

    root = copy_bundle(bundle, str(tmp_path / os.path.basename(bundle)))
    with on_sys_path(root):  # a demo-size network's weights stand in for a demo training run's model.pt
        parser = parse_bundle(root, ["inference.json", "demo.json"])
        weights = parser.get_parsed_content("network_def").state_dict()
        ckpt_dir = parser.get_parsed_content("ckpt_dir")
    with open(os.path.join(root, "configs", "inference.json")) as f:
        loaded = {"model.pt", "image_encoder.pt"} & set(re.findall(r"/(\w+\.pt)'", f.read()))
    for name in {"model.pt", *loaded}:  # the zoo's preferred file and the one inference loads
        torch.save(weights, os.path.join(ckpt_dir, name))

    def offline(url, *args, **kwargs):
        raise ConnectionError(f"offline: {url}")

    monkeypatch.setattr(monai.apps.utils, "_download_with_progress", offline)
    with open(os.path.join(root, "large_files.yml")) as f:
        entries = yaml.safe_load(f)["large_files"] or []
    needs_network = []
    for entry in entries:  # the zoo's utils.download_large_files, entry by entry
        try:
            download_url(entry["url"], os.path.join(root, entry["path"]), entry["hash_val"], entry["hash_type"])
        except ConnectionError:
            needs_network.append(entry["path"])
    assert all(not os.path.exists(os.path.join(root, p)) for p in needs_network)  # only absent files need it
    for rel in ("configs/metadata.json", "LICENSE", "models/model.pt", "configs/inference.json"):
        assert os.path.isfile(os.path.join(root, rel)), rel
    check_metadata(root, None)


def test_source_file_is_converted_and_reported_unverified(tmp_path, server, artefacts, capsys):
    files, net = artefacts
    bundle = _bundle(tmp_path, server, files, {"embedding.pth": _sha(files["embedding.pth"])})
    local = tmp_path / "my_unetr.pth"
    local.write_bytes(files["unetr.pth"])
    dst = fetch_weights(bundle, source=str(local), progress=False)
    out = capsys.readouterr().out
    assert f"WARNING {local}: local file, UNVERIFIED; sha256 {_sha(files['unetr.pth'])}" in out
    assert not (tmp_path / "bundle" / "models" / "official").exists()  # the official download was not needed
    state = torch.load(dst, weights_only=True)
    torch.testing.assert_close(state["out.conv.conv.weight"], net.state_dict()["out.conv.conv.weight"])


def test_entry_outside_the_bundle_is_refused(tmp_path):
    (tmp_path / "large_files.yml").write_text(
        yaml.safe_dump({"official_files": [{"path": "../evil.pt", "url": "https://example.org/x", "hash_val": ""}]})
    )
    with pytest.raises(WeightsError, match="outside the bundle folder"):
        read_large_files(str(tmp_path))
