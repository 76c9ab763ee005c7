"""Build the offline model's learned dense head (``src/textseg/assets/offline_heads.*``).

The ConSE bridge of the offline model only knows ImageNet's 1000 classes (no people, no stuff).
This script learns, from image captions alone, a small **dense text-image head** on the frozen
towers (EfficientNet-Lite0 features at stride 32, or 16 with ``--output-stride 16``, MiniLM word embeddings):

* **labels from captions**: every caption is tagged with the project's noun tagger
  (:func:`textseg.train.nouns.extract_nouns`, NN / NNS), nouns are lower-cased and singularised
  (:func:`singular`), and a few word groups are folded into their head word (:data:`GROUPS`: "man",
  "woman", "girl" ... also count for "person"). A noun's image-level target is the fraction of the
  image's captions that name it (soft multi-label targets); the vocabulary is every noun named for at
  least ``--min-images`` images;
* **the head** (:class:`~textseg.models.offline.DenseHead`): a linear map of every 1280-d Lite0
  feature location into MiniLM's 384-d space and a linear map of the word's MiniLM embedding, scored
  by ``scale * cos + bias`` at every location (MaskCLIP-style dense scoring, so any label text can be
  scored, not only the vocabulary);
* **weak supervision** (CAM-style multiple-instance learning): an image's logit for a noun is the
  log-sum-exp pool of its location logits (``--lse-r``), trained with binary cross-entropy against
  the caption targets. Only the head trains; the towers' features are computed once. Stuff words
  (:data:`STUFF`: sky, road, grass ...) that photos show far more often than captions name them count
  an unnamed image as a weak negative only (``--unnamed-weight``); a stuff word that a scene word implies
  (:data:`IMPLIED`: sky, where a caption names a beach, mountain, ocean, lake ...) is a soft positive
  there (``--implied-target``);
* **per-word trust** (where the head beats the bridge): the images are split into ``--trust-folds``
  folds; a head trained on the others ranks each fold's images, the bridge ranks them too, and a
  word's trust is ``clamp(0.5 + (AP_head - AP_bridge) / (2 margin), 0, 1)`` (image-level average
  precision against the caption nouns; shipped as ``vocab_trust``). At run time a label's head gate is
  multiplied by the trust of its nearest vocabulary word, so "dog" (which the bridge knows from 118
  ImageNet breeds) stays with the bridge and "person" goes to the head;
* **class prior** (``class_prior``; ``--prior-source``: the Flickr8k photos by default, ``none``: off): the
  offline model's mean per-location ImageNet class probability over ordinary photos as it runs (stride 16,
  short side 448), label-free; ``OfflineCfg.prior_lift`` lifts a bridge
  label whose classes these ordinary photos rarely show (cat, dining table, bottle).

Data (research use; never shipped, only the learned head is): ``flickr8k-1k`` (1,000 photos,
5,000 captions) and COCO-MINI's ``train2017`` half (80 photos, 400 captions). COCO-MINI's val2017
half is never read here.

    python scripts/build_offline_heads.py                      # ../shared/data -> src/textseg/assets
    python scripts/build_offline_heads.py --limit 16 --epochs 2 --out /tmp/h   # CI smoke run (seconds)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from textseg.models.offline import ASSETS, HEADS, DenseHead, OfflineCfg  # noqa: E402

DATA = Path(os.environ.get("TEXTSEG_SHARED_DATA", ROOT.parent / "shared" / "data"))
NOUN_TAGS = ("NN", "NNS")
# Words also counted for a group's head word (a caption saying "a man" shows a person).
GROUPS: dict[str, tuple[str, ...]] = {
    "person": ("man", "woman", "boy", "girl", "child", "kid", "people", "lady", "guy", "baby", "player",
               "skier", "surfer", "rider", "biker", "bicyclist", "skateboarder", "snowboarder", "climber",
               "swimmer", "runner", "toddler", "crowd", "adult", "teenager", "cyclist", "worker", "couple",
               "family", "group", "team", "football", "soccer", "dancer", "hiker", "wrestler", "men"),
    "dog": ("puppy", "poodle", "terrier", "collie", "retriever", "dachshund", "greyhound", "shepherd"),
    "road": ("street", "pavement"),
    "grass": ("lawn", "field", "yard", "meadow"),
    "water": ("lake", "river", "ocean", "pool", "sea", "wave", "waves"),
    "building": ("house", "store", "shop", "city", "town", "skyscraper", "church", "tower"),
    "sky": ("cloud", "sunset", "sunrise"),
    "tree": ("trees", "forest", "woods"),
}
# Stuff that photos show far more often than captions name it: an image whose captions do not name it
# is weak evidence of its absence (its negative term counts ``--unnamed-weight``), not a negative.
STUFF = ("sky", "grass", "road", "water", "building", "tree", "wall", "ground", "floor", "sidewalk", "street",
         "field", "snow", "sand", "dirt", "mountain", "hill", "cloud", "fence", "pavement")
# Stuff that a scene word implies although captions rarely name it: an image whose captions name a scene
# word below gets the stuff word as a soft positive (target ``--implied-target``; 0: off). Sky is named
# for 2 % of Flickr8k photos, so without this its head learns "almost never here".
IMPLIED: dict[str, tuple[str, ...]] = {
    "sky": ("beach", "mountain", "ocean", "hill", "lake", "sea", "cliff", "river", "shore", "landscape", "skyline"),
}
IRREGULAR = {"men": "man", "women": "woman", "children": "child", "people": "people", "feet": "foot",
             "teeth": "tooth", "mice": "mouse", "geese": "goose", "dice": "dice", "grass": "grass",
             "glasses": "glasses", "pants": "pants", "shorts": "shorts", "jeans": "jeans", "sunglasses": "sunglasses",
             "clothes": "clothes", "stairs": "stairs", "bus": "bus", "dress": "dress", "waves": "wave"}
STOP = {"front", "top", "side", "picture", "photo", "image", "background", "view", "way", "something", "air",
        "lot", "couple", "group", "bunch", "while", "area", "one", "other", "middle", "edge", "end", "camera",
        "color", "colors", "kind", "thing", "things", "day", "time", "fun", "look", "game", "part", "back",
        "distance", "number", "pair", "shot", "close", "closeup", "shade"}


def singular(word: str) -> str:
    """Lower-cased singular of a noun (irregulars first, then -ies / -es / -s)."""
    w = word.lower()
    if w in IRREGULAR:
        return IRREGULAR[w]
    if w.endswith("ies") and len(w) > 4:
        return w[:-3] + "y"
    if w.endswith(("ches", "shes", "sses", "xes")):
        return w[:-2]
    if w.endswith("s") and not w.endswith(("ss", "us", "is")) and len(w) > 3:
        return w[:-1]
    return w


def read_pairs(flickr: Path | None, coco: Path | None, limit: int) -> list[tuple[Path, list[str]]]:
    """(image path, captions) of flickr8k-1k and COCO-MINI's train2017 half (never val2017)."""
    pairs = []
    if flickr is not None and (flickr / "captions.jsonl").is_file():
        for line in (flickr / "captions.jsonl").read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                pairs.append((flickr / r["image"], r["captions"]))
    if coco is not None and (coco / "captions.jsonl").is_file():
        meta = json.loads((coco / "images_meta.json").read_text())
        train = {m["image"] for m in meta if m["split"] == "train2017"}
        for line in (coco / "captions.jsonl").read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                if Path(r["image"]).stem in train:
                    pairs.append((coco / r["image"], r["captions"]))
    if limit:
        pairs = pairs[:limit]
    if not pairs:
        raise SystemExit(f"no captioned images found under {flickr} / {coco}")
    return pairs


def caption_targets(pairs, min_images: int, max_vocab: int, implied_target: float = 0.0) -> tuple[list[str], torch.Tensor]:
    """(vocabulary, ``N x V`` soft targets = fraction of an image's captions naming the noun; a stuff
    word of :data:`IMPLIED` at least ``implied_target`` where a caption names one of its scene words)."""
    from textseg.train.nouns import extract_nouns

    per_image: list[Counter] = []
    group_of = {w: head for head, words in GROUPS.items() for w in words}
    for _, caps in pairs:
        c: Counter = Counter()
        for cap in caps:
            words = {singular(w) for w in extract_nouns(cap, tags=NOUN_TAGS)}
            words = {w for w in words if w.isalpha() and len(w) > 2 and w not in STOP}
            words |= {group_of[w] for w in words if w in group_of}
            c.update(sorted(words))
        per_image.append(c)
    df = Counter(w for c in per_image for w in c)
    ranked = sorted(df.items(), key=lambda kv: (-kv[1], kv[0]))  # ties by word: the same order every run
    vocab = [w for w, n in ranked[:max_vocab] if n >= min_images]
    if not vocab:
        vocab = [w for w, _ in ranked[:8]]
    index = {w: j for j, w in enumerate(vocab)}
    y = torch.zeros(len(pairs), len(vocab))
    for i, (c, (_, caps)) in enumerate(zip(per_image, pairs)):
        for w, n in c.items():
            if w in index:
                y[i, index[w]] = min(1.0, n / max(1, min(len(caps), 3)))
        if implied_target:
            for stuff_word, scene in IMPLIED.items():
                if stuff_word in index and any(w in c for w in scene):
                    y[i, index[stuff_word]] = max(float(y[i, index[stuff_word]]), implied_target)
    return vocab, y


@torch.no_grad()
def image_features(pairs, short_side: int, batch: int = 8, output_stride: int = 32) -> list[torch.Tensor]:
    """Frozen Lite0 feature maps (``1280 x h x w``, bf16) of every image: short side ``short_side``,
    centre-cropped to ``short x 1.3 short`` (landscape) or its transpose (portrait), multiples of 32,
    so that images batch (the Segmenter sees the same scale at run time). ``output_stride`` 16 / 8
    dilates the trunk's last stage(s) as :class:`~textseg.models.offline.OfflineModel` does at run
    time (``OfflineCfg.output_stride``): maps of ``H / s x W / s`` locations."""
    from PIL import Image

    from textseg.models.efficientnet import efficientnet_lite
    from textseg.preprocess import canvas_size, normalize, resize_to_tensor

    net = efficientnet_lite("lite0").set_output_stride(output_stride).fuse().eval()
    net = net.to(memory_format=torch.channels_last)
    short = max(32, short_side // 32 * 32)
    long = max(short, round(short * 1.3 / 32) * 32)
    xs: list[torch.Tensor] = []
    out: list[torch.Tensor] = []

    def flush():
        if xs:
            x = torch.cat(xs).contiguous(memory_format=torch.channels_last)
            out.extend(net.forward_features(x).to(torch.bfloat16).unbind(0))
            xs.clear()

    for path, _ in pairs:
        img = Image.open(path).convert("RGB")
        th, tw = (short, long) if img.width >= img.height else (long, short)
        h, w = canvas_size(img.height, img.width, short, 4 * long, 1)
        h, w = max(h, th), max(w, tw)
        x = normalize(resize_to_tensor(img, (h, w)), (0.5,) * 3, (0.5,) * 3)
        top, left = (h - th) // 2, (w - tw) // 2
        x = x[..., top: top + th, left: left + tw]
        if xs and xs[0].shape != x.shape or len(xs) == batch:
            flush()
        xs.append(x)
    flush()
    return out


def train_head(feats: list[torch.Tensor], words: torch.Tensor, y: torch.Tensor, epochs: int, lr: float,
               lse_r: float, batch: int, seed: int, stuff: torch.Tensor | None = None, unnamed_weight: float = 1.0,
               log: bool = True) -> tuple[DenseHead, list[float]]:
    torch.manual_seed(seed)
    head = DenseHead()
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    n = len(feats)
    losses = []
    # Group images of one feature-map size into a batch (no padding needed).
    by_size = defaultdict(list)
    for i, f in enumerate(feats):
        by_size[tuple(f.shape[-2:])].append(i)
    g = torch.Generator().manual_seed(seed)
    total_steps = epochs * (n // batch + len(by_size) + 1)  # an upper bound of the chunks run
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total_steps)
    for _ in range(epochs):
        chunks = []
        for idx in by_size.values():
            perm = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
            chunks += [perm[s: s + batch] for s in range(0, len(perm), batch)]
        order = torch.randperm(len(chunks), generator=g).tolist()
        tot = 0.0
        for c in order:
            ids = chunks[c]
            x = torch.stack([feats[i] for i in ids]).float()
            if torch.rand((), generator=g) < 0.5:
                x = x.flip(-1)  # feature-map flip: a cheap augmentation
            t = head.text(words)  # V x D (normalised)
            z = head.location_logits(head.image(x), t)  # B x V x h x w
            z = z.flatten(2)
            pooled = (torch.logsumexp(lse_r * z, dim=-1) - torch.log(torch.tensor(float(z.shape[-1])))) / lse_r
            weight = None
            if stuff is not None and unnamed_weight != 1.0:  # unnamed stuff: weak negatives
                weight = torch.where(stuff[None] & (y[ids] == 0), unnamed_weight, 1.0)
            loss = F.binary_cross_entropy_with_logits(pooled, y[ids], weight=weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            tot += loss.item() * len(ids)
        losses.append(round(tot / n, 5))
        if log:
            print(f"epoch {len(losses)}/{epochs}: loss {losses[-1]}", flush=True)
    return head.eval(), losses


def average_precision(score: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``N x V`` scores, ``N x V`` 0/1 targets -> ``V`` average precisions (NaN: a column without a
    positive or without a negative)."""
    order = score.argsort(dim=0, descending=True)
    t = target.gather(0, order).float()
    hits = t.cumsum(0)
    prec = hits / torch.arange(1, t.shape[0] + 1, dtype=torch.float32)[:, None]
    pos = t.sum(0)
    ap = (prec * t).sum(0) / pos.clamp_min(1)
    return torch.where((pos > 0) & (pos < t.shape[0]), ap, torch.full_like(ap, float("nan")))


@torch.no_grad()
def image_scores_head(head: DenseHead, feats: list[torch.Tensor], words: torch.Tensor, lse_r: float) -> torch.Tensor:
    """``N x V`` image-level head logits (the training's log-sum-exp pooling)."""
    t = head.text(words)
    out = []
    for f in feats:
        z = head.location_logits(head.image(f[None].float()), t).flatten(2)[0]
        out.append((torch.logsumexp(lse_r * z, dim=-1) - torch.log(torch.tensor(float(z.shape[-1])))) / lse_r)
    return torch.stack(out)


@torch.no_grad()
def image_scores_bridge(feats: list[torch.Tensor], words: torch.Tensor) -> torch.Tensor:
    """``N x V`` image-level scores of the bridge-only offline model: each word's best location score."""
    from textseg.models.offline import OfflineModel

    m = OfflineModel(OfflineCfg(heads=False, bridge_contrast=0.0, output_stride=32, pamr_iterations=0))  # the bridge
    # the shipped trust was measured on (stride and refinement do not enter: it scores the given features)
    rows = m.bridge(words)
    return torch.stack([m.scores(m.dense_from_features(f[None].float()), rows)[0].flatten(1).amax(1) for f in feats])


def vocab_trust(feats, words, y, folds: int, margin: float, train_kw: dict) -> tuple[torch.Tensor, dict]:
    """Per vocabulary word, how far to trust the head over the bridge, from held-out captions: the
    head is trained on all folds but one and ranks the held-out images (image-level AP against the
    caption nouns); the bridge ranks the same images. ``trust = clamp(0.5 + (AP_head - AP_bridge) /
    (2 margin), 0, 1)`` (1 where there is no evidence). No mask is used."""
    n = len(feats)
    oof = torch.zeros(n, words.shape[0])
    for k in range(folds):
        held = [i for i in range(n) if i % folds == k]
        train = [i for i in range(n) if i % folds != k]
        head, _ = train_head([feats[i] for i in train], words, y[train], **train_kw, log=False)
        print(f"trust fold {k + 1}/{folds} trained", flush=True)
        oof[held] = image_scores_head(head, [feats[i] for i in held], words, train_kw["lse_r"])
    bridge = image_scores_bridge(feats, words)
    target = (y > 0).float()
    ap_h, ap_b = average_precision(oof, target), average_precision(bridge, target)
    trust = (0.5 + (ap_h - ap_b) / (2 * margin)).clamp(0, 1)
    trust = torch.where(trust.isnan(), torch.ones_like(trust), trust)
    stats = {"ap_head_heldout": [round(v, 3) for v in ap_h.nan_to_num(-1).tolist()],
             "ap_bridge": [round(v, 3) for v in ap_b.nan_to_num(-1).tolist()]}
    return trust, stats


@torch.no_grad()
def class_prior(paths: list[Path], short_side: int = 448, output_stride: int = 16) -> torch.Tensor:
    """``1000``: the offline model's mean per-location ImageNet class probability over the photos (label-free;
    the "ordinary photo" prior of ``OfflineCfg.prior_lift``), as the model scores at run time: the bridge-only
    class probabilities (smoothing, image-level prior) of the whole photo as the Segmenter prepares it
    (:meth:`~textseg.segment.Segmenter.prepare`: its canvas at short side ``short_side``, multiples of
    ``output_stride``, the trunk at that stride); each photo's location mean, averaged over the photos."""
    from textseg.models.offline import NUM_CLASSES, OfflineModel
    from textseg.segment import SegmentCfg, Segmenter

    m = OfflineModel(OfflineCfg(heads=False, output_stride=output_stride))
    seg = Segmenter(m, SegmentCfg(short_side=short_side, pamr=False))
    acc = torch.zeros(NUM_CLASSES, dtype=torch.float64)
    for path in paths:
        x = seg.prepare(str(path)).views[0][0]  # 1 x 3 x H x W: the whole canvas, one crop
        acc += m.encode_dense(x)[0, :NUM_CLASSES].mean(dim=(-2, -1)).double()
    return (acc / max(1, len(paths))).float()


def prior_top(prior: torch.Tensor, k: int = 10) -> dict[str, float]:
    """The card's view of a class prior: its ``k`` most probable ImageNet classes, by name."""
    names = json.loads((ASSETS / "offline_bridge.json").read_text())["imagenet_classes"]
    top = prior.topk(k)
    return {names[i]: round(float(v), 5) for i, v in zip(top.indices.tolist(), top.values)}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--flickr", type=Path, default=DATA / "flickr8k-1k")
    p.add_argument("--coco", type=Path, default=DATA / "coco-mini", help="its train2017 half only")
    p.add_argument("--out", type=Path, default=ASSETS)
    p.add_argument("--limit", type=int, default=0, help="first N images only (CI smoke run)")
    p.add_argument("--min-images", type=int, default=5)
    p.add_argument("--max-vocab", type=int, default=400)
    p.add_argument("--short-side", type=int, default=320)
    p.add_argument("--output-stride", type=int, default=32, choices=(8, 16, 32),
                   help="Lite0 feature stride the head trains on (16: the last stage dilated, as OfflineCfg's "
                        "output_stride 16 runs it)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--lse-r", type=float, default=5.0)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--unnamed-weight", type=float, default=0.2,
                   help="weight of the negative term of a STUFF word that an image's captions do not name")
    p.add_argument("--implied-target", type=float, default=0.5,
                   help="soft target of a stuff word (IMPLIED: sky) where a caption names one of its scene words")
    p.add_argument("--trust-folds", type=int, default=2, help="held-out folds for the per-word trust (0: all 1)")
    p.add_argument("--trust-epochs", type=int, default=4, help="epochs of each fold's head (0: --epochs)")
    p.add_argument("--trust-margin", type=float, default=0.1, help="AP difference that moves trust from 0.5 to 1")
    p.add_argument("--prior-source", choices=("flickr", "all", "none"), default="flickr",
                   help="photos whose mean class probabilities ship as 'class_prior' (OfflineCfg.prior_lift): the "
                        "Flickr8k photos (ordinary photos, not COCO's indoor scenes), all captioned photos, or none")
    p.add_argument("--prior-short-side", type=int, default=448, help="the class prior's canvas short side")
    p.add_argument("--prior-stride", type=int, default=16, choices=(8, 16, 32), help="the class prior's trunk stride")
    p.add_argument("--feature-cache", type=Path, default=None, help="keep the tower features here (re-runs)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.time()
    pairs = read_pairs(a.flickr, a.coco, a.limit)
    min_images = a.min_images if not a.limit else 1
    vocab, y = caption_targets(pairs, min_images, a.max_vocab, a.implied_target)
    from textseg.models.minilm import minilm

    with torch.no_grad():
        words = minilm().embed(vocab).float()
    t1 = time.time()
    cache = a.feature_cache
    cached = bool(cache and cache.is_file())
    if cached:
        feats = torch.load(cache, weights_only=True)
        short = max(32, a.short_side // 32 * 32) // a.output_stride
        if len(feats) != len(pairs) or min(feats[0].shape[-2:]) != short:
            raise SystemExit(f"{cache}: features of another image set, --short-side or --output-stride "
                             f"({len(feats)} maps of {tuple(feats[0].shape[-2:])}, expected {len(pairs)} with "
                             f"short side {short}); delete it or pass another --feature-cache")
    else:
        feats = image_features(pairs, a.short_side, output_stride=a.output_stride)
        if cache:
            torch.save(feats, cache)
    t2 = time.time()
    stuff = torch.tensor([w in STUFF for w in vocab])
    train_kw = {"epochs": a.epochs, "lr": a.lr, "lse_r": a.lse_r, "batch": a.batch, "seed": a.seed,
                "stuff": stuff, "unnamed_weight": a.unnamed_weight}
    head, losses = train_head(feats, words, y, **train_kw)
    t3 = time.time()
    if a.trust_folds > 1:
        fold_kw = {**train_kw, "epochs": a.trust_epochs or a.epochs}
        trust, trust_stats = vocab_trust(feats, words, y, a.trust_folds, a.trust_margin, fold_kw)
    else:
        trust, trust_stats = torch.ones(len(vocab)), {}
    t4 = time.time()
    prior_paths = [pth for pth, _ in pairs if a.prior_source == "all" or (a.flickr and a.flickr in pth.parents)]
    prior = class_prior(prior_paths, a.prior_short_side, a.prior_stride) if a.prior_source != "none" and prior_paths else None
    t5 = time.time()
    a.out.mkdir(parents=True, exist_ok=True)
    st = a.out / f"{HEADS}.safetensors"
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous() for k, v in head.state_dict().items()}
    tensors["vocab_embeddings"] = words.half().contiguous()
    tensors["vocab_trust"] = trust.float().contiguous()
    if prior is not None:
        tensors["class_prior"] = prior.contiguous()
    save_file(tensors, str(st))
    n_flickr = sum(1 for pth, _ in pairs if a.flickr in pth.parents) if a.flickr else 0
    card = {
        "what": "learned dense text-image head of textseg's offline model (Lite0 features x MiniLM words)",
        "made_by": "scripts/build_offline_heads.py",
        "command": " ".join(["python", "scripts/build_offline_heads.py", *(argv if argv is not None else sys.argv[1:])]),
        "built_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": {"tagging": round(t1 - t0, 1), "features": round(t2 - t1, 1), "training": round(t3 - t2, 1),
                    "trust (held-out folds)": round(t4 - t3, 1), "class prior": round(t5 - t4, 1),
                    "features_from_cache": cached},
        "data": {
            "images": len(pairs), "captions": sum(len(c) for _, c in pairs),
            "flickr8k-1k images": n_flickr, "coco-mini train2017 images": len(pairs) - n_flickr,
            "never used": "COCO-MINI val2017 (held-out evaluation), CamVid (zero-shot evaluation), any mask",
        },
        "licences": ("The head's weights are learned from captions + frozen features of: Flickr8k (1,000 photos, "
                     "5,000 captions; Flickr8k terms: research use, photos keep their Flickr copyright) and "
                     "COCO 2017 train captions (CC BY 4.0; photos keep their Flickr licences). No image or "
                     "caption is shipped; only the weights below and the mined vocabulary."),
        "recipe": {
            "labels": "caption nouns (textseg.train.nouns.extract_nouns, tags NN/NNS), singular, groups folded "
                      "into their head word; target = fraction of the image's captions (of at most 3) naming it",
            "groups": {k: list(v) for k, v in GROUPS.items()},
            "implied": {"target": a.implied_target, "words": {k: list(v) for k, v in IMPLIED.items()},
                        "what": "a stuff word's target is at least this where a caption names one of its "
                                "scene words (sky is named for 2 % of the photos)"},
            "features": f"EfficientNet-Lite0 (packaged, frozen) stride-{a.output_stride} map, short side {a.short_side}, "
                        "centre crop 1.3:1; feature-map horizontal flip as augmentation",
            "loss": f"BCE on log-sum-exp pooled location logits (r={a.lse_r}); unnamed stuff words "
                    f"({', '.join(STUFF)}) count as negatives with weight {a.unnamed_weight}",
            "optimiser": f"AdamW lr {a.lr} one-cycle, wd 1e-4, {a.epochs} epochs, batch {a.batch}, seed {a.seed}",
            "min_images": min_images, "max_vocab": a.max_vocab,
            "class_prior": ("none" if prior is None else
                            "mean per-location ImageNet class probability of the offline model (bridge-only class "
                            f"probabilities, trunk stride {a.prior_stride}, whole photo at short side "
                            f"{a.prior_short_side}) over {len(prior_paths)} photos ({a.prior_source}), each photo's "
                            "location mean averaged; label-free; used by OfflineCfg.prior_lift"),
            "trust": f"per word: clamp(0.5 + (AP_head - AP_bridge) / (2 x {a.trust_margin}), 0, 1), image-level "
                     f"AP against the caption nouns of held-out images ({a.trust_folds} folds, each head trained "
                     f"{a.trust_epochs or a.epochs} epochs on the other folds); 1 where there is no evidence",
        },
        "inputs_sha256": {"flickr8k-1k/captions.jsonl": sha256(a.flickr / "captions.jsonl") if a.flickr else "",
                          "coco-mini/captions.jsonl": sha256(a.coco / "captions.jsonl") if a.coco else ""},
        "train_loss": losses,
        "sizes": {"parameters": sum(v.numel() for k, v in head.state_dict().items()),
                  "vocabulary": len(vocab), "bytes": st.stat().st_size},
        "vocabulary": vocab,
        "vocab_trust": [round(v, 3) for v in trust.tolist()],
        **trust_stats,
        **({"class_prior_top": prior_top(prior)} if prior is not None else {}),
        "sha256": sha256(st),
    }
    (a.out / f"{HEADS}.json").write_text(json.dumps(card, indent=1) + "\n")
    print(json.dumps({k: card[k] for k in ("seconds", "data", "sizes")}))
    return card


if __name__ == "__main__":
    main()
