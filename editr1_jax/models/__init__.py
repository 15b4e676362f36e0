"""One network per file, each with its config presets and its checkpoint name table."""
