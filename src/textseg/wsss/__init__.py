"""Weakly supervised semantic segmentation: masks from image-level labels.

* :mod:`textseg.wsss.cam` the CAM network (backbone + 1x1 classifier; also a fixed-vocabulary
  segmentation model for ``textseg segment --weights``).
* :mod:`textseg.wsss.clims` the CLIMS losses (OTM, BTM, CBS, REG with a frozen image-text evaluator)
  and the multi-label baseline loss.
* :mod:`textseg.wsss.cam_maps` multi-scale + flip CAMs, their files, masks and the threshold sweep.
* :mod:`textseg.wsss.pseudo_labels` CAM files for a dataset, their evaluation, pseudo-label datasets.

Training (the recipe on the engine) is :mod:`textseg.train.cam` (``textseg train cam``).
"""
