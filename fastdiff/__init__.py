"""fastdiff: distil many-step diffusion models into one- and few-step generators."""

__version__ = "0.1.0"
