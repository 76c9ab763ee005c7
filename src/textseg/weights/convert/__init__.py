"""Checkpoint formats, one module each.

Every format module exposes::

    NAME: str                                   # e.g. "openai", "open_clip", "hf_clip", "groupvit_nvlabs"
    def detect(raw: RawCheckpoint) -> bool      # cheap, by key names / config; never raises
    def build(raw: RawCheckpoint) -> DualEncoder  # infer architecture from shapes/config, load strictly

``RawCheckpoint`` (``textseg.weights.load``) holds the flat tensor dict read safely from disk
(safetensors, or ``torch.load(weights_only=True)``), the parsed ``config.json`` of an HF folder if
any, and the file's metadata. ``textseg.weights.load.FORMATS`` lists the modules in detection order;
a new format is one new module here plus one line in that list.
"""
