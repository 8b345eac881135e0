"""onnx's backend test suite against target="cpu": the generated-code backend must pass what the
reference passes.

The selection and the accepted failures are test_onnx_conformance.py's (SELECTED, EXCLUDED); the
cases run through a backend whose ``prepare`` compiles with target="cpu". CPU_EXCLUDED would list
failures specific to the CPU target (none today). The pass count is printed at the end of the run.
"""

from __future__ import annotations

import re
import warnings

import pytest

import test_onnx_conformance as base
from cnncompile.onnx_backend import CnnCompileBackend

pytestmark = base.pytestmark

#: test name pattern -> why it is accepted to fail on target="cpu" only
CPU_EXCLUDED: dict[str, str] = {}


class CpuTargetBackend(CnnCompileBackend):
    """The onnx backend adapter, compiling every model for target="cpu"."""

    @classmethod
    def prepare(cls, model, device: str = "CPU", **kwargs):
        kwargs["target"] = "cpu"
        return super().prepare(model, device, **kwargs)


with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    globals().update(base.build_test_cases(base.SELECTED, CpuTargetBackend, __name__,
                                           {**base.EXCLUDED, **CPU_EXCLUDED}))


class _PassCount:
    """Prints this module's conformance pass count in pytest's terminal summary."""

    def pytest_terminal_summary(self, terminalreporter):
        outcomes = {}
        for outcome in ("passed", "failed", "xfailed", "error"):
            for report in terminalreporter.stats.get(outcome, []):
                nodeid = getattr(report, "nodeid", "")
                if "test_cpu_conformance.py::OnnxBackend" in nodeid:
                    outcomes.setdefault(nodeid, outcome)
        if outcomes:
            passed = sum(1 for o in outcomes.values() if o == "passed")
            excluded = sum(1 for o in outcomes.values() if o == "xfailed")
            terminalreporter.write_line(
                f"onnx conformance (target cpu): {passed}/{len(outcomes)} selected tests pass "
                f"({100.0 * passed / len(outcomes):.1f}%); {excluded} excluded")


@pytest.fixture(scope="session", autouse=True)
def _print_pass_count(request):
    manager = request.config.pluginmanager
    if not manager.has_plugin("cnncompile-cpu-conformance"):
        manager.register(_PassCount(), "cnncompile-cpu-conformance")


def test_cpu_exclusions_stay_under_five_percent():
    """Excluded cases are strict xfails and every other selected case must pass, so this bounds
    the CPU target's pass rate from below."""
    names = set().union(*base.SELECTED.values())
    patterns = {**base.EXCLUDED, **CPU_EXCLUDED}
    stale = [p for p in CPU_EXCLUDED if not any(re.search(p, n) for n in names)]
    assert not stale, f"CPU_EXCLUDED entries that match no selected test: {stale}"
    excluded = {n for n in names if any(re.search(p, n) for p in patterns)}
    rate = 1 - len(excluded) / len(names)
    print(f"onnx conformance (target cpu): {len(names)} selected, {len(excluded)} excluded -> "
          f"at least {rate:.1%} pass")
    assert len(names) > 600
    assert rate >= 0.95
