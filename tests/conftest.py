import os
import sys

from hypothesis import settings

sys.path.insert(0, os.path.dirname(__file__))

# CI runs the same examples every time (a red CI must be reproducible); locally hypothesis explores.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


def pytest_terminal_summary(terminalreporter):
    """Print the onnx conformance pass rate when tests/test_onnx_conformance.py ran."""
    outcomes = {}
    for outcome in ("passed", "failed", "xfailed", "error", "skipped"):
        for report in terminalreporter.stats.get(outcome, []):
            nodeid = getattr(report, "nodeid", "")
            if "test_onnx_conformance.py::OnnxBackend" in nodeid:
                outcomes.setdefault(nodeid, outcome if outcome != "error" else "failed")
    if not outcomes:
        return
    total = len(outcomes)
    passed = sum(1 for o in outcomes.values() if o == "passed")
    excluded = sum(1 for o in outcomes.values() if o == "xfailed")
    counted = total - excluded
    rest = ""
    if counted:
        rest = f" ({passed}/{counted} = {100.0 * passed / counted:.1f}% of the others)"
    terminalreporter.write_line(
        f"onnx conformance: {passed}/{total} selected tests pass ({100.0 * passed / total:.1f}%); "
        f"{excluded} excluded{rest}")
