"""``textseg export --weights W [--model M] [--mode naclip] --format onnx --out DIR``: the image tower's
dense graph as ONNX (dynamic batch, height and width), the textseg weights for the text side, and the
export card (:func:`textseg.export.export_onnx`); run it with ``textseg segment --onnx DIR``."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="export the dense image tower to ONNX (run with segment --onnx DIR)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model name or preset (default: the offline model)")
    p.add_argument("--weights", default=None, help="checkpoint file or folder (any supported format)")
    p.add_argument("--mode", default=None, help="dense mode to export (default: the model's default)")
    p.add_argument("--format", default="onnx", choices=("onnx",), help="export format (onnx)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.set_defaults(func=run)


def run(args) -> int:
    from textseg.export import export_onnx
    from textseg.weights.load import load_model

    model = load_model(args.model, args.weights)
    card = export_onnx(model, args.out, mode=args.mode, opset=args.opset)
    print(f"wrote {args.out}/{card['file']} ({card['model']}, mode {card['mode']}), {card['weights']} and onnx.json")
    return 0
