"""Engine overhead: samples/s of a ViT-B/16 CLIP training step through ``Trainer`` vs the bare loop.

Both run in the same process on the same model and AdamW optimizer (the Trainer's own), with the
same batches, interleaved in rounds (alternating which runs first) so that machine load hits both
alike:

* bare: ``loss = module(batch)["loss"]; loss.backward(); opt.step(); opt.zero_grad()``
* engine: ``Trainer.fit()`` for the same number of steps (data loading + collation from a
  map-style dataset, LR schedule, metric accumulation, JSONL logging every step, progress bar),
  excluding only checkpoint writing (every ``ckpt_every`` steps, not per step).

    .venv/bin/python benchmarks/bench_train.py                 # ViT-B/16 CLIP, batch 2, CPU
    .venv/bin/python benchmarks/bench_train.py --small         # a tiny CLIP, to check the script

Prints samples/s of each and the ratio engine / bare (target >= 0.95), by wall clock and by this
process's CPU time (the latter is less disturbed by other processes on a shared machine).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from textseg.models.clip import CLIP, CLIPConfig, TextConfig, VisionConfig
from textseg.train.clip import ClipTrainModule
from textseg.train.engine import TrainConfig, Trainer, move_to


class RandomPairs(torch.utils.data.Dataset):
    def __init__(self, n: int, image_size: int, context: int, vocab: int):
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, 3, image_size, image_size, generator=g)
        self.tokens = torch.randint(1, vocab - 1, (n, context), generator=g)
        self.tokens[:, -1] = vocab - 1  # end-of-text token is the argmax

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "text": self.tokens[i]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps-per-round", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--small", action="store_true", help="tiny CLIP instead of ViT-B/16")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.small:
        cfg = CLIPConfig(embed_dim=64, vision=VisionConfig(image_size=64, layers=2, width=128, patch_size=16),
                         text=TextConfig(width=128, heads=2, layers=2))
    else:
        cfg = CLIPConfig()  # ViT-B/16 image tower, 12-layer 512-wide text tower, 224 px, 77 tokens
    model = CLIP(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    module = ClipTrainModule(model, lock_image=False, lock_text=False)
    bs = args.batch_size
    data = RandomPairs(bs * 8, cfg.vision.image_size, cfg.text.context_length, cfg.text.vocab_size)

    with tempfile.TemporaryDirectory() as tmp:
        tcfg = TrainConfig(out_dir=tmp, steps=10**9, batch_size=bs, lr=1e-5, warmup_steps=0, log_every=1,
                           progress=True, tensorboard=False, resume="none", device="cpu", shuffle=True)
        trainer = Trainer(tcfg, module, data)
        trainer.save_checkpoint = lambda: None  # checkpoint I/O is periodic, not per step
        opt = trainer.optimizer
        bare_batches = [move_to(torch.utils.data.default_collate([data[i] for i in range(s, s + bs)]), "cpu")
                        for s in range(0, len(data), bs)]

        def bare(steps: int) -> tuple[float, float]:
            t0, c0 = time.perf_counter(), time.process_time()
            for i in range(steps):
                loss = module(bare_batches[i % len(bare_batches)])["loss"]
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            return time.perf_counter() - t0, time.process_time() - c0

        def engine(steps: int) -> tuple[float, float]:
            target = trainer.step + steps

            def stop_at(tr):
                if tr.step >= target:
                    tr.stop()

            trainer.callbacks = [stop_at]
            t0, c0 = time.perf_counter(), time.process_time()
            trainer.fit()
            return time.perf_counter() - t0, time.process_time() - c0

        bare(1)  # warm-up (allocator, thread pool) for both: they share the model and optimizer
        totals = {"bare": [0.0, 0.0], "engine": [0.0, 0.0]}
        for r in range(args.rounds):  # alternate which goes first, so order effects cancel
            for name, fn in ((("bare", bare), ("engine", engine)) if r % 2 == 0 else (("engine", engine), ("bare", bare))):
                wall, cpu = fn(args.steps_per_round)
                totals[name][0] += wall
                totals[name][1] += cpu
    n = args.rounds * args.steps_per_round * bs
    print(f"CLIP {'tiny' if args.small else 'ViT-B/16'} ({n_params / 1e6:.1f} M params), batch {bs}, CPU, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds x {args.steps_per_round} steps each")
    for i, clock in enumerate(("wall-clock", "process CPU time")):
        sb, se = n / totals["bare"][i], n / totals["engine"][i]
        print(f"[{clock}] bare forward+backward+step: {sb:.3f} samples/s | engine (Trainer.fit): {se:.3f} samples/s"
              f" | ratio engine/bare {se / sb:.3f} (overhead {100 * (1 - se / sb):+.1f} %)")


if __name__ == "__main__":
    main()
