"""Entry point of the Bazel `py_test` targets: runs pytest on one test file.

Usage: bazel_pytest_main.py TEST_FILE [pytest args...]. A relative TEST_FILE
is taken from the current directory (Bazel's runfiles root) or, failing that,
from the repository root above this file.
"""

import pathlib
import sys

import pytest


def main(argv):
    if len(argv) < 2:
        print("usage: bazel_pytest_main.py TEST_FILE [pytest args...]",
              file=sys.stderr)
        return 2
    path = pathlib.Path(argv[1])
    if not path.exists():
        path = pathlib.Path(__file__).resolve().parents[1] / argv[1]
    return int(pytest.main([str(path), "-q", *argv[2:]]))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
