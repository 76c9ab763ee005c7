"""Does segmentation emerge from text supervision? Both GroupViT tracks on cell scenes, per seed.

Scenes (:func:`textseg.data.synthetic.cell_scenes`): objects on whole 8-px patch cells (the ceiling
is 100 mIoU), one flat colour per class, captions naming every object by its class noun ("a car and
a tree on the ground"), single objects and balanced pairs; 8 groups for 5 classes + background.
For every seed both tracks (``faithful``: the official GroupViT; ``variant``: textseg's ``pure``
track, :data:`textseg.models.groupvit.GROUPVIT_VARIANTS`) are trained from captions only on the
engine with the recipe's losses, then scored on held-out scenes (:mod:`textseg.train.emergence`):
zero-shot mIoU by the official inference, the oracle (majority-label) grouping mIoU, groups per
image, the zero-shot mIoU with the true partition in place of the learned assignment (grouping or
matching: :func:`textseg.train.emergence.true_partition_zero_shot`), and the bypass diagnostic (loss-relevant scores with the learned assignment replaced by a
random map, a per-image shuffle, one group). Also the ceiling and the random-init and
all-background baselines. Writes ``<out>/summary.json``::

    python benchmarks/groupvit_emergence.py --seeds 0 1 2 --out runs/emergence
    python benchmarks/groupvit_emergence.py --seeds 0 1 2 --questions --question-seeds 0 --jobs 3 --out DIR

``--questions`` adds the paper's open questions on seed(s) given: (a) mean vs sum pooling of the
assigned tokens, (b) a background threshold calibrated on validation scenes vs the fixed 0.9 / 0.95,
(c) scenes with 10-12 objects of 12 classes: a two-stage model (16 -> 8 groups) read by the official
inference from its 8 final groups vs from its 16 first-stage groups, (d) the training assignment
of the variant: soft (its default) vs Gumbel hard (official) vs hard without noise
(``emergence.NOISE_FREE_HARD``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import numpy as np
import torch

from textseg.data.synthetic import CELL_CLASSES_MANY, cell_scenes
from textseg.train import emergence as E


def run_track(variant: str, seed: int, train, test, steps: int, out: Path, **overrides) -> tuple[dict, object]:
    t0 = time.time()
    model = E.train_on_scenes(E.emergence_model_cfg(variant, **overrides), train, steps, str(out), seed=seed)
    res = {"mIoU": E.zero_shot(model, test)["mIoU"], **E.grouping_report(model, test),
           "train_s": round(time.time() - t0, 1)}
    return res, model


def threshold_question(model, val, test) -> dict:
    """(b): NVlabs' fixed thresholds 0.9 / 0.95 on the object-only scores vs one calibrated on ``val``."""
    sv, st = E.object_scores(model, val), E.object_scores(model, test)
    grid = [round(t, 2) for t in np.arange(0.05, 1.0, 0.05)]
    best = max(grid, key=lambda t: E.score_masks(E.threshold_background(sv, t), val)["mIoU"])
    return {"fixed_0.9": E.score_masks(E.threshold_background(st, 0.9), test)["mIoU"],
            "fixed_0.95": E.score_masks(E.threshold_background(st, 0.95), test)["mIoU"],
            "calibrated": E.score_masks(E.threshold_background(st, best), test)["mIoU"], "calibrated_t": best}


NAMES = {"faithful": "faithful", "variant": "pure"}


def main_job(track: str, seed: int, args: dict) -> dict:
    """One (track, seed) run of the main table, with its bypass rows (and (b) under --questions)."""
    torch.set_num_threads(args["threads"])
    test, val = cell_scenes(args["n_test"], seed=424242), cell_scenes(args["n_test"], seed=313131)
    train = cell_scenes(args["n_train"], seed=1000 + seed)
    res, model = run_track(NAMES[track], seed, train, test, args["steps"], Path(args["out"]) / f"{track}_s{seed}")
    res["bypass"] = E.bypass_diagnostic(model, test, seed)
    res["true_partition_mIoU"] = E.true_partition_zero_shot(model, test)["mIoU"]  # grouping or matching?
    if args["questions"]:
        res["threshold"] = threshold_question(model, val, test)
    print(json.dumps({"track": track, "seed": seed, "mIoU": round(res["mIoU"], 2),
                      "oracle": round(res["oracle_mIoU"], 2), "groups": res["groups_per_image"],
                      "train_s": res["train_s"]}), flush=True)
    return res


def question_job(name: str, seed: int, args: dict) -> dict:
    """One run of the open questions (a), (c), (d) (the variant; (b) rides on the main runs)."""
    torch.set_num_threads(args["threads"])
    out = Path(args["out"])
    test = cell_scenes(args["n_test"], seed=424242)
    train = cell_scenes(args["n_train"], seed=1000 + seed)
    if name == "a_sum_pool":
        return {name: run_track("pure", seed, train, test, args["steps"], out / f"q_sum_s{seed}",
                                assign_pool="sum")[0]}
    if name == "d_hard_gumbel":  # the official training assignment (Gumbel noise, straight-through)
        return {name: run_track("pure", seed, train, test, args["steps"], out / f"q_hard_s{seed}",
                                hard_assignment=True, gumbel_noise=True)[0]}
    if name == "d_hard_no_noise":  # straight-through argmax without noise (emergence.NOISE_FREE_HARD)
        return {name: run_track("pure", seed, train, test, args["steps"], out / f"q_hardnn_s{seed}",
                                **E.NOISE_FREE_HARD)[0]}
    many_train = cell_scenes(args["n_train"], seed=2000 + seed, size=96, classes=CELL_CLASSES_MANY,
                             objects=(10, 12), cells=(2, 3))
    many_test = cell_scenes(args["n_test"], seed=525252, size=96, classes=CELL_CLASSES_MANY,
                            objects=(10, 12), cells=(2, 3))
    # one two-stage model (16 first-stage groups -> 8 final groups): the official inference from the
    # final groups vs from the first-stage groups (GroupViT.official_stage = 0)
    res, model = run_track("pure", seed, many_train, many_test, args["steps"], out / f"q_many_s{seed}",
                           image_size=96, depths=[0, 0, 0], num_group_tokens=[16, 8, 0],
                           num_output_groups=[16, 8, 0])
    first = {"mIoU": E.zero_shot(model, many_test, stage=0)["mIoU"], **E.grouping_report(model, many_test, stage=0)}
    return {"c_many_objects_final_8_groups": res, "c_many_objects_first_stage_16_groups": first,
            "c_ceiling": E.ceiling(many_test)}


def run_all(jobs: list[tuple], n: int) -> list:
    """``(fn, *args)`` jobs, in ``n`` processes (1: here, in order)."""
    if n <= 1:
        return [fn(*a) for fn, *a in jobs]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(n, mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(fn, *a) for fn, *a in jobs]
        return [f.result() for f in futures]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="runs/groupvit_emergence")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--n-train", type=int, default=4000)
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel processes (one per core)")
    ap.add_argument("--tracks", nargs="+", default=["faithful", "variant"], choices=("faithful", "variant"))
    ap.add_argument("--questions", action="store_true", help="also measure the open questions (a)-(d)")
    ap.add_argument("--question-seeds", type=int, nargs="+", default=None,
                    help="seeds of the question runs (a), (c), (d) (default: --seeds)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    test = cell_scenes(args.n_test, seed=424242)
    torch.manual_seed(0)
    random_model = E.emergence_model_cfg("pure").build().eval()
    summary = {"ceiling": E.ceiling(test), "all_background": E.all_background(test),
               "random_init": E.zero_shot(random_model, test)["mIoU"],
               "random_init_oracle": E.grouping_report(random_model, test)["oracle_mIoU"],
               "steps": args.steps, "n_train": args.n_train, "n_test": args.n_test, "seeds": args.seeds}
    shared = {k: getattr(args, k) for k in ("threads", "n_test", "n_train", "steps", "questions")}
    shared["out"] = str(out)
    jobs = [(main_job, t, s, shared) for t in args.tracks for s in args.seeds]
    if args.questions:
        jobs += [(question_job, q, s, shared) for s in (args.question_seeds or args.seeds)
                 for q in ("a_sum_pool", "d_hard_gumbel", "d_hard_no_noise", "c")]
    results = run_all(jobs, args.jobs)
    for track in args.tracks:
        rows = [r for (fn, t, _, _), r in zip(jobs, results) if fn is main_job and t == track]
        summary[track] = {"variant_name": NAMES[track], "miou_per_seed": [r["mIoU"] for r in rows],
                          "oracle_per_seed": [r["oracle_mIoU"] for r in rows],
                          "groups_per_image": [r["groups_per_image"] for r in rows],
                          "true_partition_per_seed": [r["true_partition_mIoU"] for r in rows],
                          "miou_mean": float(np.mean([r["mIoU"] for r in rows])), "runs": rows}
    if args.questions:
        q: dict = {}
        for (fn, *_), r in zip(jobs, results):
            if fn is question_job:
                for k, v in r.items():
                    q.setdefault(k, []).append(v)
        summary["questions"] = q
    summary["wall_s"] = round(time.time() - t_start, 1)
    # CPU seconds of this process and its (joined) workers: on idle cores the wall time is about
    # cpu_s / --jobs, whatever the load was when it ran
    ru = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    summary["cpu_s"] = round(sum(r.ru_utime + r.ru_stime for r in ru), 1)
    summary["load_avg"] = os.getloadavg()
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    short = {k: v for k, v in summary.items() if k not in ("faithful", "variant", "questions")}
    for track in args.tracks:
        short[track] = {k: summary[track][k] for k in ("miou_per_seed", "oracle_per_seed", "groups_per_image",
                                                       "true_partition_per_seed")}
    print(json.dumps(short, indent=1))


if __name__ == "__main__":
    main()
