"""``textseg convert SRC OUT.safetensors``: any supported checkpoint -> textseg's native format
(safetensors + JSON card with architecture, preprocessing, source and sha256).

OpenAI's TorchScript archives are read without running code. Only if that fails, and only with
``--trust-checkpoint``, is the archive opened with ``torch.jit.load`` (which executes its code) to
extract the weights once; other pickles the safe reader refuses (e.g. lang-seg's Lightning ``.ckpt``
with Lightning classes in ``hyper_parameters``) are then fully unpickled, once, the same way."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert a checkpoint (OpenAI, OpenCLIP, HF, ...) to native safetensors")
    p.add_argument("source", metavar="SRC", help="checkpoint file or Hugging Face folder")
    p.add_argument("output", metavar="OUT", help="output .safetensors path (a .json card is written beside it)")
    p.add_argument("--model", metavar="NAME", help="fail unless SRC is a checkpoint of this model (e.g. clip)")
    p.add_argument("--act", choices=("gelu", "quick_gelu"),
                   help="activation for OpenCLIP checkpoints (default: from the file name, else gelu)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow torch.jit.load (runs code from the file) when the safe reader cannot read it")
    p.set_defaults(func=run)


def _trusted_torchscript(path):
    import torch

    from textseg.errors import CheckpointError
    from textseg.weights.load import RawCheckpoint

    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:
        raise CheckpointError(f"{path}: torch.jit.load failed too ({type(e).__name__}: {e})") from None
    return RawCheckpoint(tensors=dict(module.state_dict()), kind="torchscript", path=path)


def _trusted_pickle(path):
    """Full unpickling (runs code from the file: only behind ``--trust-checkpoint``), for checkpoints
    such as lang-seg's Lightning ``.ckpt`` whose ``hyper_parameters`` hold non-plain classes."""
    import torch

    from textseg.errors import CheckpointError
    from textseg.weights.load import RawCheckpoint, _unwrap

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"{path}: torch.load failed too ({type(e).__name__}: {e})") from None
    return RawCheckpoint(kind="torch", path=path, **_unwrap(obj, path))


def run(args) -> int:
    from pathlib import Path

    from textseg.errors import CheckpointError
    from textseg.weights.load import detect_format, read_checkpoint, save_model, sha256_file

    src = Path(args.source)
    try:
        raw = read_checkpoint(src)
    except CheckpointError:
        if not (args.trust_checkpoint and src.is_file()):
            raise
        try:
            raw = _trusted_torchscript(src)
        except CheckpointError:  # not TorchScript: a pickled checkpoint (e.g. a Lightning .ckpt)
            raw = _trusted_pickle(src)
    fmt = detect_format(raw)
    if fmt.NAME == "open_clip" and args.act:
        model = fmt.build(raw, act=args.act)
    else:
        model = fmt.build(raw)
    if args.model and args.model != model.name:
        raise CheckpointError(f"{src}: is a {model.name!r} checkpoint, not {args.model!r}")
    card = {"source": str(src), "source_format": fmt.NAME}
    if src.is_file():
        card["source_sha256"] = sha256_file(src)
    full = save_model(model, args.output, card)
    print(f"wrote {args.output} ({full['architecture']}, from {fmt.NAME}); card: {args.output}.json")
    return 0
