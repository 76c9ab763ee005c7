"""ONNX export of a model's dense image tower, and running it with ONNX Runtime.

``export_onnx(model, out_dir, mode)`` writes to ``out_dir``:

- ``dense.onnx``: the image tower's dense graph, input ``pixels`` (``B x 3 x H x W`` float32, already
  normalised; B, H and W dynamic), output ``dense`` (``B x D x h x w``: exactly what
  ``model.encode_dense(pixels, mode)`` returns, e.g. CLIP's training-free NACLIP features or the
  offline model's per-location class probabilities);
- ``model.safetensors`` (+ its ``.json`` card): the textseg model, for the text side (label
  embeddings stay in textseg: any words work without re-exporting) and the scoring;
- ``onnx.json``: the export card (model name, dense mode, dense stride, preprocessing, opset,
  input / output names).

``load_onnx(out_dir)`` returns that textseg model with ``dense_runtime`` set to an :class:`OnnxDense`
(an ``onnxruntime.InferenceSession``: CUDA execution provider when present and asked for, else CPU),
which the :class:`~textseg.segment.Segmenter` then runs instead of the PyTorch tower
(``textseg segment --onnx DIR``).

Exported families: CLIP ViT (every training-free mode of :mod:`textseg.models.clip_dense`), CLIP
ResNet (MaskCLIP's value path), the offline model (EfficientNet-Lite + class probabilities) and LSeg.
Position embeddings are resampled for any grid inside the graph (:func:`~textseg.models.layers.resample_pos_embed`
builds its resampling matrices from tensors when sizes are traced). GroupViT is refused: its default
(``official``) inference is a pixel mode whose scores need the label embeddings inside the grouping
(image-level top-5 mask, products of softmaxes over the labels), so there is no label-free dense graph
to export; its ``groups`` / ``soft`` modes' hard Gumbel assignment is an arg-max over groups per
image whose number of outputs torch.export cannot make shape-polymorphic here (see the report of
issue 17).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from textseg.errors import TextsegError

ONNX_FILE = "dense.onnx"
CARD_FILE = "onnx.json"
WEIGHTS_FILE = "model.safetensors"
INPUT, OUTPUT = "pixels", "dense"
OPSET = 18
FORMATS = ("onnx",)


def _need(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise TextsegError(f"{module} is not installed; pip install 'textseg[export]'") from None


class DenseGraph(nn.Module):
    """``pixels -> model.encode_dense(pixels, mode)``: the module that is exported."""

    def __init__(self, model, mode: str | None):
        super().__init__()
        self.model = model
        self.mode = mode

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_dense(pixels, mode=self.mode).float()


def exportable(model) -> None:
    """Raise a one-line :class:`TextsegError` for models without a label-free dense graph."""
    name = getattr(model, "name", type(model).__name__)
    if name == "groupvit":
        raise TextsegError("groupvit cannot be exported to ONNX: its official inference scores groups against the "
                           "labels inside the grouping (no label-free dense graph); run it in PyTorch")
    if not hasattr(model, "encode_dense"):
        raise TextsegError(f"model {name!r} has no dense image tower to export")


def example_input(model) -> torch.Tensor:
    """A ``2 x 3 x H x W`` example whose grid differs from the checkpoint's on both axes (nothing is
    specialised to it)."""
    stride = int(getattr(model, "dense_stride", 16))
    size = int(model.preprocess_cfg.image_size)
    return torch.randn(2, 3, size + 2 * stride, size + 5 * stride)


def export_onnx(model, out_dir: str | Path, mode: str | None = None, opset: int = OPSET) -> dict:
    """Write the ONNX dense graph of ``model`` at dense ``mode`` (None: the model's default), the
    textseg weights and the export card to ``out_dir`` (see the module docstring). Returns the card."""
    _need("onnx")
    from textseg.weights.load import model_card, save_model

    exportable(model)
    modes = tuple(getattr(model, "dense_modes", ()) or ())
    if mode is not None and modes and mode not in modes:
        raise TextsegError(f"model {model.name!r} has no dense mode {mode!r}; choose one of: {', '.join(modes)}")
    mode = mode or (modes[0] if modes else None)
    if mode in tuple(getattr(model, "text_modes", ()) or ()):
        raise TextsegError(f"dense mode {mode!r} segments the image with the labels inside its forward: it has "
                           "no label-free dense graph to export; export another mode")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.float().eval()
    graph = DenseGraph(model, mode).eval()
    x = example_input(model).to(next(model.parameters()).device)
    dyn = torch.export.Dim.DYNAMIC
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(graph, (x,), str(out / ONNX_FILE), input_names=[INPUT], output_names=[OUTPUT],
                              dynamo=True, dynamic_shapes={"pixels": {0: dyn, 2: dyn, 3: dyn}}, opset_version=opset,
                              optimize=False, verbose=False, external_data=False)
        except Exception as e:  # exporter failures are long tracebacks; one line for the user
            raise TextsegError(f"ONNX export of {model.name!r} (mode {mode!r}) failed: {type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''}") from e
    save_model(model, out / WEIGHTS_FILE)
    card = {"format": "onnx", "file": ONNX_FILE, "weights": WEIGHTS_FILE, "model": model.name, "mode": mode,
            "dense_stride": int(getattr(model, "dense_stride", 16)), "input": INPUT, "output": OUTPUT,
            "input_layout": "B x 3 x H x W float32, normalised with preprocess mean / std",
            "output_layout": "B x D x h x w float32 (model.encode_dense)", "opset": opset,
            "preprocess": model_card(model)["preprocess"], "torch": torch.__version__}
    (out / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return card


class OnnxDense:
    """The exported dense graph in an ONNX Runtime session: ``pixels -> dense`` (torch tensors in and
    out, float32). ``device`` ``cuda*`` uses the CUDA execution provider when onnxruntime has it."""

    def __init__(self, path: str | Path, mode: str | None, device: str | torch.device = "cpu",
                 threads: int | None = None):
        ort = _need("onnxruntime")
        self.path, self.mode = Path(path), mode
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        providers = ["CPUExecutionProvider"]
        if torch.device(device).type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=providers)
        except Exception as e:
            raise TextsegError(f"{self.path}: cannot open the ONNX graph: {str(e).splitlines()[0]}") from e
        self.providers = self.session.get_providers()

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.session.run([OUTPUT], {INPUT: pixels.detach().float().cpu().contiguous().numpy()})[0]
        return torch.from_numpy(out).to(pixels.device)


def load_onnx(out_dir: str | Path, device: str | torch.device = "cpu", precision: str | None = None):
    """The textseg model of an export folder with its ONNX dense graph as ``model.dense_runtime``
    (the Segmenter runs it instead of the PyTorch tower; text and scoring stay in textseg)."""
    from textseg.weights.load import load_model

    out = Path(out_dir)
    card_path = out / CARD_FILE
    if not card_path.is_file():
        raise TextsegError(f"{out}: not an ONNX export folder (no {CARD_FILE}); write one with textseg export")
    card = json.loads(card_path.read_text(encoding="utf-8"))
    if precision not in (None, "fp32", "auto"):
        raise TextsegError(f"the ONNX graph runs in fp32; --precision {precision} applies to the PyTorch tower only")
    model = load_model(weights=out / card.get("weights", WEIGHTS_FILE), device=device)
    model.dense_runtime = OnnxDense(out / card.get("file", ONNX_FILE), card.get("mode"), device)
    model.onnx_card = card
    return model
