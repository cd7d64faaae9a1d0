import pytest

from bench.errors import BenchError
from bench.method import METHODS, Method, load_builtin_methods, register_method
from bench.registry import Registry


def test_register_sets_name_and_get_returns_it():
    reg = Registry("thing")

    @reg.register("alpha")
    class Alpha:
        pass

    assert reg.get("alpha") is Alpha and Alpha.name == "alpha" and "alpha" in reg


def test_duplicate_names_raise():
    reg = Registry("thing")
    reg.register("alpha")(type("A", (), {}))
    with pytest.raises(BenchError, match="already registered"):
        reg.register("alpha")(type("B", (), {}))


def test_unknown_name_lists_close_matches_and_all_names():
    reg = Registry("method")
    for name in ("erm", "wise_ft", "flyp"):
        reg.register(name)(type(name, (), {}))
    with pytest.raises(BenchError) as err:
        reg.get("wiseft")
    msg = str(err.value)
    assert "did you mean 'wise_ft'" in msg and "known: erm, flyp, wise_ft" in msg and "\n" not in msg


def test_builtin_methods_registered_and_a_duplicate_method_raises():
    load_builtin_methods()
    assert {"erm", "zeroshot"} <= set(METHODS)
    with pytest.raises(BenchError, match="already registered"):
        @register_method("erm")
        class Other(Method):
            pass
