"""``textseg train lseg``: supervised LSeg training with a frozen text encoder.

    textseg train lseg --data ../shared/data/camvid --backbone lite0 --text-encoder minilm \\
        --epochs 10 --batch-size 8 --crop 352 480 --out runs/lseg_camvid
    torchrun --nproc_per_node 4 -m textseg.cli train lseg --data A --data B ...   # DDP

Several ``--data`` are concatenated, each image scored against its own dataset's labels.
``--resume`` continues from the newest checkpoint in ``--out`` at the same step.
"""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    from textseg.train.lseg import LSegTrainConfig

    d = LSegTrainConfig()
    p = sub.add_parser("lseg", help="train LSeg (dense features vs frozen label embeddings)")
    p.add_argument("--data", action="append", required=True, metavar="ROOT[:SPLIT]",
                   help="a dataset folder (images/, masks/, classes.txt, splits/); repeatable")
    p.add_argument("--train-split", default=d.train_split)
    p.add_argument("--val-split", default=d.val_split, help="validated after each epoch ('none' to skip)")
    p.add_argument("--backbone", default=d.backbone,
                   help="lite0 / lite1 / lite2 (EfficientNet-Lite, ImageNet weights) or clip (CLIP's ViT, --init-from)")
    p.add_argument("--init-from", default=None, metavar="CLIP_CKPT",
                   help="CLIP checkpoint (any supported format) for backbone clip and/or text encoder clip")
    p.add_argument("--text-encoder", default=d.text_encoder, choices=["minilm", "clip"])
    p.add_argument("--features", type=int, default=d.features, help="DPT decoder width")
    p.add_argument("--block", default=d.block, choices=["none", "bottleneck", "depthwise"],
                   help="spatial regularisation block on the logits")
    p.add_argument("--block-depth", type=int, default=d.block_depth)
    p.add_argument("--template", default=d.template, help="prompt around each label, e.g. 'a photo of a {}.'")
    p.add_argument("--crop", type=int, nargs=2, default=list(d.crop), metavar=("H", "W"))
    p.add_argument("--scale", type=float, nargs=2, default=list(d.scale), metavar=("MIN", "MAX"))
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--max-steps", type=int, default=d.max_steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="per process")
    p.add_argument("--optimizer", default=d.optimizer, choices=["adamw", "sgd"])
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--backbone-lr-mult", type=float, default=d.backbone_lr_mult)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--class-balance", action="store_true", help="median-frequency class weights (SegNet)")
    p.add_argument("--freeze-stages", type=int, default=d.freeze_stages,
                   help="keep the stem and this many leading backbone stages frozen")
    p.add_argument("--light", action="store_true",
                   help="light CPU decoder: separable convs, dense map at stride 4")
    p.add_argument("--freeze-bn", action="store_true", help="keep the backbone's BN statistics fixed")
    p.add_argument("--learn-logit-scale", action="store_true",
                   help="learn the temperature (default: fixed at 1/0.07, as lang-seg)")
    p.add_argument("--no-amp", dest="amp", action="store_false", help="no bf16 autocast on GPU")
    p.add_argument("--workers", type=int, default=d.workers)
    p.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads per process")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--save-every", type=int, default=d.save_every, help="steps between checkpoints")
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--val-every", type=int, default=d.val_every, help="epochs between validations")
    p.add_argument("--eval-scale", type=float, default=d.eval_scale,
                   help="validate on images resized by this factor (e.g. 0.5 for a model trained at half size)")
    p.add_argument("--image-size", type=int, default=d.image_size,
                   help="short side the model expects at inference (saved in the card; default: the crop's)")
    p.add_argument("--time-limit", type=float, default=d.time_limit,
                   help="seconds: after each epoch, shorten the run (and its LR decay) to end in time")
    p.add_argument("--out", default=d.out_dir)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--device", default=d.device, help="auto / cpu / cuda")
    p.add_argument("--json", action="store_true", help="print the final summary as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from textseg.train.lseg import LSegTrainConfig, train

    cfg = LSegTrainConfig(
        data=args.data, train_split=args.train_split,
        val_split=None if str(args.val_split).lower() == "none" else args.val_split,
        backbone=args.backbone, text_encoder=args.text_encoder, init_from=args.init_from, features=args.features, block=args.block,
        block_depth=args.block_depth, template=args.template, crop=tuple(args.crop), scale=tuple(args.scale),
        epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size, optimizer=args.optimizer,
        lr=args.lr, backbone_lr_mult=args.backbone_lr_mult, weight_decay=args.weight_decay,
        class_balance=args.class_balance, freeze_bn=args.freeze_bn, freeze_stages=args.freeze_stages,
        light=args.light, learn_logit_scale=args.learn_logit_scale, amp=args.amp, workers=args.workers, threads=args.threads, seed=args.seed,
        save_every=args.save_every, log_every=args.log_every, val_every=args.val_every, out_dir=args.out,
        resume=args.resume, device=args.device, eval_scale=args.eval_scale, time_limit=args.time_limit, image_size=args.image_size,
    )
    result = train(cfg)
    from textseg.train import dist

    if dist.is_main():
        if args.json:
            print(json.dumps(result))
        else:
            print(f"done: {result['step']} steps in {result['seconds']:.0f}s, final loss {result['loss']:.4f}")
            for v in result["val"]:
                print(f"  val mIoU {v['miou']:.2f}  {v['dataset']}")
    dist.cleanup()
    return 0
