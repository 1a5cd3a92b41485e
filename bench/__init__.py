"""jsoft's benchmark, a runnable package: ``python -m bench --help``.

``peers`` holds every implementation compared, ``cases`` the cases and their
inputs, ``timing`` the measurement, ``report`` the table and chart, ``cli``
the command line: the default run, and the commands ``options``, ``tiles``,
``memory``, ``sharding``, ``experiments``, ``lm`` and ``plot`` (each in its
own module; ``flax_models`` holds the Flax models of ``experiments`` and
``lm``). ``_plumbing`` is what they share: tables, progress, optional
imports, the command line's common flags, JSON and chart files.
"""
