"""cmt_bench: a reproducible benchmark of Consistency Mid-Training for few-step generative models."""
__version__ = "0.1.0"
