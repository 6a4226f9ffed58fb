"""The project's tools, and what they and the tests share.

A package: ``scripts`` in a clone, ``chat_tools`` once installed
(``pyproject.toml``). Its modules import each other relatively
(``from .harness import Server``), so they work under either name.

A tool run as a file, ``python3 scripts/stress.py``, is no module of a
package: such a tool starts with three lines that put the clone's root on
``sys.path`` and name its own folder as its package, and from there it is
``scripts.stress`` like any other. ``python3 -m scripts.stress`` and the
installed ``chat-stress`` skip those lines.
"""
