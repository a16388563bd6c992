"""Using what training made: chat and generate, merge, export GGUF, serve (a run is opened by
tunesmith.models.run_folder)."""
