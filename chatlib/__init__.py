"""Shared library of the chat server: protocol, IPC, processes."""

__version__ = "0.1.0"
