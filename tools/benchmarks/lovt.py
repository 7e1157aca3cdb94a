"""``python -m tools benchmark lovt``: LoVT pretraining step and image-encoder inference on CPU.

Pretraining step: batch ``batch`` (default 8) at 224^2, reports of ``sentences`` sentences (about 12
tokens each), a bert-base-size report encoder with random weights (first 6 layers + embeddings
frozen), loss + backward + AdamW, in fp32 and bf16 autocast; the share of the forward+backward time
spent in the report encoder. Inference: image-encoder throughput (images/s). Each phase runs in a fresh
process (peak RSS per phase); GFLOP/s are printed against the machine's peaks.
"""

from __future__ import annotations

import tempfile
import time

import torch

from tools.benchmarks._harness import (
    PEAK_GFLOPS,
    autocast,
    count_flops,
    median_seconds,
    print_table,
    run_phase_subprocess,
)

MODULE = "tools.benchmarks.lovt"


def _batch(batch: int, sentences: int, tokens: int = 12, vocab: int = 28996) -> dict:
    length = sentences * tokens + 2
    owner = torch.arange(sentences).repeat_interleave(tokens)
    token_sentence = torch.cat([torch.tensor([-1]), owner, torch.tensor([-1])]).expand(batch, length).contiguous()
    return {
        "image": torch.rand(batch, 3, 224, 224),
        "input_ids": torch.randint(1000, vocab, (batch, length)),
        "attention_mask": torch.ones(batch, length, dtype=torch.long),
        "token_sentence": token_sentence,
        "num_sentences": sentences,
    }


def train_phase(batch: int = 8, sentences: int = 8, precision: str = "float32", repeats: int = 3) -> dict:
    """One optimizer step of the full model; also times the report encoder's forward+backward share."""
    from transformers import BertConfig

    from common.losses.lovt import LoVTLoss
    from common.networks.lovt import LoVTImageEncoder, LoVTModel, LoVTReportEncoder

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        BertConfig(vocab_size=28996).save_pretrained(folder)
        model = LoVTModel(LoVTImageEncoder(), LoVTReportEncoder(folder, random_init=True)).train()
    loss_fn = LoVTLoss()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=1e-6)
    inputs = _batch(batch, sentences)
    text = {k: inputs[k] for k in ("input_ids", "attention_mask", "token_sentence", "num_sentences")}

    def step() -> None:
        with autocast(precision):
            loss = loss_fn(model(**inputs))["total"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def text_fwd_bwd() -> None:
        with autocast(precision):
            out = model.report_encoder(**text)
        (out["z_local"].float().sum() + out["z_global"].float().sum()).backward()
        optimizer.zero_grad(set_to_none=True)

    seconds = median_seconds(step, repeats=repeats)
    text_seconds = median_seconds(text_fwd_bwd, repeats=repeats)
    flops = count_flops(step)
    return {
        "phase": f"train step b{batch}",
        "precision": precision,
        "seconds": seconds,
        "text_share": text_seconds / seconds,
        "gflops": flops / 1e9,
        "gflop_s": flops / 1e9 / seconds,
        "peak_gflop_s": PEAK_GFLOPS[precision],
    }


def infer_phase(batch: int = 8, precision: str = "float32", repeats: int = 3) -> dict:
    """Image-encoder forward (backbone, attention pool, projections) throughput."""
    from common.networks.lovt import LoVTImageEncoder

    encoder = LoVTImageEncoder().eval()
    x = torch.rand(batch, 3, 224, 224)

    def forward() -> None:
        with torch.no_grad(), autocast(precision):
            encoder(x)

    seconds = median_seconds(forward, repeats=repeats)
    flops = count_flops(forward)
    return {
        "phase": f"image encoder b{batch}",
        "precision": precision,
        "seconds": seconds,
        "images_s": batch / seconds,
        "gflops": flops / 1e9,
        "gflop_s": flops / 1e9 / seconds,
        "peak_gflop_s": PEAK_GFLOPS[precision],
    }


def main(batch: int = 8, sentences: int = 8, repeats: int = 3, threads: int = 2, precisions: str = "float32,bfloat16"):
    """Print the LoVT benchmark table (each phase in a fresh process)."""
    torch.set_num_threads(threads)
    rows = []
    start = time.perf_counter()
    for precision in precisions.split(","):
        options = {"precision": precision, "repeats": repeats, "threads": threads}
        rows.append(run_phase_subprocess(MODULE, "train_phase", batch=batch, sentences=sentences, **options))
        rows.append(run_phase_subprocess(MODULE, "infer_phase", batch=batch, **options))
    columns = ["phase", "precision", "seconds", "text_share", "images_s", "gflops", "gflop_s", "peak_gflop_s"]
    print_table(f"LoVT (224^2, {sentences} sentences, bert-base size)", rows, columns + ["peak_rss_gb"])
    print(f"total benchmark time {time.perf_counter() - start:.0f} s")
    return rows
