"""Data augmentation for clothing images, run on the accelerator inside the train step.

Each training image is zero-padded by `padding` pixels on every side, a random 28x28 window is
cut from it (a shift of up to `padding` pixels each way), and it is mirrored left-right with
probability 1/2. Garments are left-right symmetric enough for a flip to keep the class; an
upside-down shoe is not a shoe, so there is no vertical flip. It runs on the 28x28 uint8 images,
before the resize, so it costs next to nothing at any resize.
"""

import jax
import jax.numpy as jnp

PADDING = 2


def random_crop_and_flip(key: jax.Array, images: jax.Array, padding: int = PADDING) -> jax.Array:
    """[B, H, W, C] -> [B, H, W, C] of the same dtype; example i of the output comes from image i."""
    batch, height, width, _ = images.shape
    shift_key, flip_key = jax.random.split(key)
    offsets = jax.random.randint(shift_key, (batch, 2), 0, 2 * padding + 1)
    flips = jax.random.bernoulli(flip_key, 0.5, (batch,))
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))

    def crop_and_flip(image, offset, flip):
        crop = jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, image.shape[-1]))
        return jnp.where(flip, crop[:, ::-1], crop)

    return jax.vmap(crop_and_flip)(padded, offsets, flips)
