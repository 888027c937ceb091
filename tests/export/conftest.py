"""The ``slow`` mark: export tests that take minutes (building a clean virtualenv).

They run only when asked for (``pytest -m slow tests/export``) and are skipped, with that
reason, in a plain ``pytest tests``.
"""

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes minutes (builds a clean virtualenv); run with -m slow")


def pytest_collection_modifyitems(config, items):
    if "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow test (builds a clean venv, minutes): run `pytest -m slow tests/export`")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
