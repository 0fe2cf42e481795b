"""A captured tensor that follows the device of the indices reading it (one copy per device)."""
import torch


def follow_device(tensor: torch.Tensor):
    copies = {tensor.device: tensor}

    def on(device) -> torch.Tensor:
        if device not in copies:
            copies[device] = tensor.to(device)
        return copies[device]

    return on
