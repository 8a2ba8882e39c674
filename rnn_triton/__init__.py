"""rnn_triton: torch.nn recurrent layers as persistent Triton kernels."""
import torch._dynamo

from .dispatch import Plan, KernelConfig
from .modules import GRU, LSTM, RNN
from .heads import SLSTM, MultiHeadGRU, MultiHeadLSTM, MultiHeadRNN
from .flashrnn import flashrnn
from .cells import GRUCell, LSTMCell, RNNCell
from .convert import ConversionWarning, convert, convert_back
from .runtime import FallbackWarning, interpreting, round_bfloat16_to_nearest_even

__all__ = ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell", "MultiHeadLSTM", "MultiHeadGRU", "MultiHeadRNN",
           "SLSTM", "flashrnn", "Plan", "KernelConfig", "convert", "convert_back", "FallbackWarning",
           "ConversionWarning"]

# Dynamo refuses any instance of torch.nn.RNN/GRU/LSTM (ours subclass them) unless this is set; our
# forward is a custom op Dynamo traces whole. It also lets Dynamo try torch.nn's own RNN modules
# (experimental upstream) instead of refusing them: said in the README.
torch._dynamo.config.allow_rnn = True

if interpreting():
    round_bfloat16_to_nearest_even()
