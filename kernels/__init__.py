"""Triton kernels of rnn_triton (installed as ``rnn_triton.kernels``).

Only ``@triton.jit`` code lives here; nothing in this folder imports torch-side code.

- ``cells``: each cell's step math, forward and derivative side by side.
- ``tiles``: tile helpers the loops share (weight tiles, 64-bit offsets, per-row steps).
- ``persistent``: the tile-persistent time loops (forward and backward), written once for all cells.
- ``cooperative``: the cooperative time loops for large H (units split over programs, grid barrier).
- ``cell_step``: one fused step for the ``*Cell`` modules.
"""
