"""torch-hydra-template's Hydra plugins: the Optuna sweeper and the requeue-aware launchers."""
