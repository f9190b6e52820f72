"""The doors and admission objects, written once for asyncio: the sync twins in ``backends/_sync/`` are
generated from these files by ``scripts/unasync.py`` (see its docstring for the rules)."""
