"""Using what training made: load a run (ship.load), chat and generate, merge, export GGUF, serve."""
