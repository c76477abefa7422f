"""Tools for after a run: adapters (generate, compare, merge, export), intruder dimensions, forgetting, GGUF."""
