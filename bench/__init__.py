"""jsoft's benchmark, a runnable package: ``python -m bench --help``.

``peers`` holds every implementation compared, ``cases`` the cases and their
inputs, ``timing`` the measurement, ``report`` the table, targets, JSON and
chart, ``cli`` the command line.
"""
