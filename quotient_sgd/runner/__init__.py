"""Config-driven runs: config -> model, data, optimiser, scan loop in chunks, run directory, resume, sweeps.

- :func:`run`: one run into a run directory (``config.json``, ``trajectory.npz``, ``metrics.jsonl``,
  ``events.json``, ``checkpoints/``, ``plots/*.png``, ``summary.md``), resumable after SIGKILL;
- :func:`sweep`: the config's sweep as one vmapped program sharded over every device (and host);
- :func:`report`: regenerate plots and ``summary.md`` of a run or sweep directory;
- :func:`load_trajectory`: a run directory's trajectory (``trajectory.npz``, or the parts of an unfinished run);
- :func:`build`: the pieces of a run (model structure, group, data, loss, optimiser) for research code.
"""

from ._build import Built as Built
from ._build import build as build
from ._build import init_params as init_params
from ._build import make_dataset as make_dataset
from ._build import make_model as make_model
from ._build import make_optimizer as make_optimizer
from ._report import report as report
from ._run import RunResult as RunResult
from ._run import run as run
from ._rundir import RunDirError as RunDirError
from ._rundir import load_trajectory as load_trajectory
from ._sweep import sweep as sweep
from ._sweep import sweep_members as sweep_members

__all__ = [
    "Built", "RunDirError", "RunResult", "build", "init_params", "load_trajectory", "make_dataset", "make_model",
    "make_optimizer", "report", "run", "sweep", "sweep_members",
]
