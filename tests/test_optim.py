"""RowSparseAdam: lazy Adam on id tables, plain Adam elsewhere."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from learners.towers.optim import RowSparseAdam, gradient_rows


def _steps(table: torch.nn.Parameter, optimizer, batches, sparse: bool) -> None:
    for rows in batches:
        optimizer.zero_grad(set_to_none=True)
        F.embedding(torch.tensor(rows), table, sparse=sparse).pow(2).sum().backward()
        optimizer.step()


def test_row_sparse_adam_matches_torch_sparse_adam_and_leaves_untouched_rows_alone():
    torch.manual_seed(0)
    start = torch.randn(8, 4)
    batches = [[0, 1, 1], [1, 5], [0, 5, 6]]
    ours = torch.nn.Parameter(start.clone())
    reference = torch.nn.Parameter(start.clone())
    _steps(ours, RowSparseAdam([ours], lr=0.1, row_sparse=True), batches, sparse=True)
    _steps(reference, torch.optim.SparseAdam([reference], lr=0.1), batches, sparse=True)
    assert torch.allclose(ours, reference, atol=1e-6)
    untouched = [2, 3, 4, 7]
    assert torch.equal(ours.detach()[untouched], start[untouched])
    assert not torch.allclose(ours.detach()[[0, 1, 5, 6]], start[[0, 1, 5, 6]])


def test_dense_and_sparse_gradients_of_a_table_give_the_same_update():
    torch.manual_seed(1)
    start = torch.randn(8, 4)
    batches = [[2, 3], [3, 7, 7]]
    tables = {}
    for sparse in (False, True):
        table = torch.nn.Parameter(start.clone())
        _steps(table, RowSparseAdam([table], lr=0.05, row_sparse=True), batches, sparse=sparse)
        tables[sparse] = table.detach()
    assert torch.allclose(tables[False], tables[True], atol=1e-6)


def test_gradient_rows_names_the_rows_a_step_reached():
    table = torch.nn.Parameter(torch.ones(6, 2))
    for sparse in (False, True):
        table.grad = None
        F.embedding(torch.tensor([4, 1, 4]), table, sparse=sparse).sum().backward()
        rows, values = gradient_rows(table.grad)
        order = rows.argsort()
        assert rows[order].tolist() == [1, 4]
        assert values[order].tolist() == [[1.0, 1.0], [2.0, 2.0]]  # row 4 was looked up twice
