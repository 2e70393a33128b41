"""raypo: listwise, multi-dimensional preference optimisation of LLMs on Ray clusters."""

__version__ = "0.1.0"
