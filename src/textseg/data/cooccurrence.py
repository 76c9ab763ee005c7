"""Co-occurrence scenes: objects that nearly always come with their own background (CLIMS' setting).

Four foreground classes, each with a co-occurring background (:data:`PAIRS`): a boat on water, a
train on rails, a plane in the sky, a cow on grass. A scene is drawn on neutral grey noise; a
background is a band of its own texture (sky at the top, the others at the bottom; two ground
backgrounds share the bottom band side by side). With probability ``p_pair`` an object comes with its
own background and sits on it; otherwise it stands on the neutral ground (sometimes beside another
class's background). Some scenes hold backgrounds only. Every scene has

* ``mask``: ``H x W`` ids, 0 = background (neutral *and* co-occurring), ``k`` = :data:`CLASSES` ``[k]``;
* ``context``: ``H x W`` ids of the background textures, 0 = neutral, ``m`` = :data:`BACKGROUNDS` ``[m-1]``;
* ``labels``: the object classes present (image-level labels, what a CAM trains on);
* ``captions``: two captions naming every object *and* every background ("a photo of boat and
  water.", "water, boat"), so a CLIP trained on them learns "boat" and "water" as separate words.

:func:`write_scene_folder` writes a folder dataset that textseg's recipes read as they are:
``images/``, ``masks/`` (class ids), ``context/`` (background ids), ``labels.json``,
``classes.txt`` (``background`` first), ``captions.jsonl`` (``textseg train clip``),
``background.txt`` (``class: word`` lines for CLIMS' CBS), ``background_all.txt`` (every background
word, each applying to every class: the form of the official VOC / COCO lists) and ``background_wrong.txt``
(each class paired with another class's background: the CBS-with-wrong-words ablation).

Pure numpy, deterministic per seed::

    scenes = make_scenes(400, size=96, seed=0)
    write_scene_folder(scenes, "data/cooc/train")
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from textseg.constants import IMAGENET_MEAN, IMAGENET_STD, OPENAI_MEAN, OPENAI_STD
from textseg.errors import TextsegError

PAIRS = {"boat": "water", "train": "rails", "plane": "sky", "cow": "grass"}
OBJECTS = tuple(PAIRS)
BACKGROUNDS = tuple(PAIRS.values())
CLASSES = ("background", *OBJECTS)
GROUND = "ground"  # the neutral ground's word (captions of blank scenes, see make_scene's p_blank)
NEUTRAL = (122, 118, 110)  # near the ImageNet mean colour: a masked-out pixel looks like the ground
SAND = (190, 165, 120)  # a ground that a masked-out pixel does not look like (make_scene's ground="sand")
GROUNDS = {"neutral": (NEUTRAL, 6.0), "sand": (SAND, 14.0)}  # ground -> (rgb, noise std)


@dataclass
class Scene:
    image: np.ndarray  # H x W x 3 uint8
    mask: np.ndarray  # H x W uint8 class ids (0 = background)
    context: np.ndarray  # H x W uint8 background ids (0 = neutral)
    labels: list[str]
    captions: list[str]


def _texture(kind: str, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    noise = rng.normal(0, 1, (h, w)).astype(np.float32)
    if kind == "water":  # blue with light horizontal waves
        phase = rng.uniform(0, 2 * np.pi)
        wave = (np.sin(xx * 0.5 + phase + 2 * np.sin(yy * 0.3)) > 0.6) & (yy.astype(int) % 4 == 0)
        base = np.array([40, 90, 200], np.float32) + 8 * noise[..., None]
        base[wave] = (150, 190, 250)
        return base
    if kind == "rails":  # brown ballast, dark vertical ties, two bright horizontal rails
        base = np.array([110, 85, 60], np.float32) + 12 * noise[..., None]
        base[(xx.astype(int) % 6) < 2] = (60, 40, 25)
        for frac in (0.3, 0.7):
            r = int(h * frac)
            base[max(r - 1, 0) : r + 1] = (200, 200, 210)
        return base
    if kind == "sky":  # light-blue vertical gradient
        t = (yy / max(h - 1, 1))[..., None]
        return (1 - t) * np.array([120, 170, 240], np.float32) + t * np.array([190, 220, 250], np.float32) \
            + 3 * noise[..., None]
    if kind == "grass":  # green noise with darker vertical blades
        base = np.array([50, 150, 50], np.float32) + 20 * noise[..., None]
        blades = rng.random(w) < 0.3
        base[:, blades] *= 0.6
        return base
    raise TextsegError(f"unknown background {kind!r}")


def _object(kind: str, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``(rgb s x s x 3, bool mask s x s)`` of one object drawn in a square of side ``size``."""
    s = size
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    u, v = (xx - s / 2) / (s / 2), (yy - s / 2) / (s / 2)  # [-1, 1]
    rgb = np.zeros((s, s, 3), np.float32)
    if kind == "boat":  # red hull (trapezoid) under a white triangular sail
        hull = (v > 0.2) & (v < 0.7) & (np.abs(u) < 0.9 - 0.6 * (v - 0.2))
        sail = (v <= 0.2) & (v > -0.9) & (u > -0.05) & (u < 0.6 * (v + 0.9))
        m = hull | sail
        rgb[hull], rgb[sail] = (210, 40, 40), (245, 245, 235)
    elif kind == "train":  # yellow body with dark windows
        m = (np.abs(u) < 0.95) & (np.abs(v) < 0.5)
        rgb[m] = (235, 200, 30)
        win = m & (v > -0.35) & (v < 0.0) & ((((u + 1) * 4).astype(int) % 2) == 1)
        rgb[win] = (30, 30, 40)
    elif kind == "plane":  # white fuselage and wings, orange tail
        body = (np.abs(v) < 0.15) & (np.abs(u) < 0.95)
        wing = (np.abs(u + 0.05) < 0.2) & (np.abs(v) < 0.85)
        tail = (u < -0.7) & (v < 0) & (v > -0.5)
        m = body | wing | tail
        rgb[m] = (250, 250, 250)
        rgb[tail] = (240, 130, 30)
    elif kind == "cow":  # white body with black spots, dark head
        body = (u / 0.8) ** 2 + (v / 0.5) ** 2 <= 1
        head = ((u - 0.75) / 0.25) ** 2 + ((v + 0.25) / 0.25) ** 2 <= 1
        legs = (v > 0.3) & (v < 0.85) & ((np.abs(u + 0.45) < 0.1) | (np.abs(u - 0.45) < 0.1))
        m = body | head | legs
        rgb[m] = (240, 235, 225)
        spots = body & (np.sin(u * 7 + rng.uniform(0, 6)) * np.sin(v * 9 + rng.uniform(0, 6)) > 0.35)
        rgb[spots | head | legs] = (30, 25, 25)
    else:
        raise TextsegError(f"unknown object {kind!r}")
    if rng.random() < 0.5:
        rgb, m = rgb[:, ::-1], m[:, ::-1]
    return rgb, m


def make_scene(rng: np.random.Generator, size: int = 96, p_pair: float = 0.85, p_empty: float = 0.08,
               p_two: float = 0.25, p_extra: float = 0.1, p_blank: float = 0.0, part_captions: str = "", ground: str = "neutral") -> Scene:
    """One random scene (see the module docstring). ``p_blank``: probability of a scene holding only
    the neutral ground, captioned :data:`GROUND` (the evaluator corpus: a masked-out image looks like
    it, so the evaluator learns that an empty mask shows no object). ``part_captions``: ``"objects"``
    adds one caption per object (``"a photo of boat."`` for a boat on water), ``"all"`` one per object
    and background, as web captions often name one thing of a scene: then a class prompt matches
    every scene that holds the class, not only the scenes where it stands alone. ``ground``: the
    ground everything stands on (:data:`GROUNDS`): ``"neutral"``, grey noise at about the ImageNet mean
    colour, which is what a masked-out pixel becomes in CLIMS' input (so the evaluator cannot see
    whether a map covers it), or ``"sand"``, a ground it can see, as every pixel of a photo is."""
    if ground not in GROUNDS:
        raise TextsegError(f"ground must be one of {', '.join(GROUNDS)}, got {ground!r}")
    ground_rgb, ground_std = GROUNDS[ground]
    if part_captions not in ("", "objects", "all"):
        raise TextsegError(f"part_captions must be '', 'objects' or 'all', got {part_captions!r}")
    h = w = size
    if p_blank > 0 and rng.random() < p_blank:
        img = np.array(ground_rgb, np.float32) + rng.normal(0, ground_std, (h, w, 3)).astype(np.float32)
        zeros = np.zeros((h, w), np.uint8)
        return Scene(np.clip(img, 0, 255).astype(np.uint8), zeros, zeros.copy(), [],
                     [f"a photo of {GROUND}.", GROUND])
    n_obj = 0 if rng.random() < p_empty else (2 if rng.random() < p_two else 1)
    objs = list(rng.choice(len(OBJECTS), size=n_obj, replace=False)) if n_obj else []
    bgs: list[int] = []  # indices into BACKGROUNDS
    paired: dict[int, bool] = {}
    for k in objs:
        paired[k] = bool(rng.random() < p_pair)
        if paired[k]:
            bgs.append(k)
    if not objs:  # background-only scene: one or two backgrounds
        bgs = list(rng.choice(len(BACKGROUNDS), size=int(rng.integers(1, 3)), replace=False))
    elif rng.random() < p_extra:  # another class's background beside the objects
        others = [b for b in range(len(BACKGROUNDS)) if b not in bgs and b not in objs]
        if others:
            bgs.append(int(rng.choice(others)))
    img = np.array(ground_rgb, np.float32) + rng.normal(0, ground_std, (h, w, 3)).astype(np.float32)
    context = np.zeros((h, w), np.uint8)
    mask = np.zeros((h, w), np.uint8)
    region: dict[int, tuple[int, int, int, int]] = {}  # background -> (y0, y1, x0, x1)
    sky = BACKGROUNDS.index("sky")
    ground = [b for b in bgs if b != sky]
    if sky in bgs:
        y1 = int(h * rng.uniform(0.4, 0.55))
        region[sky] = (0, y1, 0, w)
    top = int(h * rng.uniform(0.45, 0.6))
    for i, b in enumerate(ground):
        x0, x1 = (0, w) if len(ground) == 1 else ((0, w // 2) if i == 0 else (w // 2, w))
        region[b] = (max(top, region[sky][1]) if sky in region else top, h, x0, x1)
    for b, (y0, y1, x0, x1) in region.items():
        img[y0:y1, x0:x1] = _texture(BACKGROUNDS[b], y1 - y0, x1 - x0, rng)
        context[y0:y1, x0:x1] = b + 1
    for j, k in enumerate(objs):
        s = int(size * rng.uniform(0.28, 0.4))
        rgb, m = _object(OBJECTS[k], s, rng)
        if paired[k]:
            y0, y1, x0, x1 = region[k]
            cy = (y0 + 0.35 * (y1 - y0)) if OBJECTS[k] != "plane" else (y0 + 0.5 * (y1 - y0))
            cx = rng.uniform(x0 + s / 2, max(x0 + s / 2, x1 - s / 2))
            if OBJECTS[k] == "boat":  # floats: hull on the water line
                cy = y0 + 0.1 * s
        else:  # on the neutral ground, left or right half
            cy = rng.uniform(s / 2, h - s / 2)
            cx = rng.uniform(s / 2, w / 2 - s / 4) if j == 0 else rng.uniform(w / 2 + s / 4, w - s / 2)
        oy = int(np.clip(round(cy - s / 2), 0, h - s))
        ox = int(np.clip(round(cx - s / 2), 0, w - s))
        img[oy : oy + s, ox : ox + s][m] = rgb[m]
        mask[oy : oy + s, ox : ox + s][m] = k + 1
    image = np.clip(img, 0, 255).astype(np.uint8)
    labels = [OBJECTS[k] for k in sorted(objs)]
    present_bgs = [BACKGROUNDS[b - 1] for b in sorted(set(np.unique(context).tolist()) - {0})]
    labels = [c for c in labels if (mask == CLASSES.index(c)).any()]
    words = [*labels, *present_bgs]
    order = list(rng.permutation(len(words)))
    captions = [f"a photo of {' and '.join(words)}.", ", ".join(words[i] for i in order)]
    if part_captions and len(words) > 1:
        captions += [f"a photo of {w}." for w in (words if part_captions == "all" else labels)]
    return Scene(image, mask, context, labels, captions)


def make_scenes(n: int, size: int = 96, seed: int = 0, **kw) -> list[Scene]:
    """``n`` scenes, deterministic per ``seed`` (``kw``: :func:`make_scene`'s probabilities)."""
    if n < 1 or size < 32:
        raise TextsegError(f"need n >= 1 scenes of size >= 32, got n={n}, size={size}")
    rng = np.random.default_rng(seed)
    return [make_scene(rng, size, **kw) for _ in range(n)]


def masked_views(scenes: Sequence[Scene], p: float = 1.0, seed: int = 0, strength: tuple[float, float] = (0.5, 1.0),
                 blank: float = 0.0,
                 feed_norm: tuple[Sequence[float], Sequence[float]] | None = None,
                 eval_norm: tuple[Sequence[float], Sequence[float]] | None = None) -> list[Scene]:
    """CLIMS-style masked copies of ``scenes`` for an evaluator's corpus (textseg's benchmark option).

    CLIMS feeds its evaluator ``x * P`` (OTM) and ``x * (1 - P)`` (BTM) with ``x`` normalised by
    ``feed_norm`` (ImageNet mean / std, the official input): a masked pixel is ``0``, the feed mean
    colour. For each object ``k`` of a scene (each scene with probability ``p``; ``seed``: which, and the
    strengths), two views drawn as the evaluator (trained with ``eval_norm``, default OpenAI CLIP's
    mean / std) will see them: the object alone, ``x * a M_k`` (``a`` uniform in ``strength``: CAMs are
    soft), captioned with the object word only ("a photo of boat.", "boat"), and the scene with the
    object masked out, ``x * (1 - M_k)``, captioned with what is left (other objects, backgrounds, or
    :data:`GROUND` when nothing is); with probability ``blank`` per such scene also the fully masked image
    (``x * 0``: the feed mean colour, no noise), captioned :data:`GROUND`. So the evaluator learns that a masked object shows the object, and
    that the rest of a scene does not. Returns the views only (masks and contexts follow the pixels).
    """
    fm, fs = (np.asarray(v, np.float32) for v in (feed_norm or (IMAGENET_MEAN, IMAGENET_STD)))
    em, es = (np.asarray(v, np.float32) for v in (eval_norm or (OPENAI_MEAN, OPENAI_STD)))
    rng = np.random.default_rng(seed)
    out = []
    for sc in scenes:
        if not sc.labels or rng.random() >= p:
            continue
        z = (sc.image.astype(np.float32) / 255 - fm) / fs  # what CLIMS multiplies by the map
        if rng.random() < blank:
            zeros = np.zeros_like(sc.mask)
            out.append(Scene(np.clip(np.broadcast_to(em * 255, z.shape), 0, 255).astype(np.uint8), zeros, zeros.copy(),
                             [], [f"a photo of {GROUND}.", GROUND]))
        present_bgs = [BACKGROUNDS[b - 1] for b in sorted(set(np.unique(sc.context).tolist()) - {0})]
        for c in sc.labels:
            m = sc.mask == CLASSES.index(c)
            a = float(rng.uniform(*strength))
            for keep, words in ((m * a, [c]), (~m, [o for o in sc.labels if o != c] + present_bgs)):
                img = np.clip((em + es * z * keep[..., None]) * 255, 0, 255).astype(np.uint8)
                words = words or [GROUND]
                kept = keep > 0
                out.append(Scene(img, np.where(kept, sc.mask, 0).astype(np.uint8),
                                 np.where(kept, sc.context, 0).astype(np.uint8),
                                 [o for o in sc.labels if o in words],
                                 [f"a photo of {' and '.join(words)}.", ", ".join(words)]))
    return out


def write_scene_folder(scenes: list[Scene], root: str | Path) -> Path:
    """Write ``scenes`` as a folder dataset (layout in the module docstring); returns ``root``."""
    from PIL import Image

    root = Path(root)
    for sub in ("images", "masks", "context"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    labels, lines = {}, []
    for i, sc in enumerate(scenes):
        key = f"{i:05d}"
        Image.fromarray(sc.image).save(root / "images" / f"{key}.png")
        Image.fromarray(sc.mask, mode="L").save(root / "masks" / f"{key}.png")
        Image.fromarray(sc.context, mode="L").save(root / "context" / f"{key}.png")
        labels[key] = sc.labels
        lines.append(json.dumps({"image": f"images/{key}.png", "captions": sc.captions}))
    (root / "labels.json").write_text(json.dumps(labels, indent=0))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    (root / "background.txt").write_text("".join(f"{c}: {b}\n" for c, b in PAIRS.items()))
    (root / "background_all.txt").write_text("".join(f"{b}\n" for b in BACKGROUNDS))
    wrong = dict(zip(OBJECTS, BACKGROUNDS[1:] + BACKGROUNDS[:1]))  # every class gets another's background
    (root / "background_wrong.txt").write_text("".join(f"{c}: {b}\n" for c, b in wrong.items()))
    return root


def evaluate_scene_cams(model, root: str | Path, thresholds: Sequence[float] = tuple(np.arange(1, 20) / 20),
                        scales: Sequence[float] = (1.0, 0.5, 1.5, 2.0)) -> dict:
    """A CAM network on a scene folder: label-keyed multi-scale + flip CAMs
    (:func:`~textseg.wsss.cam_maps.multiscale_cam`), mIoU over the background-threshold sweep
    (:class:`~textseg.wsss.cam_maps.ThresholdSweep`, best threshold chosen) and the co-occurring
    background false-activation rate: over every (image, labelled class ``k`` whose own background
    is in the image), the fraction of that background's pixels where ``k``'s map is above the
    chosen threshold; and the neutral-ground activation: the same over the pixels of neither an object nor
    a co-occurring background (a map that leaves the water for the empty ground is not caught by the
    first rate). Returns ``{"miou" (%), "best_threshold", "bg_false_activation" (%),
    "ground_activation" (%), "class_iou" (class -> IoU % at that threshold), "sweep"}``."""
    import torch
    from PIL import Image

    from textseg.io import load_image
    from textseg.wsss.cam_maps import ThresholdSweep, image_tensor, multiscale_cam

    root = Path(root)
    labels = json.loads((root / "labels.json").read_text())
    index = {c: i for i, c in enumerate(model.class_names)}
    own_bg = [BACKGROUNDS.index(PAIRS[c]) + 1 if c in PAIRS else -1 for c in model.class_names]
    ids = np.asarray([CLASSES.index(c) for c in model.class_names])
    sweep = ThresholdSweep(thresholds, len(CLASSES))
    kept, on_ground = [], []  # each labelled class's map on its own background's / the neutral ground's pixels
    model.eval()
    for key in sorted(labels):
        keys = [index[c] for c in labels[key] if c in index]
        img = image_tensor(load_image(root / "images" / f"{key}.png"))
        keys, maps = multiscale_cam(model, img, keys, scales)
        target = torch.from_numpy(np.asarray(Image.open(root / "masks" / f"{key}.png"), dtype=np.int64))
        sweep.update(keys, maps, target, ids)
        context = torch.from_numpy(np.asarray(Image.open(root / "context" / f"{key}.png"), dtype=np.int64))
        ground = (context == 0) & (target == 0)
        for j, k in enumerate(keys.tolist()):
            region = context == own_bg[k]
            if region.any():
                kept.append(maps[j][region])
            if ground.any():
                on_ground.append(maps[j][ground])
    results = sweep.results()
    best_t, best = max(results, key=lambda r: r[1].miou)

    def above(parts):
        pix = torch.cat(parts) if parts else torch.zeros(0)
        return round(float((pix > best_t).float().mean()) * 100, 3) if pix.numel() else float("nan")

    return {"miou": round(best.miou * 100, 3), "best_threshold": best_t, "bg_false_activation": above(kept),
            "ground_activation": above(on_ground),
            "class_iou": {c: round(float(v) * 100, 2) for c, v in zip(CLASSES, best.iou)},
            "sweep": [{"threshold": t, "miou": round(m.miou * 100, 3)} for t, m in results]}


def scene_figure(path: str | Path, images: Sequence[np.ndarray], columns: dict[str, Sequence[np.ndarray]],
                 classes: Sequence[str] = CLASSES, scale: int = 2, gap: int = 4, alpha: float = 0.6) -> Path:
    """A PNG grid (PIL only, written atomically): one row per scene, the image first, then one column per
    ``columns`` entry (title -> one ``H x W`` class-id map per scene, e.g. the ground truth or a thresholded
    CAM) tinted on the image in ``classes``' colours (:func:`textseg.viz.overlay`, background untinted),
    column titles on top and a colour legend of ``classes[1:]`` below. Each cell is ``scale`` times the
    image (nearest); the width is ``(1 + len(columns)) * (W * scale + gap) + gap``."""
    from PIL import Image, ImageDraw

    from textseg.io import save_image
    from textseg.viz import _font, overlay, palette

    if not len(images) or scale < 1:
        raise TextsegError("scene_figure: needs at least one image and scale >= 1")
    h, w = np.asarray(images[0]).shape[:2]
    for title, maps in columns.items():
        if len(maps) != len(images) or any(np.asarray(m).shape != (h, w) for m in maps):
            raise TextsegError(f"scene_figure: column {title!r} needs {len(images)} maps of {h}x{w}")
    if any(np.asarray(im).shape[:2] != (h, w) for im in images):
        raise TextsegError(f"scene_figure: every image must be {h}x{w}")
    cw, ch = w * scale, h * scale
    titles = ["image", *columns]
    font = _font(12)
    header, legend = 20, 22
    width = len(titles) * (cw + gap) + gap
    height = header + len(images) * (ch + gap) + legend
    fig = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(fig)
    for c, t in enumerate(titles):
        x = gap + c * (cw + gap)
        tw = draw.textlength(t, font=font)
        draw.text((x + max(0, (cw - tw) / 2), 4), t, fill=(0, 0, 0), font=font)
    for r, im in enumerate(images):
        base = Image.fromarray(np.asarray(im, dtype=np.uint8)).convert("RGB")
        cells = [base] + [overlay(base, np.asarray(m[r]), list(classes), alpha=alpha, legend=False)
                          for m in columns.values()]
        y = header + r * (ch + gap)
        for c, cell in enumerate(cells):
            fig.paste(cell.resize((cw, ch), Image.NEAREST), (gap + c * (cw + gap), y))
    pal = palette(list(classes))
    x, y = gap, height - legend + 5
    for i, name in enumerate(classes):
        if name.lower() == "background":
            continue
        draw.rectangle([x, y, x + 12, y + 12], fill=tuple(int(v) for v in pal[i]), outline=(0, 0, 0))
        draw.text((x + 16, y - 1), name, fill=(0, 0, 0), font=font)
        x += 16 + int(draw.textlength(name, font=font)) + 14
    return save_image(fig, path, optimize=True)
