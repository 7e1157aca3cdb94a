"""Semi-supervised LViT: EPI bank updates and resume, LV template selection, the mixed-batch loss."""

from __future__ import annotations

import os

import pytest
import torch
from monai.bundle import ConfigWorkflow

from common.core.io import save_atomically
from common.data.lvit_templates import DEFAULT_TEMPLATE_TEXTS
from common.engines.lvit_semi import EPIBank, LViTSemiIteration, LVTemplates, labelled_subset, semi_datalist
from common.losses.lvit import LViTDiceBCE
from tools.bundle_io import config_paths, copy_bundle, on_sys_path

LVIT_BUNDLE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "bundles", "lvit_qata_covid19_segmentation")


class _OneHotEmbedder:
    """Embeds each template text as a distinct one-hot token sequence (stands in for BERT)."""

    def embed(self, texts):
        out = torch.zeros(len(texts), 10, len(DEFAULT_TEMPLATE_TEXTS))
        for i, t in enumerate(texts):
            out[i, :, DEFAULT_TEMPLATE_TEXTS.index(t)] = 1.0
        return out


def test_epi_bank_ema_and_pseudo_labels():
    bank = EPIBank(3, (2, 2), beta=0.99)
    pseudo = bank.update(torch.tensor([1]), torch.full((1, 1, 2, 2), 0.8))
    assert torch.equal(pseudo, torch.ones(1, 1, 2, 2)) and bank.seen.tolist() == [False, True, False]
    bank.update(torch.tensor([1]), torch.zeros(1, 1, 2, 2))
    assert torch.allclose(bank.probs[1].float(), torch.full((1, 2, 2), 0.99 * 0.8), atol=1e-3)
    assert bank.probs.dtype == torch.float16 and bank.probs[0].abs().sum() == 0


def test_epi_bank_survives_checkpoint_resume(tmp_path):
    bank = EPIBank(4, (2, 2))
    bank.update(torch.tensor([0, 3]), torch.rand(2, 1, 2, 2))
    save_atomically({"epi_bank": bank.state_dict()}, str(tmp_path / "last.pt"))
    resumed = EPIBank(4, (2, 2))
    resumed.load_state_dict(torch.load(tmp_path / "last.pt", weights_only=True)["epi_bank"])
    assert torch.equal(resumed.probs, bank.probs) and torch.equal(resumed.seen, bank.seen)


def test_lv_template_selection_picks_most_similar_text():
    templates = LVTemplates(_OneHotEmbedder(), spatial_size=32)
    query = _OneHotEmbedder().embed([DEFAULT_TEMPLATE_TEXTS[5], DEFAULT_TEMPLATE_TEXTS[2]])
    query[0, :, 7] = 0.3  # still closest to template 5
    assert templates.select(query).tolist() == [5, 2]
    assert torch.equal(templates(query)[1], templates.masks[2])


def test_semi_loss_uses_labels_only_of_labelled_samples():
    templates = LVTemplates(_OneHotEmbedder(), spatial_size=8)
    it = LViTSemiIteration(EPIBank(2, (8, 8)), templates, LViTDiceBCE(), alpha=0.1)
    torch.manual_seed(0)
    pred = torch.rand(3, 1, 8, 8).clamp(0.05, 0.95)
    label = (torch.rand(3, 1, 8, 8) > 0.5).float()
    text = _OneHotEmbedder().embed(DEFAULT_TEMPLATE_TEXTS[:3])
    labelled = torch.tensor([True, False, False])
    index = torch.tensor([-1, 0, 1])
    out = it.compute_loss(pred, label, text, labelled, index)
    label2 = label.clone()
    label2[1:] = 1 - label2[1:]
    it2 = LViTSemiIteration(EPIBank(2, (8, 8)), templates, LViTDiceBCE(), alpha=0.1)
    assert torch.allclose(it2.compute_loss(pred, label2, text, labelled, index)["loss"], out["loss"])
    lv = 1 - torch.nn.functional.cosine_similarity(pred[1:].flatten(1), templates(text[1:]).flatten(1)).mean()
    unsup = LViTDiceBCE()(pred[1:], (pred[1:] > 0.5).float()) + 0.1 * lv
    expected = (LViTDiceBCE()(pred[:1], label[:1]) + 2 * unsup) / 3
    assert torch.allclose(out["loss"], expected, atol=1e-6)


def test_labelled_subset_and_semi_datalist(tmp_path):
    data = [{"name": f"mask_{i}.png", "label": f"l{i}", "image": f"i{i}"} for i in range(8)]
    names = labelled_subset(data, 0.25, seed=666, path=str(tmp_path / "l.txt"))
    assert len(names) == 2 and names == labelled_subset(data, 0.25, seed=666)
    semi = semi_datalist(data, str(tmp_path / "l.txt"))
    assert sum(d["labelled"] for d in semi) == 2
    unl = [d for d in semi if not d["labelled"]]
    assert [d["unlabelled_index"] for d in unl] == list(range(6)) and all("label" not in d for d in unl)


def test_train_semi_config_runs_logs_and_checkpoints_the_bank(tmp_path):
    """``[train, train_semi, demo]`` end to end: stage-A weights load, losses reach the handlers, bank is saved."""
    root = copy_bundle(LVIT_BUNDLE, str(tmp_path / "lvit"))
    overrides = {"dataset_dir": str(tmp_path / "data"), "max_epochs": 1, "img_size": 64, "save_after_epoch": 0}
    overrides |= {"demo_data#n_train": 8, "demo_data#n_val": 2, "demo_data#n_test": 2, "demo_data#size": 64}
    configs = config_paths(root, ["train.json", "train_semi.json", "demo.json"])
    with on_sys_path(root):
        first = ConfigWorkflow(config_file=configs, workflow_type="train", bundle_root=root, **overrides)
        with pytest.raises(RuntimeError) as info:  # never a silent random start
            first.initialize()
        assert "no stage-A checkpoint" in str(info.value.__cause__)
        initial = first.parser.get_parsed_content("network").state_dict()
        stage_a = {k: v + 0.01 if v.is_floating_point() else v.clone() for k, v in initial.items()}
        os.makedirs(os.path.join(root, "models"), exist_ok=True)
        torch.save(stage_a, os.path.join(root, "models", "model_stage_a.pt"))
        workflow = ConfigWorkflow(config_file=configs, workflow_type="train", bundle_root=root, **overrides)
        workflow.initialize()
        loaded = workflow.parser.get_parsed_content("network").state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in stage_a.items())  # the seeded init is 0.01 away
        workflow.run()
        trainer = workflow.parser.get_parsed_content("train#trainer")
        output = trainer.state.output
        assert isinstance(output, list) and {"loss", "loss_sup", "loss_unsup", "loss_lv"} <= set(output[0])
        bank = workflow.parser.get_parsed_content("epi_bank")
        assert bank.seen.all() and len(bank.seen) == 6  # 2 of 8 labelled
        saved = torch.load(os.path.join(root, "models", "last.pt"), weights_only=True)
        assert torch.equal(saved["epi_bank"]["probs"], bank.probs)
        workflow.finalize()
