"""Zero-shot dense segmentation: the :class:`Segmenter` and its building blocks."""

from textseg.segment.segmenter import PreparedImage, SegmentCfg, Segmenter, SegmentResult

__all__ = ["PreparedImage", "Segmenter", "SegmentCfg", "SegmentResult"]
