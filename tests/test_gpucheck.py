"""``python -m tools gpucheck --smoke``: the GPU check's code paths on CPU with the demo sizes, so they never rot.

The smoke run covers the reference bundle (UNETR): training with AMP requested and without, the validation
pass, inference, TorchScript and ONNX export. ``torchrun`` is left to ``tests/test_bundle_runs.py``,
which runs every ``multi_gpu_train.json`` on 2 processes; TensorRT needs CUDA.
"""

from __future__ import annotations

import json

import pytest

from tools.gpucheck import failures, main


def test_gpucheck_smoke_reports_every_step(tmp_path):
    out = tmp_path / "gpucheck.json"
    main(smoke=True, bundles="unetr_btcv_segmentation", steps="train,validate,infer,export", out=str(out))
    results = json.loads(out.read_text())
    report = results["bundles"]["unetr_btcv_segmentation"]
    assert results["smoke"] and results["device"] == "cpu" and failures(results) == []
    for run in ("train_amp", "train_fp32"):
        assert report[run]["s_per_iter"] > 0 and report[run]["images_per_s"] > 0
        assert report[run]["loss"] is not None and report[run]["peak_mem_mib"] is None  # no CUDA memory on CPU
    assert report["validate"]["s"] > 0 and report["infer"]["s_per_case"] > 0
    assert report["export"]["torchscript"]["max_abs_diff"] < 1e-3
    assert report["export"]["onnx"]["max_abs_diff"] < 1e-3


def test_gpucheck_without_cuda_or_with_unknown_names_says_why():
    with pytest.raises(SystemExit, match="unknown step"):
        main(smoke=True, steps="train,fly")
    with pytest.raises(SystemExit, match="unknown bundle"):
        main(smoke=True, bundles="no_such_bundle")
