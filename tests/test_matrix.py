"""A random draw from the whole configuration matrix per cell, fresh every run: num_layers,
bidirectional, batch_first, bias, proj_size (LSTM), initial state, packed or padded (random lengths,
sorted or not), dtype and sizes, each against torch.nn in float64 with every output and gradient checked."""
import random

import pytest
import torch

from rnn_triton import dispatch

from helpers import DEVICE, compare_with_torch
from test_packed import CELLS, _packed_case

DRAWS = 4


def _draw(rng, cell):
    dtypes = [torch.float64, torch.float32, torch.bfloat16] if DEVICE.type == "cpu" else \
        [torch.float32, torch.bfloat16, torch.float16]
    dtype = rng.choice(dtypes)
    # hidden sizes the tile-persistent kernel takes in this dtype (quick in the interpreter; test_packed and
    # test_cooperative cover the cooperative kernels)
    sizes = [h for h in (8, 16, 20, 32, 48) if dispatch.choose(cell, h, dtype, DEVICE).config is not None
             and dispatch.choose(cell, h, dtype, DEVICE).config.variant == "tile-persistent"]
    H = rng.choice(sizes)
    proj = rng.randint(1, H - 1) if cell == "LSTM" and H > 1 and rng.random() < 0.4 else 0
    return dict(proj_size=proj, layers=rng.choice([1, 2]), bidirectional=rng.random() < 0.5, batch_first=rng.random() < 0.5,
                bias=rng.random() < 0.7, with_state=rng.random() < 0.5, packed=rng.random() < 0.5,
                enforce_sorted=rng.random() < 0.5, dtype=dtype, H=H,
                I=rng.choice([1, 3, 7]), B=rng.randint(1, 5), T=rng.randint(1, 7))


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("draw", range(DRAWS))
def test_random_configuration(cell, draw, seed):
    rng = random.Random(seed * DRAWS + draw)  # distinct draws even with RNN_TRITON_SEED fixed
    c = _draw(rng, cell)
    print(cell, c)  # shown on failure, with the seed in the test id
    if c["packed"]:
        lengths = [rng.randint(1, c["T"]) for _ in range(c["B"])]
        lengths[rng.randrange(c["B"])] = c["T"]
        if c["enforce_sorted"]:
            lengths.sort(reverse=True)
        _packed_case(cell, lengths, c["enforce_sorted"], layers=c["layers"], bidirectional=c["bidirectional"],
                     with_state=c["with_state"], dtype=c["dtype"], H=c["H"], I=c["I"], bias=c["bias"],
                     proj_size=c["proj_size"])
        return
    ours_cls, ref_cls, extra = CELLS[cell]
    extra = dict(extra, **({"proj_size": c["proj_size"]} if c["proj_size"] else {}))
    module = ours_cls(c["I"], c["H"], num_layers=c["layers"], bias=c["bias"], batch_first=c["batch_first"],
                      bidirectional=c["bidirectional"], **extra).to(c["dtype"])
    shape = (c["B"], c["T"], c["I"]) if c["batch_first"] else (c["T"], c["B"], c["I"])
    hx = None
    if c["with_state"]:
        n = c["layers"] * (2 if c["bidirectional"] else 1)
        hx = torch.randn(n, c["B"], c["proj_size"] or c["H"], dtype=torch.float64)
        hx = (hx, torch.randn(n, c["B"], c["H"], dtype=torch.float64)) if cell == "LSTM" else hx
    compare_with_torch(module, ref_cls, torch.randn(shape, dtype=torch.float64), hx, seed)
