"""Checks the kernel tests share (imported by name: pytest puts this folder on ``sys.path``)."""

import torch


def assert_compiles_as_one_graph(f, q, k, v):
    """``f(q, k, v) -> (loss, stat)`` compiled with ``fullgraph=True`` gives eager's loss, statistic and
    gradients of the loss in q, k and v."""
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss_c, stat_c = compiled(q, k, v)
    grads_c = torch.autograd.grad(loss_c, (q, k, v))
    loss_e, stat_e = f(q, k, v)
    grads_e = torch.autograd.grad(loss_e, (q, k, v))
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(stat_c, stat_e)
    for a, b in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(a, b)
