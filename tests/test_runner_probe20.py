"""Configs, data, runs and sweeps on cases the other tests do not try: an interrupt while a run or sweep closes its
TensorBoard writers and progress bar (the checkpoint being written was abandoned), and two config files in one
process each importing a module of the same name beside it (the second got the first's)."""

import os
import signal
import sys

import jax
import pytest
from helpers import tiny_settings

from quotient_sgd.config import load_config
from quotient_sgd.runner import run, sweep
from quotient_sgd.runner._rundir import Checkpoints, checkpoint_steps


# ---- defect 1: an interrupt while the writers close abandoned the checkpoint being written -----------------------
@pytest.mark.parametrize("command", ["run", "sweep"])
def test_an_interrupt_while_the_writers_close_still_finishes_the_checkpoint(tmp_path, monkeypatch, command):
    """The last chunk's checkpoint is written asynchronously and finalised by ``Checkpoints.close`` in the run's
    (and sweep's) ``finally``, after the progress bar and the TensorBoard writers close.  A Ctrl-C (or SIGTERM)
    landing while those closed raised there, and the checkpoint manager was never closed: the save in flight was
    abandoned (``checkpoints/20.orbax-checkpoint-tmp`` left behind, the command resuming from step 10 instead of 20)
    and, at the interpreter's exit, orbax's background thread ended in "RuntimeError: cannot schedule new futures
    after interpreter shutdown" tracebacks.  The interrupt is now held back until every writer, the checkpoint
    manager included, is closed; then it is raised."""
    from tensorboardX import SummaryWriter

    closed = []
    close_writer, close_checkpoints = SummaryWriter.close, Checkpoints.close

    def interrupted_close(self):
        os.kill(os.getpid(), signal.SIGINT)  # (Python's handler: KeyboardInterrupt at the next instruction)
        close_writer(self)

    def recorded_close(self):
        close_checkpoints(self)
        closed.append(self.dir)

    monkeypatch.setattr(SummaryWriter, "close", interrupted_close)
    monkeypatch.setattr(Checkpoints, "close", recorded_close)
    wd = str(tmp_path / "w")
    s = tiny_settings(20, **{"logging.tensorboard": True, "sweep.seed": (0,), "sweep.lr": (0.02, 0.05)})
    with pytest.raises(KeyboardInterrupt):
        if command == "run":
            run(s, wd)
        else:
            sweep(s, wd, members_per_device=1, devices=jax.devices()[:1])
    assert closed == [os.path.join(wd, "checkpoints")]
    assert checkpoint_steps(wd) == [10, 20]
    assert not [x for x in os.listdir(os.path.join(wd, "checkpoints")) if "tmp" in x]


# ---- defect 2: a module beside a config file was the one beside the config file loaded before ------------------
def test_each_config_file_imports_the_modules_beside_it(tmp_path, monkeypatch):
    """``load_config("A/exp.py")`` then ``load_config("B/exp.py")``, each doing ``from probe20_common import base``
    of its own ``probe20_common.py`` (and ``import probe20_pkg``, a package beside it): B's config was A's (name
    "from_A"), silently: the module cached by the first load, and A's directory first on ``sys.path``.  Each load
    now reads the modules beside its own file, also when A is loaded again."""
    from quotient_sgd.config import _validate

    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(_validate, "_CONFIG_DIRS", [])
    monkeypatch.setattr(_validate, "_APPENDED_DIRS", [])
    monkeypatch.setattr(_validate, "_BESIDE_CONFIGS", {})
    for name in ("probe20_common", "probe20_pkg"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    for d in ("A", "B"):
        (tmp_path / d / "probe20_pkg").mkdir(parents=True)
        (tmp_path / d / "probe20_pkg" / "__init__.py").write_text(f"SUFFIX = '_pkg{d}'\n")
        (tmp_path / d / "probe20_common.py").write_text(
            "from quotient_sgd.config import default_config\n"
            f"def base():\n    c = default_config()\n    c.name = 'from_{d}'\n    return c\n")
        (tmp_path / d / "exp.py").write_text(
            "import probe20_pkg\nfrom probe20_common import base\n"
            "def get_config():\n    c = base()\n    c.name += probe20_pkg.SUFFIX\n    return c\n")
    try:
        names = [load_config(str(tmp_path / d / "exp.py")).name for d in ("A", "B", "A")]
    finally:
        for name in ("probe20_common", "probe20_pkg"):
            sys.modules.pop(name, None)
    assert names == ["from_A_pkgA", "from_B_pkgB", "from_A_pkgA"]


def test_a_config_directory_is_never_moved_before_the_installed_packages(tmp_path, monkeypatch):
    """Loading a config file moved its directory first among the directories of the config files loaded before,
    wherever they were on ``sys.path``: after a config file in a directory at the front of ``sys.path`` (a script's
    own), the next config file's directory went to the front too, before the installed packages and the standard
    library, where a module beside it (``json.py``) shadowed them.  Only the directories appended for config files
    are reordered; one that was on ``sys.path`` already keeps its place."""
    from quotient_sgd.config import _validate

    front, other = tmp_path / "front", tmp_path / "other"
    for d in (front, other):
        d.mkdir()
        (d / "exp.py").write_text("from quotient_sgd.config import default_config\n"
                                  "def get_config():\n    return default_config()\n")
    monkeypatch.setattr(sys, "path", [str(front)] + list(sys.path))
    monkeypatch.setattr(_validate, "_CONFIG_DIRS", [])
    monkeypatch.setattr(_validate, "_APPENDED_DIRS", [], raising=False)
    monkeypatch.setattr(_validate, "_BESIDE_CONFIGS", {})
    installed = [i for i, e in enumerate(sys.path) if e.endswith("site-packages")]
    load_config(str(front / "exp.py"))
    load_config(str(other / "exp.py"))
    assert sys.path[0] == str(front) and sys.path.count(str(other)) == 1
    assert sys.path.index(str(other)) > max(installed + [1])
