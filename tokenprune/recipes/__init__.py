"""Build recipes: code that trains a shipped artefact (models/ never imports it)."""
