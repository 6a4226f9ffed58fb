"""The fast loop: the unit tests alone, in a few seconds, from anywhere.

    python3 tests/unit.py          # unittest's options too: -v, -f, -k PATTERN

A unit test is a test class derived from ``support.UnitTestCase``: code in
this process alone, no server, no Redis, no network. This finds every one of
them in the tests' modules; a module that cannot be imported fails here as
in the full suite. (The file's name does not match ``test*.py``: the full
suite, ``python3 -m unittest discover -s tests``, does not run it, and runs
every unit test once.)
"""

import os
import unittest

import support

HERE = os.path.dirname(os.path.abspath(__file__))


def unit_tests(suite):
    """The unit tests of ``suite``, and what the loader made of the modules
    it could not load."""
    for test in suite:
        if isinstance(test, unittest.TestSuite):
            yield from unit_tests(test)
        elif isinstance(test, support.UnitTestCase) or type(test).__module__ == "unittest.loader":
            yield test


def load_tests(loader, tests, pattern):
    return unittest.TestSuite(unit_tests(loader.discover(HERE, top_level_dir=HERE)))


if __name__ == "__main__":
    unittest.main()
