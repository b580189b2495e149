"""Multi-task learning: shared models, balancing methods and diagnostics."""
