"""pytest-xdist scheduling that survives a crashed worker: rerun the crashed test once, never hang.

The suite runs with ``--dist loadgroup`` (tests marked ``xdist_group("multiprocess")`` must share one worker and
run one at a time).  pytest-xdist's group scheduler handles a worker that dies mid-test (a segfault) badly:

* it puts the dead worker's unfinished work, the crashed test included, back in the queue, reports the crashed
  test as failed, and then runs it again on the replacement worker, so one test is reported twice;
* it hands the replacement worker a single work unit; when that unit is one test, the worker waits for a second
  test before it runs the first (an xdist worker needs to know the next test, or that there is none, to tear down
  fixtures), the controller waits for a result, and the run hangs until CI's time limit.

A crash should cost one test, not the run: XLA:CPU's compiler segfaulted in workers that had run out of memory
mappings (see ``_free_compiled_programs`` in conftest.py, which now prevents it), and a library can always crash.
``CrashSafeLoadGroup`` keeps the group scheduling and fixes both faults: a worker is always given at least two tests
or told there are no more, and a test whose worker crashed is run once more on a fresh worker.  The first crash is
reported as ``rerun`` (listed at the end of the run, not a failure); a test that crashes its worker twice fails, and
is not run a third time.  An ordinary failure is never rerun.  It also copes with two workers crashing at once (no
work is sent to a dead worker, none to a replacement still collecting its tests).
"""

import collections

import pytest

try:
    from xdist.scheduler import LoadGroupScheduling
except ImportError:  # pytest-xdist not installed: the suite runs in one process and nothing here is used
    LoadGroupScheduling = None

#: How many times a test whose worker crashed is run again before its crash counts as a failure.
CRASH_RERUNS = 1

if LoadGroupScheduling is not None:

    class CrashSafeLoadGroup(LoadGroupScheduling):
        """``--dist loadgroup`` that reruns a test once after its worker crashes and never leaves a worker idle."""

        def __init__(self, config, log=None):
            super().__init__(config, log)
            self.crashes = collections.Counter()

        def remove_node(self, node):
            workload = self.assigned_work.pop(node)
            pending = [nodeid for unit in workload.values() for nodeid, done in unit.items() if not done]
            if not pending:
                return None
            # a worker runs its tests in the order they were sent: the first unfinished one is the one it died in
            crashitem = pending[0]
            self.crashes[crashitem] += 1
            if self.crashes[crashitem] > CRASH_RERUNS:
                for unit in workload.values():
                    if crashitem in unit:
                        unit[crashitem] = True
            for scope, unit in workload.items():
                if not all(unit.values()):
                    self.workqueue[scope] = unit
            for other in self.assigned_work:
                self._reschedule(other)
            return crashitem

        def _reschedule(self, node):
            try:
                self._feed(node)
            except OSError:
                # the worker has died too (two crashes at once) and its channel is closed: its own crash report comes
                # next, and remove_node puts back what it had, including what was just sent
                pass

        def _feed(self, node):
            if node.shutting_down or node not in self.registered_collections:
                # a replacement worker still collecting is fed by schedule() once its collection arrives
                return
            if self.workqueue and self._pending_of(self.assigned_work[node]) > 2:
                return
            # a worker holds back its last test until it hears of the next one or of the end: never leave it with one
            while self.workqueue:
                self._assign_work_unit(node)
                if self._pending_of(self.assigned_work[node]) >= 2:
                    return
            node.shutdown()

else:  # pragma: no cover
    CrashSafeLoadGroup = None


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    """``CrashSafeLoadGroup`` in place of pytest-xdist's own scheduler for ``--dist loadgroup``."""
    if CrashSafeLoadGroup is not None and config.getvalue("dist") == "loadgroup":
        return CrashSafeLoadGroup(config, log)
    return None


@pytest.hookimpl(optionalhook=True)
def pytest_handlecrashitem(crashitem, report, sched):
    """The first crash of a test's worker is a ``rerun`` (the scheduler runs the test again), the next a failure."""
    if CrashSafeLoadGroup is not None and isinstance(sched, CrashSafeLoadGroup):
        if sched.crashes[crashitem] <= CRASH_RERUNS:
            report.outcome = "rerun"
            report.longrepr = f"{report.longrepr}; run again on a new worker"


def pytest_report_teststatus(report, config):
    """A crashed-and-rerun test shows as ``R`` / ``RERUN`` and is counted as ``rerun``, not as a failure."""
    if report.outcome == "rerun":
        return "rerun", "R", "RERUN"
    return None


def pytest_terminal_summary(terminalreporter):
    """List the tests whose worker crashed and that were run again."""
    reruns = terminalreporter.stats.get("rerun", [])
    if reruns:
        terminalreporter.write_sep("=", "worker crashes, each test run again once on a new worker")
        for report in reruns:
            terminalreporter.write_line(f"RERUN {report.nodeid}: {report.longrepr}")
