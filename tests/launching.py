"""Shared pieces of the tests that launch training processes: free ports and tiny synthetic datasets."""

import socket


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def write_tiny_datasets(root, **synthetic_options):
    """Two tiny synthetic datasets under ``root``: rating actions in ``rating/``, 8-bit action masks in ``bitmask/``."""
    from hstu.data.synthetic import write_synthetic

    write_synthetic(str(root / "rating"), show_progress=False, **synthetic_options)
    write_synthetic(str(root / "bitmask"), show_progress=False, actions="bitmask", **synthetic_options)
    return root
