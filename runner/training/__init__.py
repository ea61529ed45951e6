"""Training on the cached features: the head, the head search, the stages, the step loop and its events,
fine-tuning, evaluation, checkpoints."""
