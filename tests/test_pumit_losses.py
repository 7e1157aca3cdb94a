"""PUMIT losses against hand-computed values."""

import math

import torch
from monai.losses import DiceCELoss

from common.losses.pumit import (
    DeepSupervisionLoss,
    MIMLoss,
    TokenizerLoss,
    codebook_perplexity,
    prior_entropy_loss,
    token_entropy,
)
from common.networks.pumit import PatchDiscriminator


def test_prior_entropy_loss_uniform_and_collapsed():
    uniform = torch.full((2, 3, 4), 0.25)
    assert math.isclose(float(prior_entropy_loss(uniform)), -math.log(4), rel_tol=1e-6)
    onehot = torch.zeros(5, 4)
    onehot[:, 2] = 1
    assert abs(float(prior_entropy_loss(onehot))) < 1e-6
    # two tokens each sure of a different code: mean (0.5, 0.5, 0, 0) -> -log 2
    two = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]])
    assert math.isclose(float(prior_entropy_loss(two)), -math.log(2), rel_tol=1e-6)
    assert math.isclose(float(codebook_perplexity(two)), 2.0, rel_tol=1e-6)


def test_token_entropy_hand_computed():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # p = (.5, .5) and (.75, .25)
    h = (math.log(2) + -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))) / 2
    assert math.isclose(float(token_entropy(logits)), h, rel_tol=1e-6)


def test_tokenizer_loss_combination():
    x = torch.zeros(1, 3, 2, 4, 4)
    rec = torch.full_like(x, 0.5)
    logits = torch.zeros(1, 1, 1, 1, 4)
    out = {"pred": rec, "logits": logits, "probs": logits.softmax(-1)}
    loss = TokenizerLoss(quant_weight=0.03, entropy_weight=1.0)(out, x)
    expected = 0.5 + 0.03 * (-math.log(4)) + 1.0 * math.log(4)
    assert math.isclose(float(loss), expected, rel_tol=1e-6)


def test_tokenizer_loss_perceptual_slices_and_gan_step():
    seen = {}

    def perceptual(a, b):
        seen["shape"] = tuple(a.shape)
        return (a - b).abs().mean()

    disc = PatchDiscriminator(3, channels=(16, 16), num_post_convs=0)
    loss_fn = TokenizerLoss(perceptual=perceptual, max_perceptual_slices=3, discriminator=disc, gan_weight=1.0)
    x = torch.rand(2, 3, 8, 16, 16)
    rec = x.clone().requires_grad_(True)
    logits = torch.zeros(2, 1, 1, 1, 4)
    before = [p.clone() for p in disc.parameters()]
    loss_fn({"pred": rec, "logits": logits, "probs": logits.softmax(-1), "aniso_d": 0}, x)
    assert seen["shape"] == (2 * 3, 3, 16, 16)
    assert loss_fn.disc_loss_ema is not None and not loss_fn.gan_active  # a fresh D is far above 0.025
    assert any(not torch.equal(a, b) for a, b in zip(before, disc.parameters()))  # D took a step
    loss_fn.disc_loss_ema, loss_fn.last_disc_loss = 0.01, 0.02
    assert loss_fn.gan_active


def test_mim_loss_soft_cross_entropy_and_kl():
    pred = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    target = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    loss_fn = MIMLoss()
    loss = loss_fn({"pred": pred, "target": target})
    expected = (math.log(2) + -(0.5 * math.log(0.75) + 0.5 * math.log(0.25))) / 2
    assert math.isclose(float(loss), expected, rel_tol=1e-6)
    kl = (math.log(1 / 0.5) + 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)) / 2
    assert math.isclose(loss_fn.last_kl, kl, rel_tol=1e-5)


def test_deep_supervision_weights_and_upsampling():
    base = DiceCELoss(to_onehot_y=True, softmax=True)
    label = torch.randint(0, 2, (1, 1, 4, 8, 8))
    p0 = torch.randn(1, 2, 4, 8, 8)
    p1 = torch.randn(1, 2, 2, 4, 4)
    ds = DeepSupervisionLoss(base)
    up = torch.nn.functional.interpolate(p1, (4, 8, 8), mode="trilinear", align_corners=False)
    expected = (2 / 3) * base(p0, label) + (1 / 3) * base(up, label)
    torch.testing.assert_close(ds([p0, p1], label), expected)
    torch.testing.assert_close(ds(p0, label), base(p0, label))
