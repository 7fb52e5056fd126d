"""A seconds-long smoke run: a 8-16-1 ReLU MLP on teacher-student regression (used by the tests)."""

from quotient_sgd.config import default_config


def get_config():
    config = default_config()
    config.name = "tiny"
    config.steps = 200
    config.model.name = "mlp"
    config.model.hidden = (16,)
    config.data.name = "teacher_student"
    config.data.n_train = 128
    config.data.n_test = 64
    config.data.batch_size = 16
    config.optim.lr = 0.05
    config.optim.momentum = 0.9
    config.observables.names = ("loss", "grad_norm", "grad_norm_canonical", "charges", "charge_drift",
                                "curvature", "shock_number", "fold_number")
    config.logging.every = 5
    config.logging.progress = False
    config.checkpoint.every = 10
    config.sweep.lr = (0.02, 0.05)
    config.sweep.seed = (0, 1, 2, 3)
    return config
