"""Importing ww_monitor must not configure logging or warnings, print, or import Lightning."""

import subprocess
import sys
import textwrap


def test_import_changes_no_global_state():
    code = textwrap.dedent(
        """
        import logging, sys, warnings
        def state():
            root = logging.getLogger()
            loggers = {n: (l.level, len(l.handlers), l.propagate) for n, l in logging.root.manager.loggerDict.items()
                       if isinstance(l, logging.Logger)}
            return (root.level, list(root.handlers), list(warnings.filters), logging.lastResort, loggers)
        # Dependencies install their own filters on import (torch, numpy); that is theirs, not ours.
        import numpy, torch, scipy.special
        before = state()
        import ww_monitor, ww_monitor.functional, ww_monitor.outputs.cli
        after = state()
        assert before[:4] == after[:4], (before[:4], after[:4])
        for name, cfg in after[4].items():
            if name.startswith("ww_monitor"):
                assert cfg == (logging.NOTSET, 0, True), (name, cfg)
        assert "lightning" not in sys.modules and "pytorch_lightning" not in sys.modules
        assert "matplotlib.pyplot" not in sys.modules
        print("OK")
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "OK\n" and res.stderr == ""
