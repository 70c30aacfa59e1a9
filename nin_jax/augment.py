"""Data augmentation for clothing images, run on the accelerator inside the train step.

Crops and flips: each training image is zero-padded by `padding` pixels on every side, a random
28x28 window is cut from it (a shift of up to `padding` pixels each way), and it is mirrored
left-right with probability 1/2. Garments are left-right symmetric enough for a flip to keep the
class; an upside-down shoe is not a shoe, so there is no vertical flip.

Random erasing (Zhong et al., 2017): with a given probability, a random rectangle of the image is
replaced by uniform noise, so that the network cannot rely on any one part of a garment.

Both run on the 28x28 uint8 images, before the resize, so they cost next to nothing at any resize.
"""

import math

import jax
import jax.numpy as jnp

PADDING = 2
# The erased rectangle: its area as a fraction of the image's, and its height / width (drawn
# log-uniformly); the ranges of the random-erasing paper. A rectangle that does not fit is clipped.
ERASED_AREA = (0.02, 0.4)
ERASED_ASPECT = (0.3, 1 / 0.3)


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



def random_erasing(key: jax.Array, images: jax.Array, probability: float) -> jax.Array:
    """[B, H, W, C] uint8 -> the same, with one random rectangle of each image erased to noise with
    `probability` (the same rectangle in every channel); example i of the output comes from image i."""
    batch, height, width, _ = images.shape
    erase_key, area_key, aspect_key, place_key, noise_key = jax.random.split(key, 5)
    erase = jax.random.bernoulli(erase_key, probability, (batch,))
    area = jax.random.uniform(area_key, (batch,), minval=ERASED_AREA[0], maxval=ERASED_AREA[1]) * height * width
    aspect = jnp.exp(jax.random.uniform(aspect_key, (batch,), minval=math.log(ERASED_ASPECT[0]),
                                        maxval=math.log(ERASED_ASPECT[1])))
    sizes = jnp.stack([jnp.sqrt(area * aspect), jnp.sqrt(area / aspect)], -1)
    sizes = jnp.clip(jnp.round(sizes), 1, jnp.array([height, width])).astype(jnp.int32)
    corners = (jax.random.uniform(place_key, (batch, 2)) * (jnp.array([height, width]) - sizes + 1)).astype(jnp.int32)

    def inside(axis_length, start, size):  # [B, axis_length]: which rows (or columns) the rectangle covers
        positions = jnp.arange(axis_length)
        return (positions >= start[:, None]) & (positions < (start + size)[:, None])

    rows, columns = inside(height, corners[:, 0], sizes[:, 0]), inside(width, corners[:, 1], sizes[:, 1])
    erased = rows[:, :, None] & columns[:, None, :] & erase[:, None, None]
    noise = jax.random.randint(noise_key, images.shape, 0, 256).astype(images.dtype)
    return jnp.where(erased[..., None], noise, images)
