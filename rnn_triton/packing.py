"""A PackedSequence to a padded batch and back with tensor ops only, so that torch.compile traces packed
input whole: torch's pad_packed_sequence and pack_padded_sequence are skipped by Dynamo (a graph break
each), and the batch size, batch_sizes[0], is a value, not a shape (.item(): a break too).

Element k of a PackedSequence's data is step t of the sequence in sorted position b, where t is the
first step whose cumulative batch size exceeds k and b is k's offset within that step; that sequence is
row ``sorted_indices[b]`` of the batch (b itself without sorted_indices). ``steps_and_rows`` computes
(t, row) for every k; a padded tensor is then ``index_put`` at them, and a padded output read back with
``y[t, row]``.
"""
import torch
from torch import Tensor


@torch.library.custom_op("rnn_triton::packed_lengths", mutates_args=())
def packed_lengths(batch_sizes: Tensor) -> Tensor:
    """Every sequence's length, longest first ([B] int64), from a PackedSequence's batch_sizes. An op of
    its own because B is a value of batch_sizes: under torch.compile its size is data-dependent."""
    steps = torch.arange(int(batch_sizes[0]), device=batch_sizes.device)
    return (batch_sizes.unsqueeze(0) > steps.unsqueeze(1)).sum(1)


@packed_lengths.register_fake
def _(batch_sizes):
    return batch_sizes.new_empty(torch.library.get_ctx().new_dynamic_size(min=1))


def steps_and_rows(packed) -> tuple[Tensor, Tensor, Tensor]:
    """(t, row, lengths) of a PackedSequence: its data's element k is step t[k] of batch row row[k] ([N]
    int64 each, on the data's device); lengths [B] int64 on the CPU, in the batch's original order."""
    batch_sizes = packed.batch_sizes
    lengths = packed_lengths(batch_sizes)
    ends = batch_sizes.cumsum(0)
    k = torch.arange(packed.data.shape[0])
    t = torch.searchsorted(ends, k, right=True)
    b = (k - (ends - batch_sizes)[t]).to(packed.data.device)
    t = t.to(packed.data.device)
    if packed.sorted_indices is None:
        return t, b, lengths
    return t, packed.sorted_indices[b], lengths[packed.unsorted_indices.cpu()]


def padded(packed, t: Tensor, row: Tensor, batch) -> Tensor:
    """The PackedSequence's data as a zero-padded [T, B, *] tensor, rows in the batch's original order."""
    data = packed.data
    x = data.new_zeros((packed.batch_sizes.shape[0], batch) + data.shape[1:])
    return x.index_put((t, row), data)
