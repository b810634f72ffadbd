"""Placeholder: structural tiling passes (issue 3)."""


def tiling_passes(target):
    return []
