"""Fails the build when a name in ``jsoft.__all__`` has no API entry.

After reading every page, each public name must be a documented Python
object (an ``autofunction``/``autoclass`` entry) of the API reference;
a missing one is a warning, which ``sphinx -W`` turns into an error.
"""

from __future__ import annotations

from typing import Any

from sphinx.util import logging

import jsoft

logger = logging.getLogger(__name__)


def missing(documented: set[str]) -> list[str]:
  """The public names that no API entry documents."""
  return sorted(n for n in jsoft.__all__ if f"jsoft.{n}" not in documented)


def _check(app: Any, env: Any) -> None:
  del app
  documented = {name for name, *_ in env.get_domain("py").get_objects()}
  for name in missing(documented):
    logger.warning("jsoft.%s is in jsoft.__all__ but has no API entry "
                   "(add it to a page under docs/api/)", name,
                   type="jsoft", subtype="coverage")


def setup(app: Any) -> dict[str, Any]:
  app.connect("env-check-consistency", _check)
  return {"parallel_read_safe": True, "parallel_write_safe": True}
