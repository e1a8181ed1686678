"""Training stages (LoRA, mapper) and the pipeline behind `python -m tokenprune.train`."""
