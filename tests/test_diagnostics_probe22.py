"""Experiment scripts: grokking's ground truth of a test accuracy that never rises, experiment 5's learning rate
the one experiment 1 trains at."""

import collections
import sys
import types

import numpy as np
import pytest

from helpers import EXPERIMENTS, experiment_script

sys.path.insert(0, EXPERIMENTS)


def test_grokking_ground_truth_has_no_jump_where_the_test_accuracy_does_not_rise():
    """Experiment 3's ground truth placed ``grok_start`` at the first evaluation whenever no evaluation before
    ``grok_end`` was 0.25 below it: a test accuracy flat at 0 (or 0.3) after memorising at step 1150 was tabulated
    as a jump 0-1150 of height 0.  A run whose test accuracy does not rise by 0.25 has no jump (grok_* -1); one that
    rises from its first evaluation on is read as before."""
    G = experiment_script("grokking")
    s = np.arange(0, 2000, 50)
    train = np.minimum(1.0, np.linspace(0.2, 1.6, s.size))  # memorised (>= 0.99) from step 1150 on
    mem = int(s[np.argmax(train >= 0.99)])
    for flat in (0.0, 0.3, 0.02 + 0.2 * s / s[-1]):  # flat, flat, a rise of 0.2 < 0.25
        te = np.broadcast_to(flat, s.shape).astype(float)
        gt = G.ground_truth({"step": s, "train_accuracy": train, "test_accuracy": te})
        assert gt["memorised"] == mem and not gt["grokked"], gt
        assert (gt["grok_start"], gt["grok_mid"], gt["grok_end"]) == (-1, -1, -1), gt
    # a steady rise of 0.9 ending long after memorisation (a linear series is its own running median): the end at
    # the first value >= 0.9 x the maximum, the start at the last value 0.25 below it
    te = np.clip(0.05 + 0.9 * s / 1800, 0, 0.95)
    gt = G.ground_truth({"step": s, "train_accuracy": train, "test_accuracy": te})
    ie = int(np.argmax((te >= 0.9 * te.max()) & (s >= mem)))
    i0 = int(np.nonzero(te[:ie] <= te[ie] - 0.25 + 1e-12)[0][-1])
    assert (gt["grok_start"], gt["grok_end"]) == (int(s[i0]), int(s[ie])) and not gt["grokked"], gt


def test_grokking_ground_truth_has_no_jump_after_memorisation_where_it_generalised_first():
    """A test accuracy that rises over steps 0-500 while the training set is memorised only at step 1000 was given
    a jump ending at the memorisation step (grok_end 1000, the first evaluation after memorisation, against 450
    where it first came within 0.9 x its maximum): the rise ended before memorisation, so there is no jump after
    it.  The same rise ending after memorisation (memorised at step 200) is still read as before."""
    G = experiment_script("grokking")
    s = np.arange(0, 2000, 50)
    te = np.clip(0.05 + 0.9 * s / 500, 0, 0.95)
    gt = G.ground_truth({"step": s, "train_accuracy": np.where(s >= 1000, 1.0, 0.5), "test_accuracy": te})
    assert gt["memorised"] == 1000 and (gt["grok_start"], gt["grok_mid"], gt["grok_end"]) == (-1, -1, -1), gt
    gt = G.ground_truth({"step": s, "train_accuracy": np.where(s >= 200, 1.0, 0.5), "test_accuracy": te})
    ie = int(np.argmax(te >= 0.9 * te.max()))
    assert gt["memorised"] == 200 and gt["grok_end"] == int(s[ie]) and not gt["grokked"], gt


def test_hj_slices_trains_at_experiment_1s_learning_rate(monkeypatch):
    """Experiment 5 trains experiment 1's MLP at experiment 1's lr = eta_lambda0 / lambda_step(theta_0), but computed
    lambda_step(theta_0) by another path (an unjitted sharpness_horizontal): it differed in the last float32 digits
    (lambda0 10.2029705 against 10.2029686 at the CPU default run as a script; under the tests' compiler options
    seed 1 of an 8-4-1 MLP gave lr 0.24812274 against 0.24812270), so its GD checkpoints were not experiment 1's.
    Both scripts now take the lr of one function, experiment 1's ``learning_rate``: here a stand-in whose value
    no Lanczos run gives, and the lr each script trains at must be it (the scripts' models, Hessians and slices
    are stubbed: only where the lr comes from is checked)."""
    import _common as C

    E1 = experiment_script("edge_of_stability")
    E5 = experiment_script("hj_slices")
    monkeypatch.setattr(E5, "exp1", E1)
    model = '["hidden=[4]", "num_examples=16", "lanczos=5"]'
    cfg = C.load_config("hj_slices", ["scale=test", "checkpoints=[0]", "seed=1", f"model={model}"])
    ecfg = E5.model_config(cfg)
    made = E1.setup(ecfg)
    monkeypatch.setattr(E1, "setup", lambda c: made)
    given = []

    def learning_rate(c, loss, params, group, batch):
        assert params is made[1] and group is made[3] and batch is made[4]
        given.append(c.eta_lambda0 / 12.345)
        return given[-1], 12.345

    monkeypatch.setattr(E1, "learning_rate", learning_rate, raising=False)

    class Stop(Exception):
        pass

    def record(*a, lr, **k):
        raise Stop(lr)

    monkeypatch.setattr(C, "record", record)
    fake = collections.namedtuple("Extremes", "bottom bottom_vectors")(np.asarray([-1.0], np.float32), None)
    monkeypatch.setattr(E5, "obs", types.SimpleNamespace(sharpness_quotient=lambda *a, **k: fake,
                                                         sharpness_horizontal=E5.obs.sharpness_horizontal))
    monkeypatch.setattr(E5, "_one_slice", lambda *a, **k: {})
    out = E5.run(cfg)
    assert given and out["lr"] == given[-1] == ecfg.eta_lambda0 / 12.345, (out["lr"], given)

    with pytest.raises(Stop) as info:
        E1.run(ecfg)
    assert len(given) == 2 and info.value.args[0] == given[-1], (info.value.args, given)


def test_grokking_placement_matches_no_memorisation_in_a_run_that_never_memorised():
    """Experiment 3's placement read ``memorised = -1`` (a run that never reached 0.99 training accuracy) as a
    step: a transition event within ``window`` steps of step -1 was tabulated as matching memorisation."""
    from quotient_sgd.diagnostics import Event

    G = experiment_script("grokking")
    ev = [Event(step=st, kind="transition", strength=1.0, variant="quotient",
                details={"onset_step": 0, "observable": "loss", "direction": "decreasing"}) for st in (10, 400)]
    gt = {"memorised": -1, "grokked": False, "grok_start": -1, "grok_mid": -1, "grok_end": -1}
    assert [r["matches"] for r in G.placement(ev, gt, window=50)] == ["unmatched", "unmatched"]
    # memorised at step 0: the event at 10 matches it, the one at 400 does not
    assert [r["matches"] for r in G.placement(ev, dict(gt, memorised=0), window=50)] == ["memorisation", "unmatched"]
