"""jsoft's benchmark, a runnable package: ``python -m bench --help``.

``peers`` holds every implementation compared, ``cases`` the cases and their
inputs, ``timing`` the measurement, ``report`` the table and chart, ``cli``
the command line (the default run, and the commands ``options``, ``memory``,
``sharding``, ``experiments`` and ``plot``), ``_plumbing`` what they share:
tables, progress, optional imports and JSON.
"""
