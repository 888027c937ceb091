"""The ``cluster`` mark: tests that install and start real daemons (SLURM, sshd/pdsh, Open MPI).

They run only when asked for (``pytest -m cluster tests/launch``; ``.ci/run`` does, after the
default suite) and are skipped, with that reason, in a plain ``pytest tests``.
"""

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "cluster: starts real SLURM/sshd/MPI daemons (run with -m cluster; .ci/run)")


def pytest_collection_modifyitems(config, items):
    if "cluster" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="cluster test (real daemons, minutes): run `pytest -m cluster tests/launch`, as .ci/run does")
    for item in items:
        if "cluster" in item.keywords:
            item.add_marker(skip)
