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


def test_global_average_pool_is_a_mean_over_the_whole_map_and_the_exercises_heads_as_named():
    """`avg`, the book's: each class map's mean; `max` (an exercise: the misreading of the book's
    pool): each map's maximum; `dense` (another): a fully connected layer on the flattened maps. At
    120x120, one size, so that the three share the kernels that run them."""
    images = jax.random.uniform(jax.random.key(1), (1, 120, 120, 1))
    for head in ("avg", "max", "dense"):
        model = models.NiN(variant=models.Variant(head=head))
        variables = model.init(jax.random.key(0), images)
        variables = jax.tree_util.tree_map(lambda p: p + 0.1, variables)  # class maps that vary over the map
        logits, state = model.apply(variables, images, mutable=["intermediates"])
        (maps,) = state["intermediates"]["07_block4"]
        assert maps.shape == (1, 2, 2, 10)  # a 5x5 window, as in the book's JAX code, would not fit
        assert not np.allclose(maps.max(axis=(1, 2)), maps.mean(axis=(1, 2)))
        dense = variables["params"].get("dense")
        expected = {"avg": lambda: maps.mean(axis=(1, 2)), "max": lambda: maps.max(axis=(1, 2)),
                    "dense": lambda: maps.reshape(1, -1) @ dense["kernel"] + dense["bias"]}[head]()
        np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)


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


# The book's NiN as main defined it before the exercises' options: each parameter's path and shape.
# Checkpoints and exported models of earlier runs hold exactly these.
BOOK_PARAM_SHAPES = {
    f"{block}/{conv}/{leaf}": shape
    for block, (inputs, features, kernel) in {"block1": (1, 96, 11), "block2": (96, 256, 5), "block3": (256, 384, 3),
                                              "block4": (384, 10, 3)}.items()
    for conv, kernel_shape in {"conv": (kernel, kernel, inputs, features), "conv1x1_1": (features, features),
                               "conv1x1_2": (features, features)}.items()
    for leaf, shape in {"kernel": kernel_shape, "bias": (features,)}.items()
}


def variable_shapes(model: models.NiN, size: int = 67) -> dict[str, dict[str, tuple[int, ...]]]:
    """Each collection's {path: shape}, traced (nothing is run)."""
    variables = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, size, size, 1), jnp.float32))
    return {collection: {"/".join(key.key for key in path): leaf.shape
                         for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
            for collection, tree in variables.items()}


def test_the_book_s_nin_keeps_its_parameter_tree():
    """The default model and the strong recipe's have the parameters, names and shapes they had
    before the exercises' options came: earlier checkpoints and exported models still load."""
    assert variable_shapes(models.NiN()) == {"params": BOOK_PARAM_SHAPES}
    assert sum(np.prod(shape) for shape in BOOK_PARAM_SHAPES.values()) == REFERENCE_PARAMS
    convs = {path.rsplit("/", 1)[0]: shape[-1] for path, shape in BOOK_PARAM_SHAPES.items() if path.endswith("bias")}
    with_bn = variable_shapes(models.NiN(batch_norm=True))  # each convolution's bias gives way to its batch norm
    assert with_bn["params"] == {**{f"{conv}/kernel": BOOK_PARAM_SHAPES[f"{conv}/kernel"] for conv in convs},
                                 **{f"{conv}_bn/{leaf}": (width,) for conv, width in convs.items()
                                    for leaf in ("scale", "bias")}}
    assert with_bn["batch_stats"] == {f"{conv}_bn/{leaf}": (width,) for conv, width in convs.items()
                                      for leaf in ("mean", "var")}
    assert models.NiN().variant == models.Variant() == models.Variant(2, 1, 0, "avg")


# The chapter's exercises (docs/exercises.md): each variant's parameters in the book's recipe and in
# the strong one (batch norm, with which docs/exercises.md trains them), at 67x67, where the dense
# head's class maps are 1x1.
VARIANT_PARAMS = [
    (models.Variant(inner_convs=1), 1_769_112, 1_770_604),
    (models.Variant(inner_convs=3), 2_215_220, 2_218_204),
    (models.Variant(inner_kernel_size=3), 5_549_094, 5_551_332),
    (models.Variant(class_width=64), 2_183_434, 2_185_780),
    (models.Variant(head="max"), REFERENCE_PARAMS, 1_994_404),
    (models.Variant(head="dense"), REFERENCE_PARAMS + 10 * 10 + 10, 1_994_404 + 10 * 10 + 10),
]


@pytest.mark.parametrize("variant, params, params_with_bn", VARIANT_PARAMS, ids=lambda value: str(value).replace(" ", ""))
def test_every_variant_of_the_exercises_builds_its_forward_and_backward_pass(variant, params, params_with_bn):
    """Built from the same model code, in both recipes: a training step's forward pass and its
    gradient, traced through every layer (jax.eval_shape; running each would compile it, seconds a
    variant), give a gradient for every parameter. The heads' test below runs them."""
    images = jax.ShapeDtypeStruct((2, 67, 67, 1), jnp.float32)
    for batch_norm, count in ((False, params), (True, params_with_bn)):
        model = models.NiN(variant=variant, batch_norm=batch_norm)
        variables = jax.eval_shape(model.init, jax.random.key(0), images)
        assert models.param_count(variables["params"]) == count

        def loss(params, batch_stats, images):
            logits, _ = model.apply({"params": params, **batch_stats}, images, train=True, mutable=["batch_stats"],
                                    rngs={"dropout": jax.random.key(3)})
            return jnp.sum(logits * jnp.arange(10.0))

        batch_stats = {name: value for name, value in variables.items() if name == "batch_stats"}
        grads = jax.eval_shape(jax.grad(loss), variables["params"], batch_stats, images)
        assert jax.tree_util.tree_map(jnp.shape, grads) == jax.tree_util.tree_map(jnp.shape, variables["params"])


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
