"""What a vision tower and an LLM bring before any projector is trained: per-patch linear probes of a ViT on the
built-in world (does the patch under an object say its colour, shape and size?) and the LLM's text-only accuracy
with and without a written scene description (the ceiling and the prior a multimodal model lands between)."""
