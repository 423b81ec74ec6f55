"""spatial-mllm: LLaVA-style multimodal LLMs whose projector understands space."""

__version__ = "0.1.0"
