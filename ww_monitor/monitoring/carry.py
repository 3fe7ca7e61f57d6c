"""Frozen matrices carried forward between snapshots: :class:`FrozenCarry`.

A matrix whose parameters do not require grad (:mod:`ww_monitor.analysis.frozen`) cannot change
while it stays frozen, so copying and analysing it again would give the same numbers. The
training-time monitor therefore analyses it at the first snapshot at which it is frozen (the
baseline, for a frozen backbone or LoRA base weights) and *carries it forward* afterwards: no
copy, no analysis, nothing logged again; its last result stands in the history.

The rule, per selected matrix and snapshot: **carried** when it is frozen now *and* it was
frozen when it was last copied (or carried). So

* a layer frozen from the start is analysed at the baseline only;
* a layer that becomes trainable (gradual unfreezing) is copied again at the next snapshot;
* a layer that becomes frozen later is analysed once more at the next snapshot (its weights
  may have moved since its last analysis) and carried from then on.

The decision rests only on ``requires_grad`` and on this bookkeeping, both the same on every
rank of a distributed run, so every rank carries the same matrices and computes the same
ownership of the rest. A frozen tensor changed in place by hand (``load_state_dict`` into it
mid-run) is not seen: pass ``watch_frozen=True`` to analyse every matrix at every snapshot.

Use: :meth:`begin` before a snapshot's selection, :meth:`carry` as the selection's predicate
(``True``: leave this matrix out), :meth:`commit` once the snapshot is taken (:meth:`abort`
if taking it failed). :meth:`state_dict` goes into the monitor's checkpoint state.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FrozenCarry", "CarriedSnapshot"]


@dataclass(frozen=True)
class CarriedSnapshot:
    """What one snapshot's selection saw: ``carried`` layers (names), how many selected matrices
    were ``frozen`` (carried or analysed now), and the bytes the carried ones would have taken."""

    carried: tuple[str, ...] = ()
    frozen: int = 0
    carried_bytes: int = 0


class FrozenCarry:
    """Which frozen matrices a snapshot leaves out (see the module docstring)."""

    def __init__(self, enabled: bool = True) -> None:
        #: False (``watch_frozen=True``): nothing is carried; frozen matrices are still counted.
        self.enabled = enabled
        #: Matrices that were frozen when last copied or carried.
        self.frozen: set[str] = set()
        self._seen: dict[str, tuple[bool, int, bool]] | None = None  # name -> (frozen, nbytes, carried)

    def begin(self) -> None:
        self._seen = {}

    def carry(self, matrix) -> bool:
        """Whether ``matrix`` (a selected :class:`~ww_monitor.analysis.layers.LayerMatrix`) is
        carried forward at this snapshot. Called once or more per matrix (sharded collection
        paths may offer a matrix again); the answer does not change within a snapshot."""
        carried = self.enabled and bool(matrix.frozen) and matrix.name in self.frozen
        if self._seen is not None:
            nbytes = matrix.weight.numel() * matrix.weight.element_size() if carried else 0
            self._seen[matrix.name] = (bool(matrix.frozen), nbytes, carried)
        return carried

    def commit(self) -> CarriedSnapshot:
        """The snapshot was taken: remember what is frozen now; what this snapshot carried."""
        seen, self._seen = self._seen or {}, None
        self.frozen = {name for name, (frozen, _, _) in seen.items() if frozen}
        carried = tuple(name for name, (_, _, c) in seen.items() if c)
        return CarriedSnapshot(carried, len(self.frozen), sum(b for _, b, _ in seen.values()))

    def abort(self) -> None:
        """Taking the snapshot failed: nothing changes."""
        self._seen = None

    def state_dict(self) -> list[str]:
        return sorted(self.frozen)

    def load_state_dict(self, names) -> None:
        self.frozen = {str(n) for n in names or ()}
