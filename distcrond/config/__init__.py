"""Job and node files: their models, loading, validation and live reload."""
