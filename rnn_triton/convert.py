"""Switch the torch.nn.RNN/LSTM/GRU modules and *Cell modules of a model to rnn_triton's, and back.

``convert(model)`` turns every module inside ``model`` (``model`` itself included) whose type is
exactly ``torch.nn.LSTM``, ``GRU``, ``RNN``, ``LSTMCell``, ``GRUCell`` or ``RNNCell`` into
rnn_triton's class of the same name, in place, and returns ``model``; ``convert_back(model)`` turns
rnn_triton's exactly back into the torch.nn classes. Use it on a model built or loaded with torch.nn
layers (a pretrained model, a checkpoint mid-training) without touching the code that builds it.

The conversion changes each module's class and nothing else. Building new modules and copying the
weights over would hand out new Parameter objects: an optimizer built before the conversion would keep
updating the old ones, and weight tying, hooks, ``requires_grad`` flags and any other reference held to
the old module or its parameters would silently stop applying. Changing ``__class__`` is sound because
rnn_triton's classes subclass the torch.nn ones and add no state of their own (no ``__init__``, no
attributes, no buffers): the module's parameters, ``_flat_weights``, hooks, training flag, device,
dtype and ``state_dict`` stay as they are, and only ``forward`` (and ``kernel_plan``) change. A module's
configuration is not checked: one the kernels do not serve (a too large hidden size)
falls back to torch.nn's forward per call, or raises under ``RNN_TRITON_STRICT=1``, as with any
rnn_triton module.

Left alone, on purpose: subclasses of the torch.nn classes other than rnn_triton's (a user's own
``class MyLSTM(nn.LSTM)``, or the classes ``torch.nn.utils.parametrize`` creates): their code may
override ``forward`` or rely on the exact class, and putting our class in their place would drop their
behaviour.

Convert before ``torch.compile``, so the compiled graph is traced through the converted modules.
"""
from torch import nn

from .cells import GRUCell, LSTMCell, RNNCell
from .modules import GRU, LSTM, RNN

#: Exact class -> exact class. Looked up by ``type(module)``, never ``isinstance``, so subclasses
#: (user's or ours) never match.
_TO_TRITON = {nn.LSTM: LSTM, nn.GRU: GRU, nn.RNN: RNN,
              nn.LSTMCell: LSTMCell, nn.GRUCell: GRUCell, nn.RNNCell: RNNCell}
_TO_TORCH = {ours: theirs for theirs, ours in _TO_TRITON.items()}


def _swap(model: nn.Module, mapping: dict) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    # modules() yields the root too, and a module shared at several places only once.
    for module in model.modules():
        target = mapping.get(type(module))
        if target is not None:
            module.__class__ = target
    return model


def convert(model: nn.Module) -> nn.Module:
    """Make every ``torch.nn.LSTM``/``GRU``/``RNN`` and ``LSTMCell``/``GRUCell``/``RNNCell`` in ``model``
    (``model`` included) rnn_triton's.

    In place, keeping the very same Parameter objects; returns ``model``. Only modules whose type is
    exactly one of those six are converted: subclasses are left alone. See the module docstring for why.
    """
    return _swap(model, _TO_TRITON)


def convert_back(model: nn.Module) -> nn.Module:
    """Make every ``rnn_triton.LSTM``/``GRU``/``RNN`` and ``*Cell`` in ``model`` (``model`` included)
    torch.nn's.

    The reverse of ``convert``: in place, same Parameter objects, exactly the torch.nn classes afterwards;
    subclasses of rnn_triton's classes are left alone. Returns ``model``.
    """
    return _swap(model, _TO_TORCH)
