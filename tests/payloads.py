"""A hostile pickle for the tests that prove no file we read runs code."""


class CreatesFile:
    """Unpickling this calls open(path, 'w'): what a hostile checkpoint, weights file or cache
    file could do. The tests check that ``path`` does not exist afterwards."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))
