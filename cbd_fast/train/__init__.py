"""Training: the CBD losses, replay, checkpoints and the continual task loop."""
