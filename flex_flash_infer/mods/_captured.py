"""A captured tensor that follows the device of the indices reading it (one copy per device)."""
import torch

from ..core.versions import copied_from, version_of


def follow_device(tensor: torch.Tensor):
    """on(device): the tensor on that device; a copy on another device is made again when the
    tensor was written in place since (a learned table after an optimizer step)."""
    copies = {}

    def on(device) -> torch.Tensor:
        device = torch.device(device)
        if device == tensor.device:
            return tensor
        if torch.compiler.is_compiling():
            # torch.compile is tracing the mod (torch's own flex_attention): the copy becomes part
            # of the compiled graph, so it is never stale; a kept copy would be baked in, and the
            # bookkeeping below (a weakref) breaks the graph, which sends torch's flex_attention to
            # its unfused path (the whole score matrix: far slower, out of memory on long sequences)
            return tensor.to(device)
        copy, version = copies.get(device, (None, None))
        if copy is None or version != version_of(tensor):
            copy = tensor.to(device)
            copied_from(copy, tensor)
            copies[device] = (copy, version_of(tensor))
        return copy

    return on
