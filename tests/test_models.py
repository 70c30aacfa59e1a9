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


# The chapter's exercises (docs/exercises.md): each variant's parameters, at 67x67 for the dense head,
# whose parameters depend on the size of the class maps (1x1 there).
VARIANT_PARAMS = [
    (models.Variant(inner_convs=1), 1_769_112),
    (models.Variant(inner_convs=3), 2_215_220),
    (models.Variant(inner_kernel_size=3), 5_549_094),
    (models.Variant(class_width=64), 2_183_434),
    (models.Variant(head="max"), REFERENCE_PARAMS),
    (models.Variant(head="dense"), REFERENCE_PARAMS + 10 * 10 + 10),
]


@pytest.mark.parametrize("variant, params", VARIANT_PARAMS, ids=lambda value: str(value).replace(" ", ""))
def test_every_variant_of_the_exercises_learns_forward_and_backward(variant, params):
    """Built from the same model code; a training step's forward and backward pass through every layer
    (the class kernels moved off their zero start, so that every gradient path is live). Not compiled:
    op by op, the variants share most of their kernels, and the test takes a third of the time."""
    model = models.NiN(variant=variant)
    images = jax.random.uniform(jax.random.key(1), (1, 67, 67, 1))
    variables = model.init(jax.random.key(0), images)
    assert models.param_count(variables["params"]) == params
    keys = iter(jax.random.split(jax.random.key(2), 100))
    variables = jax.tree_util.tree_map(lambda p: p + 0.05 * jax.random.normal(next(keys), p.shape), variables)

    def loss(params):
        logits = model.apply({"params": params}, images, train=True, rngs={"dropout": jax.random.key(3)})
        return jnp.sum(logits * jnp.arange(10.0))

    grads = jax.grad(loss)(variables["params"])
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(variables["params"])
    chex.assert_tree_all_finite(grads)
    assert all(np.any(g != 0) for g in jax.tree_util.tree_leaves(grads["block1"]))  # the gradient reaches the stem


def test_the_variants_change_the_book_s_layers_as_their_names_say():
    shapes = lambda variant: jax.tree_util.tree_map(  # noqa: E731
        jnp.shape, jax.eval_shape(models.NiN(variant=variant).init, jax.random.key(0),
                                  jax.ShapeDtypeStruct((1, 99, 99, 1), jnp.float32))["params"])
    book = shapes(models.Variant())
    assert set(book["block2"]) == {"conv", "conv1x1_1", "conv1x1_2"} and "dense" not in book
    assert set(shapes(models.Variant(inner_convs=3))["block2"]) == {"conv", "conv1x1_1", "conv1x1_2", "conv1x1_3"}
    assert shapes(models.Variant(inner_kernel_size=3))["block2"]["conv1x1_1"]["kernel"] == (3, 3, 256, 256)
    wide = shapes(models.Variant(class_width=64))["block4"]
    assert (wide["conv"]["kernel"], wide["conv1x1_1"]["kernel"], wide["conv1x1_2"]["kernel"]) == (
        (3, 3, 384, 64), (64, 64), (64, 10))
    assert shapes(models.Variant(head="dense"))["dense"]["kernel"] == (2 * 2 * 10, 10)  # 2x2 class maps at 99x99


@pytest.mark.parametrize("head", ["max", "dense"])
def test_the_other_heads_score_the_class_maps_as_their_names_say(head):
    """`max`: each class map's maximum (the misreading of the book's pool); `dense`: a fully connected
    layer on the flattened maps."""
    model = models.NiN(variant=models.Variant(head=head))
    images = jax.random.uniform(jax.random.key(1), (1, 99, 99, 1))
    variables = model.init(jax.random.key(0), images)
    variables = jax.tree_util.tree_map(lambda p: p + 0.1, variables)  # class maps that vary over the map
    logits, state = model.apply(variables, images, mutable=["intermediates"])
    (maps,) = state["intermediates"]["07_block4"]
    assert maps.shape == (1, 2, 2, 10) and not np.allclose(maps.max(axis=(1, 2)), maps.mean(axis=(1, 2)))
    dense = variables["params"].get("dense")
    expected = maps.max(axis=(1, 2)) if head == "max" else maps.reshape(1, -1) @ dense["kernel"] + dense["bias"]
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)
