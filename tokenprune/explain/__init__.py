"""Relevance labels (GAE), their files and the explainability mapper's training stage (issue 8)."""
