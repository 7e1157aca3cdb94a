"""LoVT losses against hand-worked values and the spec's positive-count facts."""

from __future__ import annotations

import math

import torch

from common.losses.lovt import (
    LoVTLoss,
    SmpBinaryDice,
    global_info_nce,
    image_positive_weights,
    local_intra_sample_contrastive,
)


def test_image_positive_counts_match_spec():
    w = image_positive_weights(7, 7)
    counts = (w > 0).sum(1)
    assert counts.min() == 22 and counts.max() == 49
    assert abs(counts.float().mean().item() - 35.0) < 0.1
    torch.testing.assert_close(w.sum(1), torch.ones(49))
    corner = w[0, :5] / w[0, 0]  # before normalisation the corner row starts 1, 0.904, 0.817, 0.739, 0.668
    torch.testing.assert_close(corner, torch.tensor([1.0, 0.904, 0.817, 0.739, 0.668]), atol=5e-4, rtol=0)


def test_local_loss_hand_worked_two_elements():
    # z = e1, e2; attended = e1, e1 -> cos = [[1, 1], [0, 0]]; identity positives; tau 0.5
    z = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    za = torch.tensor([[[2.0, 0.0], [3.0, 0.0]]])
    weights = torch.tensor([[0.25, 0.75]])
    l2att, att2l = local_intra_sample_contrastive(z, za, torch.eye(2), weights, temperature=0.5)
    # rows s = [[2, 2], [0, 0]]: l_0 = -2 + log(2e^2) = log 2, l_1 = log 2
    assert math.isclose(l2att.item(), math.log(2), rel_tol=1e-6)
    # columns s^T = [[2, 0], [2, 0]]: l_0 = -2 + log(e^2 + 1), l_1 = -0 + log(e^2 + 1)
    expected = 0.25 * (-2 + math.log(math.e**2 + 1)) + 0.75 * math.log(math.e**2 + 1)
    assert math.isclose(att2l.item(), expected, rel_tol=1e-6)


def test_local_loss_masks_padded_elements():
    z = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])
    za = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-7.0, 1.0]]])
    mask = torch.tensor([[True, True, False]])
    l2att, att2l = local_intra_sample_contrastive(z, za, torch.eye(3), torch.tensor([[0.5, 0.5, 0.0]]), mask, 1.0)
    # only the 2x2 valid block: s = I, l_i = -1 + log(e + 1) for both rows and columns
    expected = -1 + math.log(math.e + 1)
    assert math.isclose(l2att.item(), expected, rel_tol=1e-6)
    assert math.isclose(att2l.item(), expected, rel_tol=1e-6)


def test_local_loss_stops_gradient_through_weights():
    z = torch.randn(2, 4, 8, requires_grad=True)
    weights = torch.rand(2, 4, requires_grad=True)
    loss = sum(local_intra_sample_contrastive(z, torch.randn(2, 4, 8), torch.eye(4), weights))
    loss.backward()
    assert weights.grad is None and z.grad is not None


def test_global_info_nce_hand_worked():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    a2b, b2a = global_info_nce(a, b, temperature=1.0)
    c = 1 / math.sqrt(2)
    # logits = [[1, c], [0, c]]
    row = [-1 + math.log(math.e + math.exp(c)), -c + math.log(1 + math.exp(c))]
    col = [-1 + math.log(math.e + 1), -c + math.log(2 * math.exp(c))]
    assert math.isclose(a2b.item(), sum(row) / 2, rel_tol=1e-6)
    assert math.isclose(b2a.item(), sum(col) / 2, rel_tol=1e-6)


def test_total_loss_weights():
    torch.manual_seed(0)
    b, s = 3, 4
    out = {
        "image_local": torch.randn(b, 49, 16),
        "report_to_image": torch.randn(b, 49, 16),
        "image_weights": torch.softmax(torch.randn(b, 49), -1),
        "report_local": torch.randn(b, s, 16),
        "image_to_report": torch.randn(b, s, 16),
        "report_weights": torch.softmax(torch.randn(b, s), -1),
        "sentence_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool),
        "image_global": torch.randn(b, 16),
        "report_global": torch.randn(b, 16),
    }
    terms = LoVTLoss()(out)
    expected = (
        0.75 * terms["global_a2b"]
        + 0.25 * terms["global_b2a"]
        + 0.375 * (terms["image_l2att"] + terms["image_att2l"])
        + 0.375 * (terms["report_l2att"] + terms["report_att2l"])
    )
    torch.testing.assert_close(terms["total"], expected)
    assert all(torch.isfinite(v) for v in terms.values())


def test_smp_binary_dice():
    logits = torch.tensor([[[[10.0, -10.0], [10.0, -10.0]]]])
    target = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    p = torch.sigmoid(torch.tensor(10.0)).item()
    expected = 1 - 2 * p / (2 * p + 2 * (1 - p) + 1)
    assert math.isclose(SmpBinaryDice()(logits, target).item(), expected, rel_tol=1e-5)
    assert SmpBinaryDice()(logits, torch.zeros_like(target)).item() == 0.0  # empty batch -> 0
