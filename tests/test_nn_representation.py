"""RepresentationTable: its in-place gradient accumulation against autograd's own indexing gradient."""

from __future__ import annotations

import pytest
import torch

from dgdlens.nn import RepresentationTable


def _loss(rows: torch.Tensor, layer: torch.nn.Module) -> torch.Tensor:
    return torch.nn.functional.softplus(layer(rows)).pow(2).sum()


@pytest.mark.parametrize("index_shape", ["flat", "2d", "repeated"])
def test_gradient_equals_autograd_indexing_and_accumulates(index_shape):
    gen = torch.Generator().manual_seed(0)
    init = torch.randn(50, 4, generator=gen)
    layer = torch.nn.Linear(4, 7)
    table = RepresentationTable(50, 4, init=init)
    reference = init.clone().requires_grad_()
    batches = [torch.randperm(50, generator=gen)[:16] for _ in range(3)]
    if index_shape == "2d":
        batches = [b.reshape(4, 4) for b in batches]
    if index_shape == "repeated":  # a row twice in one batch: both gradients count
        batches = [torch.cat([b, b[:5]]) for b in batches]
    for index in batches:  # three backward passes accumulate, as over an epoch
        _loss(table(index), layer).backward()
        _loss(reference[index], layer).backward()
    untouched = torch.ones(50, dtype=torch.bool)
    untouched[torch.cat([b.reshape(-1) for b in batches])] = False
    assert table.z.grad.shape == (50, 4) and table.z.grad.layout == torch.strided
    torch.testing.assert_close(table.z.grad, reference.grad, rtol=1e-6, atol=1e-6)
    assert untouched.any() and not table.z.grad[untouched].any()


def test_adam_steps_match_a_plain_parameter():
    init = torch.randn(30, 3, generator=torch.Generator().manual_seed(1))
    table = RepresentationTable(30, 3, init=init)
    reference = torch.nn.Parameter(init.clone())
    opts = [torch.optim.Adam([table.z], lr=0.05, weight_decay=1e-4),
            torch.optim.Adam([reference], lr=0.05, weight_decay=1e-4)]
    target = torch.linspace(-1, 1, 3)
    for epoch in range(4):
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        for index in torch.arange(30).split(8):
            (table(index) - target).pow(2).sum().backward()
            (reference[index] - target).pow(2).sum().backward()
        for opt in opts:
            opt.step()
    torch.testing.assert_close(table.z.detach(), reference.detach(), rtol=0, atol=0)


def test_gather_without_gradient_and_sparse_mode():
    table = RepresentationTable(10, 2, init="normal", generator=torch.Generator().manual_seed(2))
    index = torch.tensor([3, 1, 3])
    with torch.no_grad():
        out = table(index)
    assert not out.requires_grad and torch.equal(out, table.z.detach()[index])
    table.sparse_grad = True
    table(index).sum().backward()
    assert table.z.grad.is_sparse
    torch.testing.assert_close(table.z.grad.to_dense()[3], torch.full((2,), 2.0))
