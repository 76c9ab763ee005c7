"""Independent transcription of NVlabs GroupViT's segmentation inference and mmseg's test-time
wrapper, for tests (not collected). Written from the official code's maths:

- NVlabs/GroupViT ``segmentation/evaluation/group_vit_seg.py``: ``resize_attn_map``,
  ``GroupViTSegInference.get_attn_maps`` and ``encode_decode``;
- mmseg 0.x ``EncoderDecoder.slide_inference`` / ``whole_inference`` / ``inference`` /
  ``simple_test`` (``test_cfg = dict(mode='slide', stride=(224, 224), crop_size=(448, 448),
  bg_thresh=.95)`` in NVlabs ``segmentation/configs/_base_/datasets/pascal_voc12.py``).

It only uses the model's raw tower outputs (``model.visual``: final tokens and each grouping stage's
soft assignment; ``model.image_proj``; ``model.logit_scale``), never textseg's inference code."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def resize_attn_map(attentions: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B, nH, N, G] -> [B, nH, h, w, G] (NVlabs' feature-map shape guess, then bilinear)."""
    scale = (h * w // attentions.shape[2]) ** 0.5
    if h > w:
        w_feat = w // int(np.round(scale))
        h_feat = attentions.shape[2] // w_feat
    else:
        h_feat = h // int(np.round(scale))
        w_feat = attentions.shape[2] // h_feat
    assert attentions.shape[2] == h_feat * w_feat
    b, nh, _, g = attentions.shape
    x = attentions.reshape(b * nh, h_feat, w_feat, g).permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    return x.permute(0, 2, 3, 1).reshape(b, nh, h, w, g)


@torch.no_grad()
def encode_decode(model, img: torch.Tensor, text: torch.Tensor, with_bg: bool, bg_thresh: float = 0.95,
                  k: int = 5) -> torch.Tensor:
    """NVlabs ``encode_decode`` for a 1 x 3 x H x W image and N x D class embeddings ->
    1 x (N + with_bg) x H x W ``pred_logits`` (channel 0 = background when ``with_bg``)."""
    assert img.shape[0] == 1
    tokens, assignments, _ = model.visual(img)  # final tokens; per stage [B, G_i, S_i] soft assignment
    prev = None
    for soft in assignments:
        a = soft[:, None].transpose(-1, -2)  # 'b h g n -> b h n g' with nH = 1
        prev = a if prev is None else prev @ a
    attn_map = resize_attn_map(prev, *img.shape[-2:]).squeeze(1)  # [B, H, W, G]
    x = attn_map.permute(0, 3, 1, 2)  # rescale=True: to the image size again
    attn_map = F.interpolate(x, size=img.shape[2:], mode="bilinear", align_corners=False).permute(0, 2, 3, 1)[0]

    grouped = F.normalize(model.image_proj(tokens).squeeze(0), dim=-1)  # image_feat [G, C]
    avg = F.normalize(model.image_proj(tokens.mean(dim=1)), dim=-1)  # image_x [1, C]
    onehot = F.one_hot(attn_map.argmax(dim=-1), num_classes=attn_map.shape[-1]).to(attn_map.dtype)
    n_fg = text.shape[0]
    offset = 1 if with_bg else 0
    logit_scale = torch.clamp(model.logit_scale.exp(), max=100)
    group_aff = (grouped @ text.T) * logit_scale
    pre = F.softmax(group_aff, dim=-1)
    avg_aff = F.softmax((avg @ text.T) * logit_scale, dim=-1)
    mask = torch.zeros_like(avg_aff)
    top = avg_aff.topk(dim=-1, k=min(k, n_fg))
    mask.scatter_add_(dim=-1, index=top.indices, src=torch.ones_like(top.values))
    group_aff = group_aff.masked_fill(~mask.bool(), float("-inf"))
    group_aff = F.softmax(group_aff, dim=-1) * pre
    pred = torch.zeros(n_fg + offset, *attn_map.shape[:2], dtype=img.dtype)
    pred[offset:] = (onehot @ group_aff).permute(2, 0, 1)
    if with_bg:
        thr = min(bg_thresh, group_aff.max().item())
        pred[0, (onehot @ group_aff).max(dim=-1).values < thr] = 1
    return pred[None]


@torch.no_grad()
def mmseg_inference(model, img: torch.Tensor, text: torch.Tensor, with_bg: bool, bg_thresh: float = 0.95,
                    k: int = 5, slide: tuple[int, int] | None = None,
                    ori_shape: tuple[int, int] | None = None) -> torch.Tensor:
    """mmseg ``slide_inference`` (``slide=(crop, stride)``) or ``whole_inference``, resized to
    ``ori_shape`` (rescale=True) -> the pre-softmax ``seg_logit`` 1 x C x H x W."""
    def run(x):
        return encode_decode(model, x, text, with_bg, bg_thresh, k)

    if slide is None:
        seg = run(img)
    else:
        h_crop = w_crop = slide[0]
        h_stride = w_stride = slide[1]
        b, _, h_img, w_img = img.shape
        n = text.shape[0] + (1 if with_bg else 0)
        h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
        w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
        preds = img.new_zeros((b, n, h_img, w_img))
        count = img.new_zeros((b, 1, h_img, w_img))
        for hi in range(h_grids):
            for wi in range(w_grids):
                y1, x1 = hi * h_stride, wi * w_stride
                y2, x2 = min(y1 + h_crop, h_img), min(x1 + w_crop, w_img)
                y1, x1 = max(y2 - h_crop, 0), max(x2 - w_crop, 0)
                crop = run(img[:, :, y1:y2, x1:x2])
                preds += F.pad(crop, (int(x1), int(preds.shape[3] - x2), int(y1), int(preds.shape[2] - y2)))
                count[:, :, y1:y2, x1:x2] += 1
        assert (count == 0).sum() == 0
        seg = preds / count
    if ori_shape is not None:
        seg = F.interpolate(seg, size=ori_shape, mode="bilinear", align_corners=False)
    return seg


def to_textseg_order(seg: torch.Tensor, with_bg: bool) -> torch.Tensor:
    """Official channel order [background, c_1..c_N] -> textseg's [c_1..c_N, background]."""
    return torch.cat([seg[:, 1:], seg[:, :1]], dim=1) if with_bg else seg
