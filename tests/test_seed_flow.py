"""The seed README's example runs on distsparse unchanged (DESIGN.md; origin/data_scheduler_README.md).

``GammaScheduler`` is the seed README's, verbatim (from examples/seed_flow.py) (it calls
``super().__init__`` first, so the initial step runs before ``self.gamma`` exists, and its
epoch-0 branch sets every level to 0.0). The loop is the README's: the sparsifier is
built with no data and the batch is added inside the loop, every batch.
"""

from __future__ import annotations

import importlib.util
import pathlib
import warnings

import pytest
import torch
from torch import nn

import distsparse
from distsparse import DataNormSparsifier

pytestmark = pytest.mark.usefixtures("one_thread")


# The seed README's scheduler, verbatim, as examples/seed_flow.py carries it (one copy).
_SEED_FLOW = importlib.util.spec_from_file_location(
    "seed_flow_example", pathlib.Path(__file__).resolve().parents[1] / "examples" / "seed_flow.py")
_seed_flow = importlib.util.module_from_spec(_SEED_FLOW)
_SEED_FLOW.loader.exec_module(_seed_flow)
GammaScheduler = _seed_flow.GammaScheduler


EPOCHS = 4
BATCHES = 5
BATCH_SHAPE = (4, 8)  # 4 rows of two (1, 4) blocks: 8 blocks per batch


def make_dataset(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(BATCH_SHAPE, generator=gen), torch.randn(BATCH_SHAPE[0], 2, generator=gen))
            for _ in range(BATCHES)]


def run_seed_loop(data_sparsifier, data_scheduler, dataset, record):
    """The README's loop, verbatim apart from the ``record`` bookkeeping."""
    torch.manual_seed(0)
    model = nn.Linear(BATCH_SHAPE[1], 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = nn.MSELoss()
    data_name = 'train_data'

    for epoch in range(EPOCHS):
        for input, target in dataset:
            input = data_sparsifier.add_data(name=data_name, data=input)
            record.append((epoch, int((input == 0).sum()), data_sparsifier.data_groups[data_name]["sparsity_level"]))

            optimizer.zero_grad()
            output = model(input)
            loss = loss_fn(output, target)
            loss.backward()
            optimizer.step()
            data_sparsifier.step()

        data_scheduler.step()
    return model


def expected_zero_counts(record):
    """Zeros in each batch the loop fed the model: the mask reused from the previous
    sparsifier step (none before the first), i.e. round(previous level x 8) blocks of 4."""
    counts = [0]
    for _, _, level in record[:-1]:
        counts.append(4 * round(level * 8))
    return counts


def test_the_seed_readme_loop_runs_several_epochs_without_errors_or_warnings():
    dataset = make_dataset()
    record = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data_sparsifier = DataNormSparsifier(sparsity_level=0.2, sparse_block_shape=(1, 4))
        data_scheduler = GammaScheduler(data_sparsifier, gamma=2, threshold_sl=0.8)
        model = run_seed_loop(data_sparsifier, data_scheduler, dataset, record)
    assert len(record) == EPOCHS * BATCHES
    assert data_scheduler.last_epoch == EPOCHS
    assert list(data_sparsifier.data_groups) == ["train_data"]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert [n for _, n, _ in record] == expected_zero_counts(record)


def test_the_seed_gamma_arithmetic_applies_as_written_to_a_group_added_in_the_loop():
    # the scheduler was built before any data: its epoch-0 "0.0" touched no group, so the
    # batch starts at the sparsifier's default and the seed's "level x gamma" ramps it
    data_sparsifier = DataNormSparsifier(sparsity_level=0.2, sparse_block_shape=(1, 4))
    data_scheduler = GammaScheduler(data_sparsifier, gamma=2, threshold_sl=0.7)
    record = []
    run_seed_loop(data_sparsifier, data_scheduler, make_dataset(1), record)
    per_epoch = [[lvl for e, _, lvl in record if e == epoch] for epoch in range(EPOCHS)]
    assert [set(levels) for levels in per_epoch] == [{0.2}, {0.4}, {0.7}, {0.7}]
    assert data_sparsifier.data_groups["train_data"]["sparsity_level"] == 0.7
    assert data_scheduler.get_last_param() == {"train_data": 0.7}
    assert [n for _, n, _ in record] == expected_zero_counts(record)


def test_the_seed_gamma_scheduler_keeps_a_level_at_zero_once_it_set_it():
    # data added before the scheduler: the seed's epoch-0 branch sets 0.0, and 0.0 x gamma stays 0.0
    data_sparsifier = DataNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 4))
    data_sparsifier.add_data("train_data", torch.randn(BATCH_SHAPE))
    data_scheduler = GammaScheduler(data_sparsifier, gamma=2, threshold_sl=0.8)
    assert data_sparsifier.data_groups["train_data"]["sparsity_level"] == 0.0
    record = []
    run_seed_loop(data_sparsifier, data_scheduler, make_dataset(2), record)
    assert {lvl for _, _, lvl in record} == {0.0}
    assert {n for _, n, _ in record} == {0}
    assert bool(data_sparsifier.get_mask("train_data").all())


def test_the_built_in_gamma_scheduler_really_ramps_in_the_seed_loop():
    data_sparsifier = DataNormSparsifier(sparsity_level=0.1, sparse_block_shape=(1, 4))
    data_sparsifier.add_data("train_data", torch.randn(BATCH_SHAPE))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data_scheduler = distsparse.GammaScheduler(data_sparsifier, gamma=2.0, threshold=0.8)
        record = []
        run_seed_loop(data_sparsifier, data_scheduler, make_dataset(3), record)
    per_epoch = [sorted({lvl for e, _, lvl in record if e == epoch}) for epoch in range(EPOCHS)]
    assert per_epoch == [[pytest.approx(0.1)], [pytest.approx(0.2)], [pytest.approx(0.4)], [pytest.approx(0.8)]]
    assert data_sparsifier.data_groups["train_data"]["sparsity_level"] == pytest.approx(0.8)
    zeros = [n for _, n, _ in record]
    assert zeros == expected_zero_counts(record)
    assert zeros[-1] == 4 * round(0.8 * 8) > zeros[BATCHES] > 0


def test_the_built_in_gamma_scheduler_ramps_a_batch_first_added_inside_the_loop():
    data_sparsifier = DataNormSparsifier(sparsity_level=0.1, sparse_block_shape=(1, 4))
    data_scheduler = distsparse.GammaScheduler(data_sparsifier, gamma=2.0, threshold=0.8)
    record = []
    run_seed_loop(data_sparsifier, data_scheduler, make_dataset(4), record)
    last_levels = [max(lvl for e, _, lvl in record if e == epoch) for epoch in range(EPOCHS)]
    assert last_levels[0] == pytest.approx(0.1)
    assert all(b > a for a, b in zip(last_levels, last_levels[1:]))
    assert data_scheduler.base_param == {"train_data": pytest.approx(0.1)}


def test_the_seed_loop_changes_only_the_import_from_torch_ao():
    # the same names exist where the seed README's code looks for them
    for name in ("BaseDataScheduler", "BaseDataSparsifier", "DataNormSparsifier"):
        assert hasattr(distsparse, name)
    sp = DataNormSparsifier()
    sch = GammaScheduler(sp, 2, 0.8)
    assert sch.get_last_param() == {}
    assert sch.last_epoch == 0
