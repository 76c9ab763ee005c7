"""textseg: segment anything you can name."""

__version__ = "0.1.0"
