"""``textseg convert SRC OUT.safetensors``: any supported checkpoint -> textseg's native format
(safetensors + JSON card with architecture, preprocessing, source and sha256), by
:func:`textseg.weights.load.convert_file`.

OpenAI's TorchScript archives are read without running code. Only if that fails, and only with
``--trust-checkpoint``, is the file opened with ``torch.jit.load`` or fully unpickled (both run code
from it) to extract the weights once (e.g. lang-seg's Lightning ``.ckpt``)."""

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


def run(args) -> int:
    from textseg.weights.load import convert_file

    card = convert_file(args.source, args.output, model=args.model, act=args.act, trust=args.trust_checkpoint)
    print(f"wrote {args.output} ({card['architecture']}, from {card['source_format']}); card: {args.output}.json")
    return 0
