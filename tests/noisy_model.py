"""A gradient-masked model for the robust-eval tests: the default CNN whose logits get ``0.05·sin(1e4·Rx)``.

The term barely moves the logits (clean accuracy is the CNN's) but swamps the input gradient, so white-box attacks
are fooled; its parameters are the CNN's, so it restores any run of the default config (``model.name`` set to
``tests.noisy_model:NoisyCNN``)."""

import jax
import jax.numpy as jnp
import numpy as np

from lepton_jax.models.cnn import CNN

_PROJECTION = np.random.default_rng(1).normal(size=(64, 10)).astype(np.float32)


class NoisyCNN(CNN):
    def __call__(self, x: jax.Array, *, train: bool = False, rngs: jax.Array | None = None) -> jax.Array:
        flat = x.reshape(x.shape[0], -1)
        return super().__call__(x, train=train, rngs=rngs) + 0.05 * jnp.sin(1e4 * (flat @ _PROJECTION))
