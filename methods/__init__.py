"""The shipped methods, one module each (arf: a package, methods/arf/). This explicit list is the registry's
import list: add a module here (or register your own from a file with --plugin; see docs/ADDING_A_METHOD.md)."""
from methods import arf, car_ft, carot, erm, flyp, l2sp, lipsum_ft, lora, lp_ft, spd, wise_ft, zeroshot  # noqa: F401
