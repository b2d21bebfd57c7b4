"""The strict-skips mode CI runs under (tests/conftest.py): with LORA_YOLO_STRICT_SKIPS=1 a skip fails the run."""

from __future__ import annotations

import pytest
from conftest import ROOT, STRICT_SKIPS, StrictSkips

SKIPS_IN_TESTS = """
import pytest

@pytest.fixture
def data():
    pytest.skip("no data here")  # like the COCO8 fixture: a skip in setup

def test_needs_data(data):
    pass

def test_needs_an_extra():
    pytest.skip("no extra here")

def test_known_bug():
    pytest.xfail("an expected failure, not a skip")

def test_passes():
    pass
"""

SKIPS_WHILE_COLLECTING = """
import pytest

pytest.importorskip("lora_yolo_no_such_module", reason="an extra is not installed")  # like tests/test_peft.py

def test_never_runs():
    pass
"""


def run(pytester, monkeypatch, strict: bool, **files):
    if strict:
        monkeypatch.setenv(STRICT_SKIPS, "1")
    else:
        monkeypatch.delenv(STRICT_SKIPS, raising=False)
    pytester.makepyfile(**files, test_plain="def test_plain():\n    pass\n")
    return pytester.runpytest("-p", "no:cacheprovider", plugins=[StrictSkips()])


def test_without_the_variable_skips_are_skips(pytester, monkeypatch):
    result = run(pytester, monkeypatch, False, test_skips=SKIPS_IN_TESTS, test_collect=SKIPS_WHILE_COLLECTING)
    result.assert_outcomes(passed=2, skipped=3, xfailed=1)
    assert result.ret == pytest.ExitCode.OK


def test_strict_skip_in_a_test_or_its_setup_fails_with_the_reason(pytester, monkeypatch):
    result = run(pytester, monkeypatch, True, test_skips=SKIPS_IN_TESTS)
    result.assert_outcomes(passed=2, failed=1, errors=1, xfailed=1)  # a skip in setup is an error in setup
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    message = "LORA_YOLO_STRICT_SKIPS=1, so a skip is a failure: Skipped"
    result.stdout.fnmatch_lines(
        [
            "*ERROR at setup of test_needs_data*",
            f"{message}: no data here",
            "*test_needs_an_extra*",
            f"{message}: no extra*",
        ]
    )
    result.stdout.fnmatch_lines(
        ["FAILED test_skips.py::test_needs_an_extra - *", "ERROR test_skips.py::test_needs_data - *"]
    )


def test_strict_skip_while_collecting_fails_the_run_with_the_reason(pytester, monkeypatch):
    result = run(pytester, monkeypatch, True, test_collect=SKIPS_WHILE_COLLECTING)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        ["*skipped while collecting, a failure under LORA_YOLO_STRICT_SKIPS=1*", "test_collect.py: *an extra is not*"]
    )


def test_strict_skips_hold_when_the_suite_runs_on_xdist_workers(pytester, monkeypatch):
    """README's test command runs the suite on pytest-xdist workers: a skip in a worker's test, its setup or its
    collection must still fail the run the controller reports."""
    monkeypatch.setenv(STRICT_SKIPS, "1")
    pytester.makeconftest(
        f"""
        import importlib.util

        spec = importlib.util.spec_from_file_location("lora_yolo_tests", {str(ROOT / "tests" / "conftest.py")!r})
        tests = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tests)

        def pytest_configure(config):
            config.pluginmanager.register(tests.StrictSkips(), "lora-yolo-strict-skips")
        """
    )
    pytester.makepyfile(
        test_skips=SKIPS_IN_TESTS, test_collect=SKIPS_WHILE_COLLECTING, test_plain="def test_plain():\n    pass\n"
    )
    result = pytester.runpytest_subprocess("-n", "2", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=1, errors=1, skipped=1, xfailed=1)  # the skip: the collected module
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*skipped while collecting, a failure under LORA_YOLO_STRICT_SKIPS=1*"])


def test_ci_runs_in_strict_mode():
    """CI (`bash .ci/run`) must export the variable before README's test command, or a skipped training test would
    pass unnoticed."""
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    strict = next(i for i, line in enumerate(lines) if line.strip() == f"export {STRICT_SKIPS}=1")
    runs = next(i for i, line in enumerate(lines) if 'bash -euo pipefail -c "$cmd"' in line)
    assert strict < runs
