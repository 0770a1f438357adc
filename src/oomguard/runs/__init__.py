"""Protected runs: the registry and their lifecycle."""
