"""Switch the torch.nn.RNN/LSTM/GRU modules and *Cell modules of a model to rnn_triton's, and back.

``convert(model)`` turns every module inside ``model`` (``model`` itself included) whose type is
``torch.nn.LSTM``, ``GRU``, ``RNN``, ``LSTMCell``, ``GRUCell`` or ``RNNCell`` (or a subclass of them:
below) into rnn_triton's class of the same name, in place, and returns ``model``;
``convert_back(model)`` turns them exactly back into their own classes. Use it on a model built or loaded with torch.nn
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

A user's subclass of a torch.nn class (``class MyLSTM(nn.LSTM)``, or the class
``torch.nn.utils.parametrize`` makes) is converted too when its ``forward`` is torch.nn's own: its class
becomes a subclass of it that puts our forward first (so its other methods and attributes stay), made
once per class. One that overrides ``forward`` is left alone: our class in its place would drop its
code. ``convert`` warns (``ConversionWarning``) naming every module it left alone and why;
``verbose=True`` also prints each module it converted.

Convert before ``torch.compile``, so the compiled graph is traced through the converted modules.
"""
import warnings

from torch import nn

from .cells import GRUCell, LSTMCell, RNNCell, _TritonCell
from .modules import GRU, LSTM, RNN, _TritonRecurrent

#: Exact class -> exact class. Looked up by ``type(module)``; subclasses: ``_converted_class``.
_TO_TRITON = {nn.LSTM: LSTM, nn.GRU: GRU, nn.RNN: RNN,
              nn.LSTMCell: LSTMCell, nn.GRUCell: GRUCell, nn.RNNCell: RNNCell}
_TO_TORCH = {ours: theirs for theirs, ours in _TO_TRITON.items()}
_OURS = (_TritonRecurrent, _TritonCell)


class ConversionWarning(UserWarning):
    """``convert`` left a torch.nn recurrent module as it was (the message says which and why)."""


_SUBCLASSES = {}  # a user's class -> its converted class


def _converted_class(cls):
    """Our forward before a user's subclass ``cls`` of a torch.nn recurrent class: a class made once,
    named as ``cls``, pickled as ``cls``'s conversion (see ``_rebuild``)."""
    if cls not in _SUBCLASSES:
        base = next(b for b in cls.__mro__ if b in _TO_TRITON)
        mixin = _TritonCell if base in (nn.LSTMCell, nn.GRUCell, nn.RNNCell) else _TritonRecurrent

        def __reduce_ex__(self, protocol):
            return _rebuild, (cls,), self.__getstate__()

        _SUBCLASSES[cls] = type(cls.__name__, (mixin, cls), {
            "__module__": cls.__module__, "__qualname__": cls.__qualname__, "__reduce_ex__": __reduce_ex__,
            "__doc__": f"{cls.__qualname__} with rnn_triton's forward (rnn_triton.convert)"})
        _TO_TORCH[_SUBCLASSES[cls]] = cls
    return _SUBCLASSES[cls]


def _rebuild(cls):
    """An empty instance of ``cls``'s converted class; pickle then restores its state."""
    return object.__new__(_converted_class(cls))


def _plan(module):
    """(class to convert ``module`` to, or None; why not)."""
    cls = type(module)
    if cls in _TO_TRITON:
        return _TO_TRITON[cls], ""
    if isinstance(module, _OURS) or not isinstance(module, tuple(_TO_TRITON)):
        return None, ""
    base = next(b for b in cls.__mro__ if b in _TO_TRITON)
    if cls.forward is not base.forward:
        return None, f"its class {cls.__qualname__} overrides forward (converting would drop that code)"
    return _converted_class(cls), ""


def convert(model: nn.Module, verbose: bool = False) -> nn.Module:
    """Make every ``torch.nn.LSTM``/``GRU``/``RNN`` and ``LSTMCell``/``GRUCell``/``RNNCell`` in ``model``
    (``model`` included), and every subclass of them whose forward is torch.nn's own, rnn_triton's.

    In place, keeping the very same Parameter objects; returns ``model``. A module left alone is named,
    with the reason, in a ``ConversionWarning``; ``verbose`` prints every module converted. See the
    module docstring.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    skipped = []
    # named_modules() yields the root too, and a module shared at several places only once.
    for name, module in model.named_modules():
        target, why = _plan(module)
        if target is not None:
            if verbose:
                print(f"rnn_triton.convert: {name or '(the model)'} ({type(module).__qualname__}) converted: "
                      f"its forward runs rnn_triton's kernels")
            module.__class__ = target
        elif why:
            skipped.append(f"{name or '(the model)'}: {why}")
    if skipped:
        warnings.warn("rnn_triton.convert left these modules as they are (they run torch.nn's code): "
                      + "; ".join(skipped), ConversionWarning, stacklevel=2)
    return model


def convert_back(model: nn.Module) -> nn.Module:
    """Make every ``rnn_triton.LSTM``/``GRU``/``RNN`` and ``*Cell`` in ``model`` (``model`` included)
    torch.nn's, and every converted subclass its own class again.

    The reverse of ``convert``: in place, same Parameter objects, exactly the torch.nn classes afterwards;
    subclasses of rnn_triton's classes are left alone. Returns ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    for module in model.modules():
        target = _TO_TORCH.get(type(module))
        if target is not None:
            module.__class__ = target
    return model
