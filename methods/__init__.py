"""The shipped methods, one module each. This explicit list is the registry's import list:
add a module here (or register your own from a file with --plugin)."""
from methods import erm, zeroshot  # noqa: F401
