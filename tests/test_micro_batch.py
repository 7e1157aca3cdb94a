"""A batch run as micro-batches gives the whole-batch update (instance norm, sample-mean loss), events once."""

from __future__ import annotations

import copy

import pytest
import torch
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.losses import DiceCELoss
from monai.networks.nets import UNet

from common.engines.micro_batch import MicroBatchIteration
from common.losses.pumit import DeepSupervisionLoss


class _DeepSupervised(torch.nn.Module):
    """A UNet whose training output is a list (full resolution, half resolution), as PUMIT's segmenter."""

    def __init__(self) -> None:
        super().__init__()
        self.net = UNet(3, 1, 3, (4, 8), (2,), norm="instance")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = self.net(x)
        return [out, torch.nn.functional.avg_pool3d(out, 2)]


def _step(network, loss, micro_batch_size, clip_log):
    torch.manual_seed(0)
    data = [{"image": torch.rand(4, 1, 16, 16, 16), "label": torch.randint(0, 3, (4, 1, 16, 16, 16))}]
    trainer = SupervisedTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=data,
        network=network,
        optimizer=torch.optim.SGD(network.parameters(), lr=0.5),
        loss_function=loss,
        iteration_update=MicroBatchIteration(micro_batch_size),
        decollate=False,
    )
    events = []
    for event in (IterationEvents.FORWARD_COMPLETED, IterationEvents.BACKWARD_COMPLETED):
        trainer.add_event_handler(event, lambda e, event=event: events.append(event))
    trainer.add_event_handler(
        IterationEvents.BACKWARD_COMPLETED,
        lambda e: clip_log.append(torch.nn.utils.clip_grad_norm_(e.network.parameters(), 1e9).item()),
    )
    trainer.run()
    return trainer.state.output, events


@pytest.mark.parametrize("deep", [False, True], ids=["tensor", "deep_supervision"])
def test_micro_batches_equal_the_whole_batch_step(deep):
    torch.manual_seed(1)
    network = _DeepSupervised() if deep else UNet(3, 1, 3, (4, 8), (2,), norm="instance")
    loss = DiceCELoss(to_onehot_y=True, softmax=True)
    loss = DeepSupervisionLoss(loss) if deep else loss
    whole, chunked = copy.deepcopy(network), copy.deepcopy(network)
    clip_whole, clip_chunked = [], []
    out_whole, events_whole = _step(whole, loss, None, clip_whole)
    out_chunked, events_chunked = _step(chunked, loss, 1, clip_chunked)

    assert events_chunked == events_whole == [IterationEvents.FORWARD_COMPLETED, IterationEvents.BACKWARD_COMPLETED]
    assert clip_chunked == pytest.approx(clip_whole, rel=1e-5)  # handlers see the accumulated gradient
    assert float(out_chunked["loss"]) == pytest.approx(float(out_whole["loss"]), rel=1e-5)
    pred_whole, pred_chunked = (o["pred"][0] if deep else o["pred"] for o in (out_whole, out_chunked))
    assert pred_chunked.shape == pred_whole.shape and torch.allclose(pred_chunked, pred_whole, atol=1e-5)
    moved = max((a - b).abs().max().item() for a, b in zip(whole.parameters(), network.parameters()))
    diff = max((a - b).abs().max().item() for a, b in zip(whole.parameters(), chunked.parameters()))
    assert moved > 1e-3 and diff < 1e-5 * max(1.0, moved)


def test_micro_batch_size_must_be_positive():
    with pytest.raises(ValueError, match="micro_batch_size must be a positive integer"):
        MicroBatchIteration(0)
