"""Zero-shot dense segmentation: the :class:`Segmenter` and its building blocks."""

from textseg.segment.segmenter import SegmentCfg, Segmenter, SegmentResult

__all__ = ["Segmenter", "SegmentCfg", "SegmentResult"]
