"""A library mod's table follows the device of the indices reading it; a copy on another device
is made again after the table is written in place (a learned bias after an optimizer step), so
the reference backend and the backward never read a stale copy."""
import torch

from flex_flash_infer.mods._captured import follow_device


def test_a_copy_on_another_device_follows_in_place_writes():
    table = torch.arange(6.0)
    on = follow_device(table)
    assert on(table.device) is table
    first = on("meta")   # another device: a copy, made once while the table is unchanged
    assert first.device.type == "meta" and on("meta") is first
    with torch.no_grad():
        table.add_(1.0)
    assert on("meta") is not first and on(table.device) is table
