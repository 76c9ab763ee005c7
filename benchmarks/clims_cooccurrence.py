"""CLIMS vs the CAM baseline where co-occurrence must hurt the baseline: boats on water, trains on rails...

Everything is textseg's own: the scenes (:mod:`textseg.data.cooccurrence`), the evaluator (a small
CLIP trained with the ``textseg train clip`` recipe on captions of its own scenes, which name objects and
backgrounds separately: ``--clip-scenes`` of them, objects on their own background ``--clip-p-pair`` of the
time and ``--clip-p-blank`` blank "ground" scenes, so that a masked-out image does not look like an object;
``--clip-p-empty`` background-only scenes; ``--clip-part-captions objects`` also captions a boat on water
"a photo of boat.", which gives the evaluator CLIP's co-occurrence bias), its probe (:func:`textseg.wsss.probe.probe_evaluator`), and the CAM runs
(``textseg train cam``'s recipe, tiny backbone at output stride ``--cam-stride``, 16 by default), trained and
scored on scenes where an object sits on its own background ``--train-p-pair`` of the time, with
``--train-p-empty`` background-only scenes and another class's background beside the objects ``--train-p-extra``
of the time (held-out scenes follow the training distribution; the evaluator's corpus keeps its own). Per seed: a baseline CAM trains ``--base-steps``;
from it, with the same schedule and budget (``--steps`` more), train the baseline further (``cam``),
CLIMS (``clims``, the official loss alone, at ``--clims-lr``) and the ablations (``no_otm``, ``no_btm``, ``no_cbs``, ``no_reg``: that weight
0; ``cbs_wrong_words``: every class's CBS words are another class's background). Each is scored on
held-out scenes: CAM mIoU at the best background threshold of the sweep, and the co-occurring
background false-activation rate at that threshold, with each class's IoU and the activation on the neutral
ground (:func:`~textseg.data.cooccurrence.evaluate_scene_cams`).

    python benchmarks/clims_cooccurrence.py --seeds 0 1 2 --out runs/clims_cooc   # -> summary.json, figure.png
    python benchmarks/clims_cooccurrence.py --figure-from runs/clims_cooc --figure docs/clims_cooccurrence.png

The figure (:func:`write_figure`): held-out scenes whose object sits on its own background, image |
ground truth | CAM baseline and CLIMS masks (each run's CAMs at its own best threshold) of the first seed
and of the seed where CLIMS scores lowest.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from textseg.data.cooccurrence import (
    BACKGROUNDS,
    CLASSES,
    OBJECTS,
    PAIRS,
    evaluate_scene_cams,
    make_scenes,
    masked_views,
    scene_figure,
    write_scene_folder,
)
from textseg.train.cam import CAMTrainCfg, load_evaluator, train_cam
from textseg.train.clip import ClipRecipeConfig, train_clip
from textseg.train.config import load_config
from textseg.wsss.probe import probe_evaluator
from textseg.wsss.pseudo_labels import load_cam_model

ENGINE = ["train.progress=false", "train.tensorboard=false", "train.resume=none", "train.log_every=1000",
          "train.eval_every=0"]
CLIP_SETS = ["model.arch=clip", "model.lock_image=false", "model.lock_text=false", "model.clip.embed_dim=64",
             "model.clip.vision.layers=2", "model.clip.vision.width=64",
             "model.clip.vision.patch_size=8", "model.clip.text.context_length=16", "model.clip.text.width=64",
             "model.clip.text.heads=2", "model.clip.text.layers=2", "eval.templates=a photo of {}.",
             "train.batch_size=32", "train.lr=2e-3", "train.weight_decay=0.01", "train.warmup_steps=10"]
CAM_BATCH = 16  # train.batch_size of every CAM run (CBS sums over a batch's pairs: map_calibration's batch_pairs)
ABLATIONS = {"no_otm": ["clims.alpha=0"], "no_btm": ["clims.beta=0"], "no_cbs": ["clims.gamma=0"],
             "no_reg": ["clims.delta=0"], "cbs_wrong_words": ["clims.background={wrong}"]}


def cam_sets(data: Path, out: Path, seed: int, steps: int, size: int, threads: int, stride: int = 16,
             device: str = "cpu") -> list[str]:
    return [*ENGINE, f"train.device={device}", f"data.root={data}", "backbone=tiny", f"output_stride={stride}", "pretrained=false", "freeze_bn=false",
            f"data.crop_size={size}", f"train.batch_size={CAM_BATCH}", "train.lr=0.05", f"train.steps={steps}",
            f"train.seed={seed}", f"train.out_dir={out}", f"threads={threads}"]


def map_calibration(root: Path, evaluator, background: str | Path, cbs_threshold: float | None = 0.26,
                    weights: tuple[float, ...] = (10.0, 24.0, 1.0, 0.2), cam_stride: int = 16,
                    batch_pairs: float = 16.0, cbs_reference: str = "none") -> dict:
    """What CLIMS' objective says about hand-made maps on held-out scenes, the terms and similarities are
    the loss's own (:class:`~textseg.wsss.clims.CLIMSLoss`, its ``s_fg`` / ``s_bg``). For every (scene, present
    class ``k``) pair and map ``P`` in ``gt`` (the object's mask), ``empty`` (0: a blank grey image),
    ``full`` (1: the whole scene), ``part25`` (the top 25 % of the object's pixels), ``gt_x0.25`` (the
    mask at amplitude 0.25), ``gt_plus_bg`` (the mask plus the class's own co-occurring background) and
    ``ground`` (the neutral ground only) and ``gt_cam`` (the mask area-averaged to the CAM's resolution,
    ``cam_stride``, and resized back bilinearly: the best a map of that size can draw): mean cosine ``s(fg, t_k)``
    and ``s(bg, t_k)``, the unweighted terms (OTM, BTM, CBS per pair, REG = mean of ``P``) and ``loss`` = the
    weighted sum. ``by_class``: per class, ``[s_fg, s_bg, loss_batch]``, where ``loss_batch`` weighs CBS as the
    official loss does in a training batch: a *sum* over its ``batch_pairs`` present pairs (OTM and BTM are
    means), so a map that CBS dislikes costs ``batch_pairs`` times its per-pair CBS. A calibrated objective gives
    ``gt`` the lowest loss; where ``empty`` beats ``gt_cam`` in ``loss_batch``, training at that CAM resolution
    is pulled towards an empty map for that class."""
    from PIL import Image

    from textseg.io import load_image
    from textseg.wsss.cam_maps import image_tensor
    from textseg.wsss.clims import CLIMSLoss

    loss = CLIMSLoss(evaluator, list(OBJECTS), background, cbs_threshold=cbs_threshold, cbs_reference=cbs_reference)
    names = ("gt", "empty", "full", "part25", "gt_x0.25", "gt_plus_bg", "ground", "gt_cam")
    xs, maps, ks = [], {n: [] for n in names}, []
    for mpath in sorted((root / "masks").glob("*.png")):
        mask = np.asarray(Image.open(mpath))
        ctx = np.asarray(Image.open(root / "context" / mpath.name))
        x = image_tensor(load_image(root / "images" / mpath.name))
        for k, cls in enumerate(OBJECTS):
            m = mask == k + 1
            if not m.any():
                continue
            part = np.zeros_like(m)
            ys, xx = np.nonzero(m)  # raster order: the object's top rows first
            n = max(1, len(ys) // 4)
            part[ys[:n], xx[:n]] = True
            own = ctx == BACKGROUNDS.index(PAIRS[cls]) + 1
            coarse = torch.nn.functional.adaptive_avg_pool2d(torch.as_tensor(m, dtype=torch.float32)[None, None],
                                                             (m.shape[0] // cam_stride, m.shape[1] // cam_stride))
            coarse = torch.nn.functional.interpolate(coarse, m.shape, mode="bilinear", align_corners=True)[0, 0]
            for name, p in (("gt", m), ("empty", np.zeros_like(m)), ("full", np.ones_like(m)), ("part25", part),
                            ("gt_x0.25", 0.25 * m), ("gt_plus_bg", m | own),
                            ("ground", (ctx == 0) & (mask == 0)), ("gt_cam", coarse.numpy())):
                maps[name].append(torch.as_tensor(np.asarray(p, np.float32)))
            xs.append(x)
            ks.append(k)
    x, k_idx = torch.stack(xs), torch.tensor(ks)
    labels = torch.nn.functional.one_hot(k_idx, len(OBJECTS)).float()
    out = {"pairs": len(ks)}
    with torch.no_grad():
        for name, ps in maps.items():
            p = torch.stack(ps)[:, None] * labels[:, :, None, None]  # B x K x H x W, the pair's class only
            o = loss(p, x, labels)  # one pair per scene row: pairs in k_idx order
            s_fg, s_bg = o["s_fg"], o["s_bg"]
            terms = {"otm": float(o["otm"]), "btm": float(o["btm"]), "cbs": float(o["cbs"]) / o["pairs"],
                     "reg": float(torch.stack(ps).mean())}
            out[name] = {"s_fg": round(float(s_fg.mean()), 4), "s_bg": round(float(s_bg.mean()), 4),
                         **{t: round(v, 4) for t, v in terms.items()},
                         "loss": round(sum(w * terms[t] for w, t in zip(weights, ("otm", "btm", "cbs", "reg"))), 3)}
            by_class = {}
            for j, c in enumerate(OBJECTS):
                sel = k_idx == j
                if not sel.any():
                    continue
                oc = loss(p[sel], x[sel], labels[sel])
                t = (float(oc["otm"]), float(oc["btm"]), batch_pairs * float(oc["cbs"]) / oc["pairs"], float(p[sel, j].mean()))
                by_class[c] = [round(float(s_fg[sel].mean()), 3), round(float(s_bg[sel].mean()), 3),
                               round(sum(w * v for w, v in zip(weights, t)), 3)]
            out[name]["by_class"] = by_class
    return out


def run(args) -> dict:
    out = Path(args.out)
    t0 = time.time()
    train, val = out / "data" / "train", out / "data" / "val"
    corpus = out / "data" / "evaluator_corpus"
    scene_kw = {"p_pair": args.train_p_pair, "p_empty": args.train_p_empty, "p_extra": args.train_p_extra,
                "ground": args.ground}  # the CAM's training and held-out scenes (the same distribution)
    params = out / "data" / "scenes.json"
    wanted = {"train": args.train, "val": args.val, "size": args.size, **scene_kw}
    if not (val / "labels.json").is_file():
        write_scene_folder(make_scenes(args.train, args.size, seed=1000, **scene_kw), train)
        write_scene_folder(make_scenes(args.val, args.size, seed=2000, **scene_kw), val)
        params.write_text(json.dumps(wanted))
    elif params.is_file() and json.loads(params.read_text()) != wanted:  # (a folder from before has no record)
        raise SystemExit(f"{out / 'data'} holds scenes of {params.read_text()}, not {json.dumps(wanted)}: "
                         "use another --out")
    if not (corpus / "labels.json").is_file():  # the evaluator's own captioned scenes (see --clip-scenes)
        scenes = make_scenes(args.clip_scenes, args.size, seed=3000, p_pair=args.clip_p_pair,
                             p_blank=args.clip_p_blank, p_empty=args.clip_p_empty,
                             part_captions=args.clip_part_captions, ground=args.ground)
        write_scene_folder(scenes + masked_views(scenes, args.clip_masked_views, seed=3001,
                                                                blank=args.clip_masked_blank), corpus)
    torch.set_num_threads(args.threads)
    seeds = args.clip_seed  # one evaluator (evaluator/), or an ensemble (evaluator_s{seed}/ each)
    ev_paths, results = [], []
    for cs in seeds:
        ev_dir = out / ("evaluator" if len(seeds) == 1 else f"evaluator_s{cs}")
        ev_file = ev_dir / "result.json"
        if not ev_file.is_file():
            scale = ([f"model.clip.init_logit_scale={math.log(args.clip_logit_scale)}", "model.lock_logit_scale=true"]
                     if args.clip_logit_scale else [])
            res = train_clip(load_config(ClipRecipeConfig, None, [*CLIP_SETS, *ENGINE, f"train.device={args.device}",
                                                                  *scale, f"train.seed={cs}", f"train.steps={args.clip_steps}",
                                                                  f"model.clip.vision.image_size={args.clip_image_size}",
                                                                  f"data.train={corpus}", f"data.val={val}",
                                                                  f"train.out_dir={ev_dir}"]))
            ev_file.write_text(json.dumps({k: v for k, v in res.items() if isinstance(v, (int, float, str))}))
        ev_paths.append(ev_dir / "model.safetensors")
        results.append(json.loads(ev_file.read_text()))
    ev_weights = ",".join(str(p) for p in ev_paths)  # clims.evaluator_weights: A,B,C = the ensemble
    probe = probe_evaluator(val, load_evaluator("", ev_weights))
    members = [round(r["zeroshot_top1"], 2) for r in results]
    evaluator = {"zero_shot_top1": round(float(np.mean(members)), 2), "fg_over_bg": probe["fg_vs_bg_accuracy"],
                 "right_class_first": probe["fg_top1"], "probe": probe,
                 "train_seconds": [r.get("time_s") for r in results]}
    if len(seeds) > 1:
        evaluator["zero_shot_top1_members"] = members  # zero_shot_top1: their mean
    print("evaluator", json.dumps({k: v for k, v in evaluator.items() if k != "probe"}), flush=True)
    labels_train = json.loads((train / "labels.json").read_text())  # pairs in a training batch (CBS sums them)
    batch_pairs = CAM_BATCH * float(np.mean([len(v) for v in labels_train.values()]))
    evaluator["map_calibration"] = map_calibration(val, load_evaluator("", ev_weights), train / "background.txt",
                                                   args.cbs_threshold, cam_stride=args.cam_stride,
                                                   batch_pairs=batch_pairs, cbs_reference=args.cbs_reference)
    for name, row in evaluator["map_calibration"].items():
        if name != "pairs":
            print(f"calibration {name:10s}", json.dumps(row), flush=True)
    words = train / ("background.txt" if args.cbs_words == "pairs" else "background_all.txt")
    clims_base = [f"clims.evaluator_weights={ev_weights}", "clims.evaluator=", f"clims.background={words}",
                  f"clims.cbs_threshold={args.cbs_threshold}", f"clims.score={args.score}",
                  f"clims.cbs_reference={args.cbs_reference}"]
    runs: dict[str, list[dict]] = {}
    for seed in args.seeds:
        sd = out / f"seed{seed}"
        base = sd / "base"
        if not (base / "model.safetensors").is_file():
            train_cam(load_config(CAMTrainCfg, None, cam_sets(train, base, seed, args.base_steps, args.size, args.threads,
                                                                args.cam_stride, args.device)))
        init = f"init={base / 'model.safetensors'}"
        clims_sets = [f"mode={args.clims_mode}", *clims_base, f"train.lr={args.clims_lr}", *args.clims_set]
        variants = {"cam": ["mode=baseline"], "clims": clims_sets}
        for name, extra in ABLATIONS.items():
            variants[name] = [*clims_sets, *(e.format(wrong=train / "background_wrong.txt") for e in extra)]
        for name, extra in variants.items():
            if name not in args.runs:
                continue
            rd = sd / name
            score_file = rd / "score.json"
            if not score_file.is_file():
                t = time.time()
                train_cam(load_config(CAMTrainCfg, None, [*cam_sets(train, rd, seed + 1, args.steps, args.size,
                                                                    args.threads, device=args.device), init, *extra]))
                score = evaluate_scene_cams(load_cam_model(rd / "model.safetensors"), val)
                score["seconds"] = round(time.time() - t, 1)
                score_file.write_text(json.dumps(score))
            score = json.loads(score_file.read_text())
            if "class_iou" not in score:  # a run scored before the per-class IoU: score its model again
                score = {**evaluate_scene_cams(load_cam_model(rd / "model.safetensors"), val),
                         "seconds": score["seconds"]}
                score_file.write_text(json.dumps(score))
            runs.setdefault(name, []).append(score)
            print(f"seed {seed} {name:16s} mIoU {score['miou']:6.2f}  bg false act {score['bg_false_activation']:6.2f}"
                  f"  ground act {score['ground_activation']:6.2f}  (thr {score['best_threshold']:.2f}, "
                  f"{score['seconds']} s)  IoU " + " ".join(f"{c} {v:.1f}" for c, v in score["class_iou"].items()),
                  flush=True)

    def block(rows):
        m = [r["miou"] for r in rows]
        f = [r["bg_false_activation"] for r in rows]
        return {"miou_per_seed": m, "bg_false_activation_per_seed": f, "miou_mean": round(float(np.mean(m)), 3),
                "miou_std": round(float(np.std(m)), 3), "bg_false_activation_mean": round(float(np.mean(f)), 3),
                "bg_false_activation_std": round(float(np.std(f)), 3),
                "best_threshold_per_seed": [r["best_threshold"] for r in rows],
                "ground_activation_per_seed": [r["ground_activation"] for r in rows],
                "class_iou_mean": {c: round(float(np.mean([r["class_iou"][c] for r in rows])), 2) for c in CLASSES}}

    summary = {"seeds": list(args.seeds), "cam": block(runs["cam"]), "clims": block(runs["clims"]),
               "ablations": {n: block(runs[n]) for n in ABLATIONS if n in runs}, "evaluator": evaluator,
               "config": {k: v for k, v in vars(args).items() if k not in ("out", "figure_from", "figure")}}
    c, b = summary["clims"], summary["cam"]
    summary["clims_minus_cam_miou"] = round(c["miou_mean"] - b["miou_mean"], 3)
    summary["bg_false_activation_cut_pct"] = round(100 * (1 - c["bg_false_activation_mean"]
                                                         / max(b["bg_false_activation_mean"], 1e-9)), 2)
    summary["seconds"] = round(time.time() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    write_figure(out, out / "figure.png")
    return summary


def write_figure(run_dir: str | Path, path: str | Path, per_class: int = 1,
                 scales: tuple[float, ...] = (1.0, 0.5, 1.5, 2.0)) -> Path:
    """Render :func:`~textseg.data.cooccurrence.scene_figure` from a finished run folder: the first held-out
    scene(s) of each class whose own background is in the image; columns ground truth, then ``cam`` and
    ``clims`` of the first seed and of the seed with the lowest CLIMS mIoU, each thresholded at its
    ``score.json`` best threshold (label-keyed multi-scale + flip CAMs, as the scoring)."""
    from PIL import Image

    from textseg.io import load_image
    from textseg.wsss.cam_maps import cam_to_mask, image_tensor, multiscale_cam

    run_dir = Path(run_dir)
    val = run_dir / "data" / "val"
    summary = json.loads((run_dir / "summary.json").read_text())
    seeds, clims_miou = summary["seeds"], summary["clims"]["miou_per_seed"]
    shown = [seeds[0]] + ([min(seeds[1:], key=lambda s: clims_miou[seeds.index(s)])] if len(seeds) > 1 else [])
    labels = json.loads((val / "labels.json").read_text())
    keys = []
    for cls in PAIRS:
        bg = BACKGROUNDS.index(PAIRS[cls]) + 1
        found = [k for k in sorted(labels) if cls in labels[k]
                 and (np.asarray(Image.open(val / "context" / f"{k}.png")) == bg).any()]
        keys += [k for k in found[:per_class] if k not in keys]
    images = [np.asarray(load_image(val / "images" / f"{k}.png")) for k in keys]
    columns = {"ground truth": [np.asarray(Image.open(val / "masks" / f"{k}.png")) for k in keys]}
    for seed in shown:
        for name, title in (("cam", "CAM"), ("clims", "CLIMS")):
            rd = run_dir / f"seed{seed}" / name
            model = load_cam_model(rd / "model.safetensors").eval()
            thr = json.loads((rd / "score.json").read_text())["best_threshold"]
            ids = np.asarray([CLASSES.index(c) for c in model.class_names])
            index = {c: i for i, c in enumerate(model.class_names)}
            masks = []
            for k, im in zip(keys, images):
                ks, maps = multiscale_cam(model, image_tensor(Image.fromarray(im)),
                                          [index[c] for c in labels[k] if c in index], scales)
                masks.append(cam_to_mask(ks, maps, thr, ids).numpy())
            columns[f"{title} seed {seed} (t={thr:.2f})"] = masks
    return scene_figure(path, images, columns)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", help="run folder (required unless --figure-from)")
    ap.add_argument("--figure-from", metavar="RUN_DIR", help="only render the figure of this finished run")
    ap.add_argument("--figure", metavar="PNG", help="where --figure-from writes it (default RUN_DIR/figure.png)")
    ap.add_argument("--train", type=int, default=400, help="training scenes")
    ap.add_argument("--val", type=int, default=120, help="held-out scenes")
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--ground", choices=("neutral", "sand"), default="neutral",
                    help="what the scenes stand on: 'neutral' (the colour of a masked-out pixel) or 'sand'")
    ap.add_argument("--train-p-pair", type=float, default=1.0,
                    help="the CAM's training and held-out scenes: how often an object sits on its own background "
                         "(1.0: always, the classifier cannot tell them apart from its labels)")
    ap.add_argument("--train-p-empty", type=float, default=0.03,
                    help="share of background-only scenes there (a background's only negatives beside other classes')")
    ap.add_argument("--train-p-extra", type=float, default=0.1,
                    help="how often another class's background is also in an object's scene there")
    ap.add_argument("--clip-steps", type=int, default=2000)
    ap.add_argument("--clip-image-size", type=int, default=32,
                    help="the evaluator's input size (patch 8: 32 px = 4 x 4 patches, 64 px = 8 x 8)")
    ap.add_argument("--clip-logit-scale", type=float, default=100.0,
                    help="train the evaluator with its logit scale fixed at this value (100: real CLIP's, whose "
                         "cosines CLIMS' constants assume; 0 = learnable from 1/0.07, the recipe's default)")
    ap.add_argument("--clip-scenes", type=int, default=600, help="the evaluator's captioned scenes")
    ap.add_argument("--clip-p-pair", type=float, default=0.5,
                    help="how often an object sits on its own background in the evaluator's scenes")
    ap.add_argument("--clip-p-blank", type=float, default=0.1, help="share of blank 'ground' scenes there")
    ap.add_argument("--clip-p-empty", type=float, default=0.08,
                    help="share of background-only scenes there (no object: 'a photo of water.')")
    ap.add_argument("--clip-part-captions", choices=("", "objects", "all"), default="",
                    help="also caption the evaluator's scenes one object (or any named thing: all) at a time")
    ap.add_argument("--clip-masked-views", type=float, default=1.0,
                    help="share of the evaluator's scenes also shown as CLIMS sees them: the object alone (x * M, "
                         "'a photo of boat.') and the rest (x * (1 - M), 'a photo of water.'); masked_views")
    ap.add_argument("--clip-masked-blank", type=float, default=0.1,
                    help="with --clip-masked-views: share of those scenes also shown fully masked ('ground')")
    ap.add_argument("--clims-lr", type=float, default=0.001, help="train.lr of the CLIMS runs (cam: 0.05)")
    ap.add_argument("--clims-mode", choices=("clims", "baseline+clims"), default="clims",
                    help="mode of the CLIMS runs: the official loss alone, or ours: plus the baseline's classification loss")
    ap.add_argument("--clims-set", nargs="+", default=[], metavar="KEY=VALUE",
                    help="more `textseg train cam` settings of every CLIMS run, before each ablation's own "
                         "(e.g. the COCO preset's weights: clims.alpha=2 clims.beta=14 clims.gamma=2)")
    ap.add_argument("--base-steps", type=int, default=150, help="baseline CAM steps every run starts from")
    ap.add_argument("--steps", type=int, default=100, help="steps of each compared run (cam, clims, ablations)")
    ap.add_argument("--runs", nargs="+", choices=("cam", "clims", *ABLATIONS), default=["cam", "clims", *ABLATIONS],
                    help="which compared runs (cam and clims always; default all: the summary the issue asks for)")
    ap.add_argument("--score", choices=("cosine", "softmax"), default="cosine",
                    help="clims.score of the CLIMS runs: the official cosine or the evaluator's softmax over all prompts")
    ap.add_argument("--cam-stride", type=int, choices=(16, 8, 4), default=16,
                    help="output stride of the tiny CAM backbone (CAMConfig.output_stride): 16 = 6 x 6 maps at "
                         "96 px; 8 and 4 are denser (12 x 12, 24 x 24), same weights and receptive field")
    ap.add_argument("--cbs-threshold", type=float, default=0.26)
    ap.add_argument("--cbs-reference", choices=("none", "blank", "class"), default="none",
                    help="clims.cbs_reference: 'none' (official: --cbs-threshold is absolute), 'blank' (it is a margin "
                         "over a fully masked image's similarity to each background word) or 'class' (over the masked "
                         "foreground's similarity to its own class)")
    ap.add_argument("--cbs-words", choices=("pairs", "all"), default="pairs",
                    help="CBS words of the CLIMS runs: each class its own background ('pairs': background.txt) or "
                         "every background word for every class ('all': background_all.txt, the form of the official "
                         "lists); cbs_wrong_words always pairs each class with another's background")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (the README's numbers: 1; another count trains a different evaluator)")
    ap.add_argument("--device", default="cpu", help="train.device of every training (evaluator, CAMs); scoring runs on CPU")
    ap.add_argument("--clip-seed", type=int, nargs="+", default=[0, 1, 2],
                    help="train.seed of the evaluator; several (the default 0 1 2): one evaluator per seed, and CLIMS "
                         "judges by their ensemble (the mean of their cosines, textseg.models.ensemble)")
    args = ap.parse_args()
    args.runs = sorted(set(args.runs) | {"cam", "clims"})
    if args.figure_from:
        print(write_figure(args.figure_from, args.figure or Path(args.figure_from) / "figure.png"))
        return
    if not args.out:
        ap.error("--out is required (or --figure-from RUN_DIR)")
    s = run(args)
    keys = ("clims_minus_cam_miou", "bg_false_activation_cut_pct", "seconds")
    print(json.dumps({k: s[k] for k in keys} | {"cam": s["cam"]["miou_mean"], "clims": s["clims"]["miou_mean"]}))


if __name__ == "__main__":
    main()
