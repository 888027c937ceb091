"""Marks for the export tests: ``slow`` (builds a clean venv; deselect with ``-m "not slow"``)."""


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long test (e.g. builds a clean virtualenv); -m 'not slow' skips it")
