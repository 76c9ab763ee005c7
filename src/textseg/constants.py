"""Numbers shared across textseg, defined once (a leaf module: imports nothing from textseg).

``OPENAI_MEAN`` / ``OPENAI_STD``: the pixel mean / std of OpenAI CLIP (``clip/clip.py``, ``_transform``),
also OpenCLIP's and Hugging Face ``CLIPImageProcessor``'s defaults. ``IMAGENET_MEAN`` /
``IMAGENET_STD``: torchvision's ImageNet statistics (NVlabs GroupViT, CLIMS / IRN's
``TorchvisionNormalize``, timm's ``IMAGENET_DEFAULT_*``). ``IGNORE_INDEX``: the label value of
unlabelled pixels in every segmentation mask (VOC's 255; ``F.cross_entropy(ignore_index=...)``).
"""

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE_INDEX = 255
