"""Packed input under torch.compile(fullgraph=True) with no graph break of ours, and torch.jit.trace
without a warning from our code."""
import warnings

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import rnn_triton
from rnn_triton import packing, runtime

from helpers import DEVICE, rel_err



def _ours(module, packed, states):
    """Our module on a PackedSequence: the packed output's data and the final states."""
    y, h = module(packed, (tuple(states) if len(states) == 2 else states[0]) if states else None)
    return [y.data] + (list(h) if isinstance(h, tuple) else [h])


@pytest.mark.parametrize("cell,enforce_sorted,with_state", [("LSTM", True, False), ("LSTM", False, True),
                                                             ("GRU", False, False)])
def test_packed_input_compiles_without_a_graph_break(cell, enforce_sorted, with_state):
    """fullgraph=True: any graph break inside our forward is an error. Outputs and every gradient as eager."""
    torch._dynamo.reset()
    module = getattr(rnn_triton, cell)(5, 16, bidirectional=True).to(DEVICE)
    lengths = torch.tensor([6, 4, 2] if enforce_sorted else [4, 6, 1])
    x = torch.randn(6, 3, 5, device=DEVICE)
    hx = [torch.randn(2, 3, 16, device=DEVICE) for _ in range(2 if cell == "LSTM" else 1)] if with_state else []
    results = []
    for fn in (_ours, torch.compile(_ours, fullgraph=True, backend="aot_eager")):
        module.zero_grad()
        xi = x.clone().requires_grad_()
        states = [h.clone().requires_grad_() for h in hx]
        # the client's own packing, outside the compiled function: Dynamo skips torch's (a break of theirs)
        packed = pack_padded_sequence(xi, lengths, enforce_sorted=enforce_sorted)
        before = runtime.launches["persistent_fwd"]
        outs = fn(module, packed, states)
        assert runtime.launches["persistent_fwd"] > before, "our kernel did not run"
        sum((o * (i + 1)).sum() for i, o in enumerate(outs)).backward()
        results.append(outs + [xi.grad] + [s.grad for s in states] + [p.grad for p in module.parameters()])
    for got, want in zip(*results):
        assert got.shape == want.shape and rel_err(got, want) < 1e-6


def test_packed_lengths_op():
    batch_sizes = torch.tensor([3, 3, 2, 1])
    assert packing.packed_lengths(batch_sizes).tolist() == [4, 3, 2]
    torch.library.opcheck(packing.packed_lengths, (batch_sizes,))


def test_jit_trace_warns_nothing_from_our_code():
    module = rnn_triton.LSTM(5, 16).to(DEVICE)
    x = torch.randn(6, 3, 5, device=DEVICE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.jit.trace(module, (x,), check_trace=False)
    ours = [w for w in caught if "rnn_triton" in w.filename]
    assert not ours, [f"{w.filename}:{w.lineno}: {w.message}" for w in ours]
    assert rel_err(traced(x)[0], module(x)[0]) < 1e-6
