"""Model families behind one adapter contract (`tokenprune.models.base.Adapter`); only this package
touches transformers internals."""
