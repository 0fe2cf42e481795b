"""Checks for the integer parameters of the mask factories."""
import numbers


# masks run on int32 positions (as torch's FlexAttention's do): a larger parameter would wrap in
# the mask while the planner's hint (a window, a prefix) keeps it whole, two different masks
MAX_PARAMETER = 2**31 - 1


def _integer(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if int(value) > MAX_PARAMETER:
        instead = "; for no window use get_mask_fn('causal')" if "window" in name else ""
        raise ValueError(f"{name} must be at most 2**31 - 1 (masks compare int32 positions, as torch's FlexAttention "
                         f"does), got {int(value)}{instead}")
    return int(value)


def positive_int(name, value):
    value = _integer(name, value)
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def non_negative_int(name, value):
    value = _integer(name, value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value
