"""Triton kernels of rnn_triton (installed as ``rnn_triton.kernels``).

Only ``@triton.jit`` code lives here; nothing in this folder imports torch-side code.

- ``cells``: each cell's step math, forward and derivative side by side.
- ``persistent``: the tile-persistent time loops (forward and backward), written once for all cells.
"""
