"""rnn_triton: torch.nn recurrent layers as persistent Triton kernels."""
from .dispatch import Plan, KernelConfig
from .modules import LSTM

__all__ = ["LSTM", "Plan", "KernelConfig"]
