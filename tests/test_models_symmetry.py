"""Each model's declared symmetries are true symmetries (THEORY section 1), and false ones are caught."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from quotient_sgd.models import CNN, MLP, DeepLinear, MeanField, Transformer
from quotient_sgd.symmetry import Product, Rescale, Scale, SymmetryError, Translation, verify


def tree_rel_err(a, b) -> float:
    """``|a - b| / max(|b|, tiny)`` over whole trees, in numpy (eager jnp compiled each operation per leaf shape)."""
    la, lb = ([np.asarray(x, np.float64) for x in jax.tree.leaves(t)] for t in (a, b))
    diff = np.sqrt(sum(np.sum(np.square(x - y)) for x, y in zip(la, lb)))
    return float(diff / max(np.sqrt(sum(np.sum(np.square(y)) for y in lb)), 1e-30))


ACTS = ["relu", "leaky_relu", "identity", "tanh", "gelu"]
HOM = {"relu", "leaky_relu", "identity"}


def _vec(din):
    return jax.random.normal(jax.random.key(0), (8, din))


def _img(hw=8):
    return jax.random.normal(jax.random.key(0), (4, hw, hw, 1))


def _tok(T=5, V=7):
    return jax.random.randint(jax.random.key(0), (2, T), 0, V)


CASES = (
    [(f"mlp-{a}-cls", lambda a=a: MLP(3, (4, 5), 3, activation=a, classifier=True, rngs=nnx.Rngs(0)), _vec(3))
     for a in ACTS]
    + [("mlp-relu-reg", lambda: MLP(3, (4,), 2, rngs=nnx.Rngs(0)), _vec(3)),
       ("deeplinear", lambda: DeepLinear(3, (4, 5), 2, rngs=nnx.Rngs(0)), _vec(3)),
       ("meanfield-relu", lambda: MeanField(3, 6, 2, rngs=nnx.Rngs(0)), _vec(3))]
    + [(f"cnn-{n}-{a}", lambda n=n, a=a: CNN(1, (3, 4), 5, norm=n, activation=a, classifier=True,
                                             rngs=nnx.Rngs(0)), _img())
       for n in (None, "layer", "batch") for a in ("relu", "gelu")]
    + [("cnn-batch-28", lambda: CNN(1, (2, 3), 4, norm="batch", strides=2, rngs=nnx.Rngs(0)), _img(28))]
    + [("transformer-relu", lambda: Transformer(7, 8, 2, 1, 5, rngs=nnx.Rngs(0), mlp_ratio=2), _tok()),
       ("transformer-gelu", lambda: Transformer(7, 8, 2, 1, 5, rngs=nnx.Rngs(0), mlp_ratio=2, activation="gelu"),
        _tok())]
)
# Redundant in the fast suite (the larger set runs in the slow one): MLP identity / tanh (the homogeneous and the
# non-homogeneous MLP paths are relu, leaky_relu and gelu), the CNN without normalisation and the Transformer under
# gelu (their components are a subset of the relu ones', the gelu branch of the CNN is cnn-layer-gelu, and the
# Transformer's gelu branch, no MLP rescale, is checked in test_cnn_and_transformer_components), and the batch-norm
# CNNs of the same shapes as test_batchnorm_cnn_symmetries_threaded, which checks each of their components to the
# same rtol (verify of a batch-norm CNN stays fast in cnn-batch-28).
SLOW_CASES = {"mlp-identity-cls", "mlp-tanh-cls", "cnn-None-gelu", "transformer-gelu", "cnn-batch-relu",
              "cnn-batch-gelu"}
CASES = [pytest.param(*c, id=c[0], marks=[pytest.mark.slow] if c[0] in SLOW_CASES else []) for c in CASES]


@pytest.mark.parametrize("name,make,x", CASES)
def test_declared_symmetries_verify(name, make, x):
    model = make()
    group = model.symmetries()
    assert isinstance(group, Product) and group.components
    worst = verify(model, group, x, jax.random.key(1), num_samples=2, rtol=1e-5)
    assert worst <= 1e-5
    # ... while the raw parameters move: the action is not (numerically) the identity
    params = nnx.split(model, nnx.Param, ...)[1]
    g = group.sample(jax.random.key(2), params)
    assert tree_rel_err(group.act(g, params), params) > 0.1


def _names(model):
    return [c.name for c in model.symmetries().components]


@pytest.mark.parametrize("activation", ACTS)
def test_mlp_components(activation):
    names = _names(MLP(2, (3, 3), 2, activation=activation, rngs=nnx.Rngs(0)))
    expected = [f"permutation/layers.{l}" for l in (0, 1)]
    if activation in HOM:
        expected += [f"rescale/layers.{l}" for l in (0, 1)]
    assert sorted(names) == sorted(expected)  # no translation for a regression MLP
    assert "translation/layers.2" in _names(MLP(2, (3, 3), 2, classifier=True, rngs=nnx.Rngs(0)))


def test_cnn_and_transformer_components():
    assert sorted(_names(CNN(1, (2,), 3, norm="layer", rngs=nnx.Rngs(0)))) == [
        "permutation/convs.0", "rescale/norms.0", "scale/convs.0"]
    assert sorted(_names(CNN(1, (2,), 3, rngs=nnx.Rngs(0)))) == ["permutation/convs.0", "rescale/convs.0"]
    names = _names(Transformer(5, 4, 2, 1, 4, rngs=nnx.Rngs(0)))
    assert sorted(names) == ["permutation/blocks.0.heads", "permutation/blocks.0.mlp", "qk/blocks.0",
                             "rescale/blocks.0.mlp", "translation/unembed", "vo/blocks.0"]
    assert "rescale/blocks.0.mlp" not in _names(Transformer(5, 4, 2, 1, 4, rngs=nnx.Rngs(0), activation="gelu"))


# ----- actions that are NOT symmetries must be caught ---------------------------------------------------------
def _forced_rescale_mlp(activation):
    model = MLP(3, (6,), 2, activation=activation, rngs=nnx.Rngs(0))
    return model, Rescale(incoming=((("layers", 0, "kernel"), 1), (("layers", 0, "bias"), 0)),
                          outgoing=((("layers", 1, "kernel"), 0),), name="rescale/layers.0")


@pytest.mark.parametrize("activation", ["gelu", "tanh"])
def test_forced_rescale_on_non_homogeneous_mlp_raises(activation):
    model, bad = _forced_rescale_mlp(activation)
    with pytest.raises(SymmetryError, match="rescale/layers.0"):
        verify(model, Product([bad]), _vec(3), jax.random.key(1))


def test_forced_rescale_passes_for_relu():  # the same action is fine where the activation allows it
    model, ok = _forced_rescale_mlp("relu")
    assert verify(model, Product([ok]), _vec(3), jax.random.key(1), rtol=1e-5) <= 1e-5


def test_false_actions_on_cnn_raise():
    x = _img()
    ln = CNN(1, (3, 4), 5, norm="layer", rngs=nnx.Rngs(0))
    # rescale ACROSS a normalisation: conv channels vs the next conv
    across = Rescale(incoming=((("convs", 0, "kernel"), 3), (("convs", 0, "bias"), 0)),
                     outgoing=((("convs", 1, "kernel"), 2),), name="rescale/across-ln")
    with pytest.raises(SymmetryError, match="across-ln"):
        verify(ln, across, x, jax.random.key(1))
    # per-channel scale under a LayerNorm over channels
    per_channel = Scale(members=((("convs", 0, "kernel"), 3), (("convs", 0, "bias"), 0)), name="scale/per-channel")
    with pytest.raises(SymmetryError, match="per-channel"):
        verify(ln, per_channel, x, jax.random.key(1))
    # scale without any normalisation
    plain = CNN(1, (3, 4), 5, rngs=nnx.Rngs(0))
    with pytest.raises(SymmetryError, match="scale/no-norm"):
        verify(plain, Scale(members=((("convs", 0, "kernel"), None), (("convs", 0, "bias"), None)),
                            name="scale/no-norm"), x, jax.random.key(1))
    # translation of a regression output
    with pytest.raises(SymmetryError, match="translation/regression"):
        verify(plain, Translation(kernel=("head", "kernel"), bias=("head", "bias"), name="translation/regression"),
               x, jax.random.key(1))


def test_batchnorm_scale_symmetry_in_training_mode_only():
    """Per-channel scale of a BatchNorm CNN: exact with batch statistics; the eval-mode function differs."""
    model = CNN(1, (3,), 2, norm="batch", rngs=nnx.Rngs(0))
    group = model.symmetries().component("scale/convs.0")
    x = _img()

    def outputs(m):
        graphdef, params, rest = nnx.split(m, nnx.Param, ...)
        g = group.sample(jax.random.key(3), params, 1.0)
        f = jax.jit(lambda p, r: nnx.merge(graphdef, p, r)(x))
        return f(params, rest), f(group.act(g, params), rest)

    y, gy = outputs(model)
    np.testing.assert_allclose(gy, y, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(y))))
    model.eval()
    y, gy = outputs(model)
    assert not np.allclose(gy, y, rtol=1e-3)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_batchnorm_cnn_symmetries_threaded(activation):
    """Every declared component (and a product element) of a batch-norm CNN leaves the training-mode outputs
    unchanged to rtol 1e-5, with the batch statistics passed through jit as state."""
    model = CNN(1, (3, 4), 5, norm="batch", activation=activation, classifier=True, rngs=nnx.Rngs(0))
    group = model.symmetries()
    assert any(n.startswith("scale/") for n in _names(model))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x = _img()
    f = jax.jit(lambda p, r: nnx.merge(graphdef, p, r)(x))
    y = f(params, rest)
    ref = float(jnp.max(jnp.abs(y)))
    keys = jax.random.split(jax.random.key(7), len(group.components) + 1)
    for c, k in zip(group.components, keys):
        err = float(jnp.max(jnp.abs(f(c.act(c.sample(k, params), params), rest) - y))) / ref
        assert err <= 1e-5, c.name
    err = float(jnp.max(jnp.abs(f(group.act(group.sample(keys[-1], params), params), rest) - y))) / ref
    assert err <= 1e-5


@pytest.mark.parametrize("size", [
    "small",  # the shapes of the transformer cases above (their compiled operations are reused)
    pytest.param("large", marks=pytest.mark.slow),
])
def test_verify_tells_rounding_from_a_false_action_at_large_elements(size):
    """float32, elements of scale 3 (GL matrices of condition ~1e3): the Transformer's true symmetries change
    the outputs beyond rtol=1e-5 by rounding alone, as much as the exact round trip g^-1.(g.theta) does, so
    verify passes them; an action that is not a symmetry still fails at the same scale, with the rounding
    comparison in the message."""
    if size == "small":
        model, tokens = Transformer(7, 8, 2, 1, 5, rngs=nnx.Rngs(0), mlp_ratio=2), _tok()
    else:
        model = Transformer(16, 32, 2, 1, 8, rngs=nnx.Rngs(0))
        tokens = jax.random.randint(jax.random.key(0), (4, 8), 0, 16)
    worst = verify(model, model.symmetries(), tokens, jax.random.key(1), scale=3.0, rtol=1e-5, num_samples=2)
    assert worst > 1e-5  # the case this is about: rounding above rtol
    for activation in ("gelu", "tanh"):
        bad_model, bad = _forced_rescale_mlp(activation)
        with pytest.raises(SymmetryError, match="round trip"):
            verify(bad_model, Product([bad]), _vec(3), jax.random.key(1), scale=3.0, rtol=1e-5)
