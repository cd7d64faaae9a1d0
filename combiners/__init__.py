"""The shipped post-hoc combiners, one module each. This explicit list is the combiner registry's import list:
add a module here (or register your own from a file with `bench combine --plugin`; docs/ADDING_A_METHOD.md)."""
from combiners import model_stock, soup, wise  # noqa: F401
