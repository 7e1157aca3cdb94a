"""``python -m tools benchmark lvit``: LViT forward / train-step time and cached vs on-the-fly text epochs.

Prints one table: forward (batch 1) and train step (batch ``batch``, loss + backward + Adam) at 224^2 in fp32 and
bf16 autocast with achieved GFLOP/s against the machine's peaks, peak RSS, and one demo-data epoch of the data
pipeline with cached text embeddings vs a BERT-Base-sized encoder run per sample (the official way).
"""

from __future__ import annotations

import json
import tempfile
import time
from contextlib import nullcontext

import torch

from common.data.lvit_templates import QATA_WORDS
from common.data.qata import lvit_datalist
from common.demo.lvit import make_lvit_demo
from common.losses.lvit import LViTDiceBCE
from common.networks.lvit import LViT
from common.text.lvit_embed import LViTTextEmbedder, random_bert_word_embedder
from tools.benchmarks._harness import PEAK_GFLOPS, count_flops, median_seconds, peak_rss_gb

PEAK = {"fp32": PEAK_GFLOPS["float32"], "bf16": PEAK_GFLOPS["bfloat16"]}


def _model_rows(batch: int, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    model = LViT()
    opt = torch.optim.Adam(model.parameters(), lr=3e-4)
    loss_fn = LViTDiceBCE()
    x1, t1 = torch.rand(1, 3, 224, 224), torch.rand(1, 10, 768)
    xb, tb = torch.rand(batch, 3, 224, 224), torch.rand(batch, 10, 768)
    yb = (torch.rand(batch, 1, 224, 224) > 0.8).float()
    rows = []
    for precision in ("fp32", "bf16"):
        ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else nullcontext

        def forward(ctx=ctx):
            model.eval()
            with torch.no_grad(), ctx():
                model(x1, t1)

        def step(ctx=ctx):
            model.train()
            opt.zero_grad(set_to_none=True)
            with ctx():
                pred = model(xb, tb)
            loss_fn(pred.float(), yb).backward()
            opt.step()

        for name, fn in (("forward b1", forward), (f"train step b{batch}", step)):
            flops = count_flops(fn)
            sec = median_seconds(fn, repeats=repeats)
            gflops = flops / sec / 1e9
            rows.append(
                {
                    "measurement": f"{name} {precision}",
                    "seconds": round(sec, 3),
                    "GFLOP": round(flops / 1e9, 1),
                    "GFLOP/s": round(gflops, 1),
                    "% of peak": round(100 * gflops / PEAK[precision], 1),
                    "peak RSS GB": round(peak_rss_gb(), 2),
                }
            )
    return rows


def _epoch_rows(n_train: int) -> list[dict]:
    from monai.data import DataLoader, Dataset, PILReader
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    from common.text.lvit_embed import LViTTextd

    with tempfile.TemporaryDirectory() as tmp:
        root = make_lvit_demo(f"{tmp}/demo", n_train=n_train, n_val=1, n_test=1)
        data = lvit_datalist(root, "Train")
        load = [
            LoadImaged(["image", "label"], reader=PILReader(reverse_indexing=False)),
            EnsureChannelFirstd(["image", "label"]),
        ]
        rows = []
        for mode in ("cached", "on the fly"):
            word = random_bert_word_embedder(QATA_WORDS, f"{tmp}/bert", hidden_size=768, num_layers=12)
            embedder = LViTTextEmbedder(word, cache_file=f"{tmp}/cache.pt" if mode == "cached" else None)
            if mode == "cached":
                embedder.prepare(data)  # once, before training (not part of the epoch)

            def embed_per_sample(d, e=embedder):
                e.cache.table.clear()  # the official way: every sample, every epoch
                return {**d, "text": e(d["text"])}

            text_t = LViTTextd("text", embedder) if mode == "cached" else embed_per_sample
            loader = DataLoader(Dataset(data, Compose([*load, text_t])), batch_size=2, num_workers=0)
            calls = embedder.encoder_calls
            start = time.perf_counter()
            for _ in loader:
                pass
            sec = time.perf_counter() - start
            rows.append(
                {
                    "measurement": f"data epoch, {n_train} images, text {mode}",
                    "seconds": round(sec, 3),
                    "encoder calls": embedder.encoder_calls - calls,
                    "peak RSS GB": round(peak_rss_gb(), 2),
                }
            )
    return rows


def main(batch: int = 2, repeats: int = 3, threads: int = 2, n_train: int = 24, json_out: str | None = None) -> list:
    """Run the benchmark with ``threads`` intra-op threads; print a table and optionally write JSON."""
    torch.set_num_threads(threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, peaks fp32 160 / bf16 614 GFLOP/s")
    rows = _model_rows(batch, repeats) + _epoch_rows(n_train)
    cached, fly = rows[-2]["seconds"], rows[-1]["seconds"]
    rows.append({"measurement": "data epoch speed-up from the cache", "seconds": round(fly / max(cached, 1e-9), 1)})
    keys = list(dict.fromkeys(k for r in rows for k in r))
    print(" | ".join(keys))
    for r in rows:
        print(" | ".join(str(r.get(k, "")) for k in keys))
    if json_out:
        with open(json_out, "w") as f:
            json.dump(rows, f, indent=2)
    return rows
