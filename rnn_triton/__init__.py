"""rnn_triton: torch.nn recurrent layers as persistent Triton kernels."""
from .dispatch import Plan, KernelConfig
from .modules import GRU, LSTM, RNN

__all__ = ["LSTM", "GRU", "RNN", "Plan", "KernelConfig"]
