"""What the layer selection left out, told once per run: :class:`SelectionReport`.

A base of :class:`~ww_monitor.core.engine.MonitorEngine`. Size limits are configuration and
only logged; anything else (an unsupported dtype, ...) is a warning; a selection that matches
nothing, or only layers that are all skipped, is a warning that lists the reasons or the layer
names there are. ``fast_dev_run`` checks the selection without taking snapshots.
"""

from __future__ import annotations

import logging

from ..analysis.layers import available_layer_names, is_size_limit
from ..monitoring.distributed import collect_into
from .engine_state import EngineState
from .hooks import MAX_LISTED, rank_zero_warn

__all__ = ["SelectionReport"]

log = logging.getLogger(__name__)


class SelectionReport(EngineState):
    """Reports the selection once per run (the engine supplies ``config`` and ``warning_prefix``)."""

    def _check_selection_only(self, module) -> None:
        """``fast_dev_run``: a smoke test of the training code, so no snapshots are taken (the
        analysis would cost more than the run); the layer selection is still checked and its
        problems reported, which is what a smoke test is for."""
        log.info("%s: fast_dev_run: no snapshots are taken; checking the layer selection only", self.warning_prefix)
        if self._reported_selection:
            return
        try:
            owners, skipped = collect_into(None, module, self.config)
        except Exception as err:  # sharded parameters: their shapes are unknown until gathered
            log.debug("fast_dev_run selection check not possible: %s", err)
            return
        self._report_selection(module, owners, skipped)

    def _selection_message(self, module, selection_skipped) -> str:
        """Why nothing is analysed: every matching layer was skipped (reasons), or the selection
        matches no layer (the names there are)."""
        if selection_skipped:
            reasons = "; ".join(f"{s.name}: {s.reason}" for s in selection_skipped[:MAX_LISTED])
            more = f" (and {len(selection_skipped) - MAX_LISTED} more)" if len(selection_skipped) > MAX_LISTED else ""
            return (
                f"{self.warning_prefix}: no layer can be analysed: every selected layer was skipped: "
                f"{reasons}{more}. Nothing will be analysed; adjust min_evals/max_evals/max_n or the selection."
            )
        names = available_layer_names(module, self.config.conv_mode)
        shown = ", ".join(names[:MAX_LISTED]) + (f" ... ({len(names)} in all)" if len(names) > MAX_LISTED else "")
        return (
            f"{self.warning_prefix}: no weight matrix matches the selection (include={list(self.config.include)}, "
            f"exclude={list(self.config.exclude)}, kinds={self.config.kinds}); nothing will be analysed. "
            f"Layers in the model: {shown or 'none with a weight matrix'}."
        )

    def _report_selection(self, module, owners, selection_skipped) -> None:
        """Once per run: what the selection left out, like ``analyze()`` reports it."""
        self._reported_selection = True
        if not owners:
            rank_zero_warn(self._selection_message(module, selection_skipped), RuntimeWarning)
            return
        unexpected = [s for s in selection_skipped if not is_size_limit(s.reason)]
        for s in selection_skipped:
            log.info("ww_monitor: layer %s (%s, shape %s) not analysed: %s", s.name, s.kind, s.shape, s.reason)
        if unexpected:  # size limits are configuration; anything else (dtype, ...) is news
            rank_zero_warn(
                f"{self.warning_prefix}: "
                + "; ".join(f"layer {s.name} not analysed: {s.reason}" for s in unexpected[:MAX_LISTED]),
                RuntimeWarning,
            )
