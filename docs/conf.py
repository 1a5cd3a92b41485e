"""Sphinx configuration for the jsoft documentation.

Sphinx with MyST Markdown, autodoc/autosummary and napoleon, as jax, optax
and flax build theirs: the API pages come from the Google-style docstrings.
The build needs no network: no intersphinx, and MathJax is served from the
built site (sphinx-mathjax-offline).
"""

import pathlib
import sys

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))  # jsoft from this checkout
sys.path.insert(0, str(DOCS / "ext"))

import jsoft  # noqa: E402

project = "jsoft"
release = version = jsoft.__version__
author = "the jsoft authors"
copyright = author  # noqa: A001

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",
    "coverage_check",
    "bench_results",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "ext", "README.md"]
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3

autodoc_typehints = "description"
# Keep jax.typing.ArrayLike as one name, not its expansion into a union.
autodoc_type_aliases = {"jax.typing.ArrayLike": "jax.typing.ArrayLike",
                        "ArrayLike": "jax.typing.ArrayLike"}
autodoc_member_order = "bysource"
autosummary_generate = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "sphinx_book_theme"
html_title = "jsoft"
html_theme_options = {
    "show_toc_level": 2,
    "navigation_with_keys": False,
}
html_static_path = ["_static"]
html_css_files = ["jsoft.css"]

# Results files that no page renders, and why. Every other file in
# bench/results/ must appear in a ```{bench-results}``` directive.
bench_results_unrendered = {
    "loss_rule_before.json": "history: quoted in CHANGELOG.md",
    "loss_rule_after.json": "history: quoted in CHANGELOG.md",
}

# Every cross-reference must resolve (-W fails the build on one that does
# not), except to libraries without an offline inventory and to jsoft's
# private modules, which the docstrings name for the curious reader.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"'?(jax|jaxlib|numpy|optax|torch|chex)(\..*)?'?"),
    (r"py:class", r"TypeAliasForwardRef"),  # a type alias autodoc kept
    (r"py:.*", r"jsoft\._.*"),
]
