"""Planning a run before it starts: how much memory and time it needs (`estimate`), and searches over settings
(`sweep`, Optuna).  Below `api` in the layers, above everything a run is made of."""
