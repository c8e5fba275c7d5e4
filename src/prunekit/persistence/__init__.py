"""Files: pickle-free checkpoints and their metadata schema, architecture replay, locked outputs and export."""
