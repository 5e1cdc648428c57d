"""Training adapters on the resident base: config, trainable adapters, the run, checkpoints."""
