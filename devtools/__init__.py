"""Tools for developing cachefs, kept out of the installed package (pyproject's
``packages.find`` takes ``cachefs*`` only): the throw-away OpenSSH server that the tests,
the benchmarks and the demo share (``devserver``), and the demo itself (``demo``, run as
``python -m devtools.demo`` from the repository, or ``scripts/run demo``).

Import them from a checkout: the tests (pytest puts the repository first on ``sys.path``),
``bench/*.py`` (which insert it) and ``scripts/run`` (which sets ``PYTHONPATH``).
"""
