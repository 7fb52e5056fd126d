"""make_dataset: classification targets are stored int32, so num_classes beyond int32 is refused."""

import numpy as np
import pytest

from quotient_sgd.data import make_dataset


def test_classification_num_classes_beyond_int32_is_refused_not_wrapped():
    """With ``num_classes = 2^32`` the class index ``2^31`` (in ``[0, num_classes)``, so accepted) was stored as
    ``-2^31`` in the int32 targets, silently.  A classification ``num_classes`` above ``2^31 - 1`` is refused,
    naming the argument; the largest one keeps its largest index exactly, and regression is unaffected."""
    x = np.zeros((2, 1))
    with pytest.raises(ValueError, match=r"num_classes=4294967296 is not allowed; need an integer in "
                                         r"\[1, 2\^31 - 1\] for classification"):
        make_dataset(x, np.array([2**31, 5]), x[:1], np.array([1]), task="classification", num_classes=2**32,
                     name="t")
    top = 2**31 - 1
    d = make_dataset(x, np.array([top - 1, 0]), x[:1], np.array([1]), task="classification", num_classes=top, name="t")
    assert np.asarray(d.y_train).tolist() == [top - 1, 0]
    r = make_dataset(x, np.zeros((2, 3)), x[:1], np.zeros((1, 3)), task="regression", num_classes=3, name="t")
    assert r.num_classes == 3


@pytest.mark.parametrize("arg", ["x_train", "y_train", "x_test"])
def test_ragged_nested_lists_are_refused_naming_the_argument(arg):
    """Nested lists of unequal lengths failed in NumPy's bare "setting an array element with a sequence ...
    inhomogeneous shape", naming no argument; now the message names it and what is allowed."""
    kw = dict(x_train=np.zeros((2, 2)), y_train=np.array([0, 1]), x_test=np.zeros((1, 2)), y_test=np.array([1]))
    kw[arg] = [[0.0, 1.0], [2.0]] if arg.startswith("x") else [0, [1]]
    with pytest.raises(ValueError, match=rf"make_dataset: {arg} is not allowed: it is no array of one shape"):
        make_dataset(**kw, task="classification", num_classes=2, name="t")
