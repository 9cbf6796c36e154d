"""The one part of the build pyproject.toml cannot state stably: the optional C module.

``relay._speedups`` holds the per-chunk path in C: its byte scans, its metrics' binning,
the switches to llhttp and to the sink, the sink itself and the SSE tap's fast path
(``relay/speedups.py`` has them in Python too, and says which runs). ``optional``: where
no C compiler is found, the install goes on without it and the relay runs the Python
versions.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("relay._speedups", ["relay/_speedups.c"], optional=True)])
