"""The built-in world's encoders, made once and shipped with the package (`shipped/`, see `shipped.py`): a ViT whose
patches say what lies under them (`dense_vit.py`) and a Llama that answers the world's questions from a written
scene description (`description_llm.py`, `description.py`, `phrase_tokenizer.py`). `spatial-mllm world-encoders`
remakes either; the demo uses the shipped ones unless told to train its own."""
