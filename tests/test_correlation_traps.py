"""Correlation traps: huge entries are traps, learned (delocalised) signals are not."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ww_monitor.analysis import synthetic
from ww_monitor.functional.correlation_traps import count_correlation_traps, shuffle_entries
from ww_monitor.functional.eigenvalues import eigenvalues
from ww_monitor.functional.marchenko_pastur import fit_marchenko_pastur


@pytest.mark.parametrize("n,m", [(128, 64), (256, 256), (512, 128), (100, 300)])
def test_gaussian_matrices_have_no_traps(n, m):
    for seed in range(4):
        w = synthetic.gaussian(n, m, seed=seed)
        assert count_correlation_traps(w, seed=seed) == 0


@pytest.mark.parametrize("n,m", [(256, 128), (300, 300)])
def test_single_huge_entry_is_a_trap(n, m):
    w = synthetic.gaussian(n, m, seed=1)
    # BBP for a e_i e_j^T: a trap once |a| / sigma > (N M)^(1/4); 4x that is unmistakable.
    w[17, 5] = 4.0 * (n * m) ** 0.25
    assert count_correlation_traps(w, seed=0) == 1
    assert count_correlation_traps(torch.from_numpy(w), seed=7) == 1  # any seed, torch input too
    # Well below the threshold the entry drowns in the bulk.
    w[17, 5] = 0.5 * (n * m) ** 0.25
    assert count_correlation_traps(w, seed=0) == 0


def test_delocalised_rank_one_signal_is_not_a_trap():
    n, m = 512, 256
    w = synthetic.spiked(n, m, 6.0, relative=True, seed=2)
    # The layer itself has a clear spike...
    ev = eigenvalues(w)
    assert fit_marchenko_pastur(ev, n, m).num_spikes == 1
    # ...but it is learned structure spread over all entries, so shuffling dissolves it.
    for seed in range(3):
        assert count_correlation_traps(w, seed=seed) == 0


def test_heavy_tailed_entries_give_traps():
    w = synthetic.heavy_tailed(512, 256, mu=1.5, seed=0)
    assert count_correlation_traps(w) >= 5


def test_nonzero_mean_is_not_a_trap():
    # Shuffling a matrix with mean mu leaves a rank-one mu 1 1^T: global, not a trap.
    w = synthetic.gaussian(256, 128, seed=4) + 3.0
    assert count_correlation_traps(w) == 0


def test_scale_invariant_and_seeded():
    w = synthetic.gaussian(200, 100, seed=5)
    w[3, 3] = 40.0
    counts = {count_correlation_traps(c * w, seed=11) for c in (1e-4, 1.0, 1e3)}
    assert counts == {1}
    a = shuffle_entries(w, seed=3)
    b = shuffle_entries(w, seed=3)
    c = shuffle_entries(w, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # A permutation of the centred entries: same multiset.
    np.testing.assert_allclose(np.sort(a.numpy().ravel()), np.sort((w - w.mean()).ravel()), rtol=0, atol=1e-6)


def test_global_torch_rng_untouched():
    state = torch.random.get_rng_state()
    count_correlation_traps(synthetic.gaussian(64, 32, seed=0), seed=1)
    assert torch.equal(state, torch.random.get_rng_state())


def test_stack_of_slices_shuffles_each_slice():
    k, n, m = 9, 128, 64
    stack = np.stack([synthetic.gaussian(n, m, seed=s) for s in range(k)])
    assert count_correlation_traps(stack) == 0
    shuffled = shuffle_entries(stack, seed=0)
    assert shuffled.shape == (k, n, m)
    # Entries never move between slices.
    for i in range(k):
        np.testing.assert_allclose(np.sort(shuffled[i].numpy().ravel()),
                                   np.sort((stack[i] - stack[i].mean()).ravel()), atol=1e-6)
    stack[4, 10, 10] = 5.0 * (n * m) ** 0.25
    assert count_correlation_traps(torch.from_numpy(stack)) == 1


def test_rejects_bad_shapes():
    with pytest.raises(ValueError):
        count_correlation_traps(np.zeros(5))
