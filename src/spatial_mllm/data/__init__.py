"""LLaVA-format training data: reading and checking LLaVA JSON files, the dataset, the collator."""
