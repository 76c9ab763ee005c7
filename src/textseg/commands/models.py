"""``textseg models``: the models textseg can load by name, the OpenAI presets and what is cached,
and the checkpoint formats ``--weights`` accepts."""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser("models", help="list named models, OpenAI presets (cached or not) and checkpoint formats")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args) -> int:
    from textseg.models.registry import DEFAULT_MODEL, MODELS, PACKAGED
    from textseg.weights import presets
    from textseg.weights.load import FORMATS

    named = [{"name": n, "default": n == DEFAULT_MODEL, "entry": f"{MODELS[n].__module__}.{MODELS[n].__qualname__}"}
             for n in PACKAGED]
    rows = []
    for p in presets.PRESETS.values():
        path = presets.cached_path(p)
        rows.append({"name": p.name, "image_size": p.image_size, "cached": str(path) if path else None,
                     "url": p.url, "sha256": p.sha256})
    formats = [m.NAME for m in FORMATS]
    if args.json:
        print(json.dumps({"named": named, "presets": rows, "formats": formats,
                          "cache_dir": str(presets.cache_dir())}))
        return 0
    print("Named models (textseg classify/segment --model NAME):")
    for n in named:
        print(f"  {n['name']:<16}{'(default, offline)' if n['default'] else ''}")
    print(f"\nOpenAI CLIP presets (--model NAME; fetched on first use into {presets.cache_dir()}):")
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        state = f"cached: {r['cached']}" if r["cached"] else "not cached"
        print(f"  {r['name']:<{width}}  {r['image_size']:>3}px  {state}")
    print(f"\nCheckpoint formats for --weights (detected): {', '.join(formats)}")
    print(f"Architectures they load into: {', '.join(MODELS)}")
    return 0
