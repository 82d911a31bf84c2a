"""The ground floor that ``evolve``, ``serve`` and ``router`` all stand on: config files, atomic writes, the engine
key and Bearer checks, and the user-error base class.

It imports nothing of ``evolve``, ``serve`` or ``router``, and nothing heavier than pydantic and PyYAML (never
torch): the router, which must not import torch, uses it too.
"""
