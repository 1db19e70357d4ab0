"""Training: explicit state, Optax optimizers, jitted steps and the loop."""
