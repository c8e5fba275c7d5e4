"""The compression methods, one module per paper, and the registry every caller dispatches through."""
