"""BUILD's TESTS list names exactly the tests/test_*.py files.

Bazel runs only the py_test targets BUILD declares, so a test file missing
from TESTS would go untested under `bazel test //...` without any error.
BUILD is Starlark; the subset it uses is also Python syntax, so `ast` reads it.

Under Bazel this file runs from the runfiles tree, where BUILD and the test
files are declared inputs of this target (EXTRA_DATA in BUILD).
"""

import ast
import pathlib

# Not resolve(): under Bazel that would leave the runfiles for the checkout.
ROOT = pathlib.Path(__file__).absolute().parents[1]


def _build_tests():
    """The string list assigned to `TESTS` at BUILD's top level."""
    tree = ast.parse((ROOT / "BUILD").read_text(), filename="BUILD")
    for node in tree.body:
        if (isinstance(node, ast.Assign)
                and [getattr(t, "id", None) for t in node.targets] == ["TESTS"]):
            return ast.literal_eval(node.value)
    raise AssertionError("BUILD has no top-level `TESTS = [...]`")


def test_tests_list_matches_test_files():
    listed = _build_tests()
    files = {p.stem for p in (ROOT / "tests").glob("test_*.py")}
    assert pathlib.Path(__file__).stem in files
    duplicates = sorted({name for name in listed if listed.count(name) > 1})
    assert not duplicates, f"listed twice in BUILD's TESTS: {duplicates}"
    missing = sorted(files - set(listed))
    assert not missing, f"tests/*.py files missing from BUILD's TESTS: {missing}"
    stale = sorted(set(listed) - files)
    assert not stale, f"BUILD's TESTS names files not in tests/: {stale}"
