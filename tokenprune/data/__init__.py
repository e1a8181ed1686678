"""Training data: the LLaVA instruction format (instruct.py) and the synthetic shapes world (shapes.py)."""
