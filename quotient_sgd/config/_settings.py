"""Typed run settings: frozen dataclasses, one per config section (the validated form of a ConfigDict)."""

from __future__ import annotations

import dataclasses
from typing import Any

MODELS = ("mlp", "cnn", "transformer", "meanfield", "deep_linear")
DATASETS = ("teacher_student", "modular_arithmetic", "sparse_parity", "digits")
OPTIMIZERS = ("sgd", "adam", "adamw")
SYMMETRY_MODES = ("observe", "horizontal", "gauge_fix")
CURVATURE_BATCHES = ("next", "same")   # observables.curvature_batch (quotient_trajectory's curvature_batch)
SWEEP_MODES = ("product", "zip")
#: The axes a sweep may vary (``sweep.<axis>`` lists) and the setting each one replaces.
SWEEP_AXES = {
    "seed": "seed",
    "lr": "optim.lr",
    "batch_size": "data.batch_size",
    "weight_decay": "optim.weight_decay",
    "momentum": "optim.momentum",
    "init_gauge": "init_gauge",
}


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """``name`` picks the model; the other fields are read by the models that have them."""

    name: str = "mlp"
    hidden: tuple = (32,)          # mlp hidden widths; deep_linear inner widths
    activation: str = "relu"       # mlp, cnn, transformer, meanfield
    channels: tuple = (8, 16)      # cnn
    kernel_size: int = 3           # cnn
    norm: str = "none"             # cnn: "none" | "layer" | "batch"
    d_model: int = 32              # transformer
    num_heads: int = 2             # transformer
    num_layers: int = 1            # transformer
    mlp_ratio: int = 4             # transformer
    width: int = 64                # meanfield


@dataclasses.dataclass(frozen=True)
class DataSettings:
    name: str = "digits"
    seed: int = 0                  # data seed (fixed across a sweep over ``seed``)
    batch_size: int = 64           # 0: full batch
    n_train: int = 512             # teacher_student, sparse_parity
    n_test: int = 256              # teacher_student, sparse_parity
    din: int = 8                   # teacher_student
    dout: int = 1                  # teacher_student
    teacher_hidden: int = 16       # teacher_student
    noise: float = 0.0             # teacher_student
    p: int = 23                    # modular_arithmetic
    train_fraction: float = 0.5    # modular_arithmetic
    n_bits: int = 20               # sparse_parity
    k: int = 3                     # sparse_parity
    test_fraction: float = 0.25    # digits


@dataclasses.dataclass(frozen=True)
class OptimSettings:
    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.0          # sgd (heavy ball)
    nesterov: bool = False         # sgd
    weight_decay: float = 0.0      # sgd: coupled (added to the gradient); adamw: decoupled
    b1: float = 0.9                # adam, adamw
    b2: float = 0.999              # adam, adamw
    eps: float = 1e-8              # adam, adamw
    clip_norm: float = 0.0         # global-norm clipping, 0: off


@dataclasses.dataclass(frozen=True)
class SymmetrySettings:
    enabled: bool = True
    components: tuple = ("all",)   # "all", kinds ("rescale", "permutation", ...) or full component names
    mode: str = "observe"          # observe | horizontal (project updates) | gauge_fix (canonical section)
    gauge_fix_every: int = 1


@dataclasses.dataclass(frozen=True)
class ObservableSettings:
    names: tuple = ()              # () = quotient_sgd.optim.DEFAULT_OBSERVABLES
    every: int = 1
    hessian_every: int = 0         # 0: off
    hessian_k: int = 1
    lanczos_steps: int = 20
    noise_every: int = 0           # gradient-noise temperature; needs per_example_grads
    per_example_grads: bool = False
    curvature_batch: str = "next"  # batch of g_(k+1) in curvature / shock_number / fold_number: "next" (the next
    #                                step's) | "same" (the step's own: one extra gradient per recorded step, no noise)


@dataclasses.dataclass(frozen=True)
class LoggingSettings:
    every: int = 10                # a metrics.jsonl row every this many steps (and the last step of each chunk)
    tensorboard: bool = False
    progress: bool = True
    plots: bool = True


@dataclasses.dataclass(frozen=True)
class CheckpointSettings:
    every: int = 100               # steps per scan chunk; a checkpoint after every chunk
    keep: int = 2
    enabled: bool = True


@dataclasses.dataclass(frozen=True)
class SweepSettings:
    mode: str = "product"          # product | zip
    seed: tuple = ()
    lr: tuple = ()
    batch_size: tuple = ()
    weight_decay: tuple = ()
    momentum: tuple = ()
    init_gauge: tuple = ()
    members_per_device: int = 0    # 0: chosen from the measured cost of the model

    def axes(self) -> dict[str, tuple]:
        return {a: tuple(getattr(self, a)) for a in SWEEP_AXES if len(getattr(self, a))}


@dataclasses.dataclass(frozen=True)
class Settings:
    """A validated run configuration (:func:`~quotient_sgd.config.validate`)."""

    name: str = "run"
    steps: int = 1000
    seed: int = 0
    init_gauge: float = 0.0        # scale of a random element of the continuous symmetries applied at init
    model: ModelSettings = ModelSettings()
    data: DataSettings = DataSettings()
    optim: OptimSettings = OptimSettings()
    symmetry: SymmetrySettings = SymmetrySettings()
    observables: ObservableSettings = ObservableSettings()
    logging: LoggingSettings = LoggingSettings()
    checkpoint: CheckpointSettings = CheckpointSettings()
    sweep: SweepSettings = SweepSettings()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready nested dict (tuples become lists); the ``config.json`` of a run."""
        def conv(x):
            if isinstance(x, dict):
                return {k: conv(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return [conv(v) for v in x]
            return x

        return conv(dataclasses.asdict(self))

    def replace(self, **dotted) -> "Settings":
        """A copy with ``"optim.lr"``-style keys replaced (no re-validation).  A key that is not one of the
        schema's values (``"optim.lr.x"``, which set ``optim.lr``; a whole section such as ``optim``, which was
        replaced by the value; ``"optim.lrr"``; ``"steps.x"``) raises a ``KeyError`` naming it and what is
        allowed."""
        top = {f.name for f in dataclasses.fields(self)}
        for key in dotted:
            parts = key.split(".")
            sect = SECTIONS.get(parts[0])
            fields = {f.name for f in dataclasses.fields(sect)} if sect is not None else set()
            ok = (len(parts) == 1 and parts[0] in top and sect is None) or (len(parts) == 2 and parts[1] in fields)
            if not ok:
                where = (f"keys of the section {parts[0]!r}: {sorted(fields)}" if sect is not None else
                         f"top-level keys {sorted(top - set(SECTIONS))} or section.key with a section of "
                         f"{sorted(SECTIONS)}")
                raise KeyError(f"Settings.replace: {key!r} is not a value of the schema; allowed: {where}")
        out = self
        for key, value in dotted.items():
            parts = key.split(".")
            if len(parts) == 1:
                out = dataclasses.replace(out, **{key: value})
            else:
                sect = getattr(out, parts[0])
                out = dataclasses.replace(out, **{parts[0]: dataclasses.replace(sect, **{parts[1]: value})})
        return out


SECTIONS = {
    "model": ModelSettings, "data": DataSettings, "optim": OptimSettings, "symmetry": SymmetrySettings,
    "observables": ObservableSettings, "logging": LoggingSettings, "checkpoint": CheckpointSettings,
    "sweep": SweepSettings,
}


def default_config():
    """An ``ml_collections.ConfigDict`` with every key of the schema at its default: start ``get_config()``
    from it and change what the experiment needs.  A bool assigned to a numeric key (``config.optim.lr = True``) is
    refused with a ``TypeError`` (``ml_collections`` alone would store it as ``1.0``)."""
    from ._configdict import strict_config_dict

    return strict_config_dict(dataclasses.asdict(Settings()))
