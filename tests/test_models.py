"""The NiN model (nin_jax/models.py): shapes, parameter count, summary, outputs, dropout, the
global average pool, input checks and initialisation."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nin_jax import models, steps
from nin_jax.config import Config


# The book's PyTorch printout on a 1x224x224 image (NCHW), transposed to NHWC.
REFERENCE_SHAPES_224 = [
    ("block1", (1, 54, 54, 96)),
    ("pool1", (1, 26, 26, 96)),
    ("block2", (1, 26, 26, 256)),
    ("pool2", (1, 12, 12, 256)),
    ("block3", (1, 12, 12, 384)),
    ("pool3", (1, 5, 5, 384)),
    ("dropout", (1, 5, 5, 384)),
    ("block4", (1, 5, 5, 10)),
    ("global_avg_pool", (1, 1, 1, 10)),
    ("flatten", (1, 10)),
]


REFERENCE_PARAMS = 1_992_166


def test_layer_shapes_at_224_match_the_book():
    rows = models.layer_summary(models.NiN(), 224)
    assert [(name, shape) for name, shape, _ in rows] == REFERENCE_SHAPES_224


def test_parameter_count_matches_the_book():
    rows = models.layer_summary(models.NiN(), 224)
    assert sum(count for _, _, count in rows) == REFERENCE_PARAMS
    params = jax.eval_shape(models.NiN().init, jax.random.key(0), jnp.zeros((1, 224, 224, 1)))["params"]
    assert models.param_count(params) == REFERENCE_PARAMS


def test_summary_text_lists_every_layer_and_the_total():
    text = models.format_summary(models.layer_summary(models.NiN(), 224))
    for name, shape in REFERENCE_SHAPES_224:
        assert name in text and str(shape) in text
    assert "1,992,166" in text


@pytest.mark.parametrize("batch_size, size", [(1, 224), (3, 96), (8, 67), (2, 100)])
def test_output_is_batch_by_classes(batch_size, size):
    model = models.NiN(num_classes=10)
    images = jax.ShapeDtypeStruct((batch_size, size, size, 1), jnp.float32)
    logits = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x)[0], images)
    chex.assert_shape(logits, (batch_size, 10))
    chex.assert_type(logits, jnp.float32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_forward_pass_runs_and_returns_float32_logits(dtype):
    model = models.NiN(num_classes=7, dtype=dtype)
    images = jax.random.uniform(jax.random.key(1), (2, 67, 67, 1))
    variables = model.init(jax.random.key(0), images)
    logits = model.apply(variables, images)
    chex.assert_shape(logits, (2, 7))
    chex.assert_type(logits, jnp.float32)
    chex.assert_tree_all_finite(logits)
    chex.assert_type(jax.tree_util.tree_leaves(variables)[0], jnp.float32)  # parameters stay float32


def test_dropout_only_in_training():
    model = models.NiN(dropout_rate=0.5)
    images = jax.random.uniform(jax.random.key(1), (2, 67, 67, 1))
    variables = model.init(jax.random.key(0), images)
    # Large biases make the last block's inputs matter, so dropping them changes the output.
    variables = jax.tree_util.tree_map(lambda p: p + 0.1, variables)
    eval_a, eval_b = (model.apply(variables, images) for _ in range(2))
    np.testing.assert_array_equal(eval_a, eval_b)
    train_a, train_b = (
        model.apply(variables, images, train=True, rngs={"dropout": jax.random.key(k)}) for k in (1, 2)
    )
    assert not np.allclose(train_a, eval_a)
    assert not np.allclose(train_a, train_b)


def test_global_average_pool_is_a_mean_over_the_whole_map():
    model = models.NiN()
    images = jax.random.uniform(jax.random.key(1), (1, 120, 120, 1))
    variables = model.init(jax.random.key(0), images)
    logits, state = model.apply(variables, images, mutable=["intermediates"])
    (block4,) = state["intermediates"]["07_block4"]
    assert block4.shape[1:3] == (2, 2)  # a 5x5 window, as in the book's JAX code, would not fit
    np.testing.assert_allclose(logits, block4.mean(axis=(1, 2)), rtol=1e-6)


@pytest.mark.parametrize(
    "shape, dtype, message",
    [
        ((1, 66, 66, 1), jnp.float32, "at least 67x67"),
        ((1, 224, 50, 1), jnp.float32, "at least 67x67"),
        ((224, 224, 1), jnp.float32, "rank 4"),
        ((1, 1, 224, 224), jnp.float32, "1 channel"),
        ((1, 96, 96, 3), jnp.float32, "1 channel"),
        ((1, 96, 96, 1), jnp.uint8, "floating-point"),
    ],
)
def test_bad_inputs_fail_with_a_clear_error(shape, dtype, message):
    model = models.NiN()
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(shape, dtype))


@pytest.mark.parametrize("weight_init", sorted(models.INITS))
def test_every_class_score_can_learn_from_the_first_step(weight_init):
    """With 'kaiming' no class starts dead (its ReLU off for every image); with the book's 'xavier'
    some do, which is why the book's recipe can sit at chance."""
    images = jax.random.uniform(jax.random.key(1), (64, 96, 96, 1))
    model = models.NiN(weight_init=weight_init)
    variables = model.init(jax.random.key(0), images)
    logits = model.apply(variables, images)
    dead_classes = int((logits.max(axis=0) == 0).sum())
    if weight_init == "kaiming":
        assert dead_classes == 0
        np.testing.assert_allclose(logits, 1.0)  # zero class kernels, bias 1: equal, alive scores
    else:
        assert dead_classes > 0


def test_the_reference_model_has_no_batch_statistics():
    state = steps.create_train_state(Config(resize=67))
    assert state.batch_stats == {}
    assert state.variables() == {"params": state.params, "batch_stats": {}}
