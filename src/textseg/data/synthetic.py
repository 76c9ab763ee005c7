"""Synthetic captioned scenes: coloured, textured shapes on textured backgrounds, with captions.

Every scene holds one or two shapes (circle, square, triangle, star, cross) in one of several
colours and textures (solid, striped, dotted, checkered, lined) on a textured background (noise,
gradient, grid), and a caption that names them and where they are, e.g.
``"a red star above a striped circle on a grid background"`` (colour and texture words are each
mentioned half of the time, the shapes always; the background in about 2 of 3 captions). The true per-pixel mask
(0 = background, 1.. = shape class in :data:`SHAPES` order) comes with it, so a model trained from
the captions alone can be scored zero-shot against it.

Pure numpy; deterministic per seed.

    scenes = make_scenes(1000, size=64, seed=0)   # Scenes(images N x H x W x 3 uint8, masks, captions)

:func:`cell_scenes` makes the *emergence* scenes (``benchmarks/groupvit_emergence.py``): objects that
cover whole patch cells (so a perfect patch grouping scores 100 mIoU), one flat colour per class
(appearance identifies the class), captions that name every object by its class noun and the
background as "the ground", single- and multi-object scenes with every class and every pair equally
often::

    scenes = cell_scenes(1000, seed=0)            # "a car and a tree on the ground", ...
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

SHAPES = ("circle", "square", "triangle", "star", "cross")
CLASSES = ("background", *SHAPES)
COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
    "purple": (150, 60, 190), "orange": (240, 140, 30), "white": (240, 240, 240), "black": (25, 25, 25),
    "cyan": (40, 200, 210), "pink": (240, 120, 180),
}
ANY_COLORS = tuple(COLORS)[:8]  # palette="any": every object in one of these, at random
# palette="per_shape": each kind of object comes in its own two colours (as fire engines are red);
# colour and surface then say which object a patch belongs to, and only the caption's noun names it
SHAPE_COLORS = {"star": ("red", "orange"), "circle": ("blue", "purple"), "square": ("green", "cyan"),
                "triangle": ("yellow", "white"), "cross": ("black", "pink")}
TEXTURES = ("solid", "striped", "dotted", "checkered", "lined")
BACKGROUNDS = ("noisy", "gradient", "grid")
# captions="named_background": the caption always ends with the background as a noun of its own
# ("... on a grid", "... on noise"), so noun extraction gives the background a word per kind
BACKGROUND_NOUNS = {"noisy": "noise", "gradient": "gradient", "grid": "grid"}
CAPTION_STYLES = ("plain", "named_background")
# With ``coupled=True`` (the default) each kind of object has its own surface, as real categories
# have characteristic appearance (a zebra is striped): stars are solid, circles dotted, squares
# checkered, triangles striped, crosses lined; colours stay random. A patch then says which object it
# belongs to, which a small ViT learns in minutes; ``coupled=False`` draws textures at random (shape
# silhouette alone identifies the object: far slower to learn from scratch).
SHAPE_TEXTURE = {"star": "solid", "circle": "dotted", "square": "checkered", "triangle": "striped",
                 "cross": "lined"}
TEXTURE_SHADE = 0.45  # brightness of the darker half of a texture, relative to the colour


@dataclass
class Scenes:
    images: np.ndarray  # N x H x W x 3 uint8
    masks: np.ndarray  # N x H x W uint8, 0 = background, k = SHAPES[k-1] (cell_scenes: classes[k-1])
    captions: list[str]
    classes: tuple[str, ...] = CLASSES  # mask value k -> classes[k]; 0 = the background's name


def _shape_mask(kind: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float, rot: float):
    dy, dx = yy - cy, xx - cx
    if kind == "circle":
        return dy * dy + dx * dx <= r * r
    c, s = np.cos(rot), np.sin(rot)
    u, v = c * dx + s * dy, -s * dx + c * dy
    if kind == "square":
        return (np.abs(u) <= r * 0.85) & (np.abs(v) <= r * 0.85)
    if kind == "cross":
        a, b = np.abs(u), np.abs(v)
        return ((a <= r) & (b <= r * 0.33)) | ((b <= r) & (a <= r * 0.33))
    ang = np.arctan2(v, u)
    rad = np.hypot(u, v)
    if kind == "triangle":  # regular triangle: distance to the edge along each direction
        k = 3
    else:  # star: radius alternates between r and 0.45 r
        k = 5
        sector = np.pi / k
        t = np.abs(((ang % (2 * sector)) - sector) / sector)  # 1 at tips, 0 at notches
        return rad <= r * (0.45 + 0.55 * t ** 1.5)
    sector = 2 * np.pi / k
    local = (ang % sector) - sector / 2
    return rad * np.cos(local) <= r * 0.6


def _texture(kind: str, yy, xx, rng) -> np.ndarray:
    """A 0/1 (or 0..1) pattern: 1 = base colour, 0 = a darker/lighter variant."""
    p = rng.integers(4, 8)
    if kind == "solid":
        return np.ones_like(yy, dtype=np.float32)
    if kind == "striped":  # diagonal stripes
        return (((xx + yy) // p) % 2).astype(np.float32)
    if kind == "lined":  # thin horizontal lines
        return ((yy % p) > 1).astype(np.float32)
    if kind == "dotted":
        return ((((yy % p) - p / 2) ** 2 + ((xx % p) - p / 2) ** 2) > (p / 3.5) ** 2).astype(np.float32)
    return (((yy // p) + (xx // p)) % 2).astype(np.float32)


def _background(kind: str, size: int, yy, xx, rng) -> np.ndarray:
    base = rng.integers(60, 200, size=3).astype(np.float32)
    other = rng.integers(60, 200, size=3).astype(np.float32)
    if kind == "noisy":
        img = base + rng.normal(0, 25, size=(size, size, 3))
    elif kind == "gradient":
        t = ((xx + yy) / (2 * size))[..., None] if rng.random() < 0.5 else (yy / size)[..., None]
        img = base * t + other * (1 - t)
    else:
        p = rng.integers(6, 12)
        m = (((yy % p) == 0) | ((xx % p) == 0))[..., None]
        img = base * (1 - m) + other * m
    return img + rng.normal(0, 6, size=(size, size, 3))


def _relation(a: tuple[float, float], b: tuple[float, float]) -> str:
    """Where shape ``a`` (centre y, x; y grows downwards) is relative to shape ``b``."""
    dy, dx = a[0] - b[0], a[1] - b[1]
    if abs(dy) >= abs(dx):
        return "above" if dy < 0 else "below"
    return "to the left of" if dx < 0 else "to the right of"


def render_scene(rng: np.random.Generator, size: int = 64, coupled: bool = True,
                 mention: float = 0.5, palette: str = "any",
                 captions: str = "plain") -> tuple[np.ndarray, np.ndarray, str]:
    """One scene: ``(image H x W x 3 uint8, mask H x W uint8, caption)``; ``coupled``: see
    :data:`SHAPE_TEXTURE`; ``mention``: probability that the caption names an object's colour (and,
    independently, its texture); ``palette``: ``"any"`` or ``"per_shape"`` (:data:`SHAPE_COLORS`);
    ``captions``: ``"plain"`` ("... on a grid background" in about 2 of 3 captions, the head noun
    then being "background" for every kind) or ``"named_background"`` (always "... on a grid" /
    "on noise" / "on a gradient": :data:`BACKGROUND_NOUNS`). Same images and masks either way."""
    if palette not in ("any", "per_shape"):
        raise ValueError(f"palette must be 'any' or 'per_shape', not {palette!r}")
    if captions not in CAPTION_STYLES:
        raise ValueError(f"captions must be one of {CAPTION_STYLES}, not {captions!r}")
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    bg_kind = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    img = _background(bg_kind, size, yy, xx, rng)
    mask = np.zeros((size, size), np.uint8)
    n = 1 if rng.random() < 0.3 else 2
    kinds = rng.choice(len(SHAPES), size=n, replace=False)
    phrases, centres = [], []
    for k in kinds:
        r = size * rng.uniform(0.2, 0.3)
        for _ in range(20):  # place without overlapping the first shape
            cy, cx = rng.uniform(r, size - r, size=2)
            if not centres or np.hypot(cy - centres[0][0], cx - centres[0][1]) > r + centres[0][2] + 2:
                break
        m = _shape_mask(SHAPES[k], yy, xx, cy, cx, r, rng.uniform(0, 2 * np.pi))
        options = ANY_COLORS if palette == "any" else SHAPE_COLORS[SHAPES[k]]
        cname = options[rng.integers(len(options))]
        tex = SHAPE_TEXTURE[SHAPES[k]] if coupled else TEXTURES[rng.integers(len(TEXTURES))]
        pattern = _texture(tex, yy, xx, rng)[..., None]
        col = np.array(COLORS[cname], np.float32)
        shaded = col * pattern + (col * TEXTURE_SHADE + 20) * (1 - pattern)
        img = np.where(m[..., None], shaded, img)
        mask[m] = k + 1
        centres.append((cy, cx, r))
        # captions name the colour and the texture only sometimes, as people do: the shape word is
        # then the only way to tell scenes apart
        words = [cname] if rng.random() < mention else []
        if tex != "solid" and rng.random() < mention:
            words.append(tex)
        phrases.append(" ".join([*words, SHAPES[k]]))
    a = [("an " if p[0] in "aeiou" else "a ") + p for p in phrases]
    caption = a[0] if n == 1 else f"{a[0]} {_relation(centres[0][:2], centres[1][:2])} {a[1]}"
    with_background = n == 1 or rng.random() < 0.5
    if captions == "named_background":
        noun = BACKGROUND_NOUNS[bg_kind]
        caption += f" on {'a ' if noun != 'noise' else ''}{noun}"
    elif with_background:
        caption += f" on a {bg_kind} background"
    return np.clip(img, 0, 255).astype(np.uint8), mask, caption


def make_scenes(n: int, size: int = 64, seed: int = 0, coupled: bool = True, mention: float = 0.5,
                palette: str = "any", captions: str = "plain") -> Scenes:
    """``n`` scenes, deterministic for a ``seed`` (see :func:`render_scene` for the options)."""
    rng = np.random.default_rng(seed)
    imgs = np.empty((n, size, size, 3), np.uint8)
    masks = np.empty((n, size, size), np.uint8)
    caps = []
    for i in range(n):
        imgs[i], masks[i], c = render_scene(rng, size, coupled, mention, palette, captions)
        caps.append(c)
    return Scenes(imgs, masks, caps)


class SceneDataset(torch.utils.data.Dataset):
    """Scenes as ``(normalised image 3 x H x W, caption)``; masks are never shown to training."""

    def __init__(self, scenes: Scenes, mean, std):
        self.scenes = scenes
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.scenes.captions)

    def pixels(self, i) -> torch.Tensor:
        """Normalised ``3 x H x W`` for an int ``i``, ``B x 3 x H x W`` for an index array."""
        img = torch.from_numpy(self.scenes.images[i])
        img = img.permute(2, 0, 1) if isinstance(i, int) else img.permute(0, 3, 1, 2)
        return (img.float() / 255 - self.mean) / self.std

    def __getitem__(self, i: int):
        return self.pixels(i), self.scenes.captions[i]


# ------------------------------------------------------------------------------ emergence scenes
CELL_CLASSES = ("car", "tree", "boat", "house", "bird")
# more classes, for scenes with 10+ objects (the paper's 8-final-groups question)
CELL_CLASSES_MANY = (*CELL_CLASSES, "cup", "book", "chair", "lamp", "clock", "bottle", "phone")
CELL_BACKGROUND = "ground"


def class_colours(n: int) -> np.ndarray:
    """``n x 3`` well separated saturated colours (hues evenly spaced, value alternating)."""
    h = np.arange(n) / n
    v = np.where(np.arange(n) % 2 == 0, 0.95, 0.7)
    i = np.floor(h * 6).astype(int) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = v * 0.15, v * (1 - 0.85 * f), v * (1 - 0.85 * (1 - f))
    table = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    return np.array([[table[k][c][j] for c in range(3)] for j, k in enumerate(i)]) * 255


def _caption(names: list[str]) -> str:
    a = [f"a {n}" for n in names]
    body = a[0] if len(a) == 1 else (f"{a[0]} and {a[1]}" if len(a) == 2 else ", ".join(a[:-1]) + f" and {a[-1]}")
    return f"{body} on the {CELL_BACKGROUND}"


def cell_scenes(n: int, seed: int = 0, size: int = 64, patch: int = 8, classes: tuple[str, ...] = CELL_CLASSES,
                objects: tuple[int, int] = (1, 2), cells: tuple[int, int] = (2, 4), noise: float = 10.0) -> Scenes:
    """``n`` emergence scenes. Each holds ``objects[0]..objects[1]`` objects of distinct classes;
    an object is a rectangle of ``cells[0]..cells[1]`` x ``cells[0]..cells[1]`` whole ``patch``-px
    cells, filled with its class's flat colour (:func:`class_colours`) plus pixel noise of std
    ``noise``; the background is grey (a random level per image) with the same noise, never a class
    colour. With ``objects=(1, 2)`` scene ``i`` alternates single objects (every class equally often)
    and pairs (every unordered pair equally often, in random caption order). Caption: "a car and a
    tree on the ground". Deterministic per ``seed``."""
    from itertools import combinations

    rng = np.random.default_rng(seed)
    grid = size // patch
    colours = class_colours(len(classes))
    pairs = list(combinations(range(len(classes)), 2))
    imgs = np.empty((n, size, size, 3), np.uint8)
    masks = np.zeros((n, size, size), np.uint8)
    caps = []
    for i in range(n):
        if objects == (1, 2):
            kinds = [(i // 2) % len(classes)] if i % 2 == 0 else list(pairs[(i // 2) % len(pairs)])
            rng.shuffle(kinds)
        else:
            k = int(rng.integers(objects[0], objects[1] + 1))
            kinds = list(rng.choice(len(classes), size=k, replace=False))
        cell = np.zeros((grid, grid), np.int64)
        placed = []
        for c in kinds:
            for _ in range(200):  # rejection sampling of a free rectangle
                h, w = rng.integers(cells[0], cells[1] + 1, size=2)
                y, x = rng.integers(0, grid - h + 1), rng.integers(0, grid - w + 1)
                if not cell[y:y + h, x:x + w].any():
                    cell[y:y + h, x:x + w] = c + 1
                    placed.append(int(c))
                    break
        m = np.kron(cell, np.ones((patch, patch), np.int64))
        grey = rng.uniform(70, 150)
        img = np.where(m[..., None] > 0, colours[np.maximum(m - 1, 0)], grey)
        img = img + rng.normal(0, noise, size=img.shape)
        imgs[i] = np.clip(img, 0, 255).astype(np.uint8)
        masks[i] = m
        caps.append(_caption([classes[c] for c in placed]))
    return Scenes(imgs, masks, caps, (CELL_BACKGROUND, *classes))


if __name__ == "__main__":  # write a contact sheet to look at
    import sys

    from PIL import Image

    s = make_scenes(16, seed=int(sys.argv[1]) if len(sys.argv) > 1 else 0)
    sheet = np.concatenate([np.concatenate(list(s.images[r * 4:(r + 1) * 4]), axis=1) for r in range(4)], axis=0)
    Image.fromarray(sheet).resize((512, 512), Image.NEAREST).save("/tmp/scenes.png")
    print("\n".join(s.captions))
