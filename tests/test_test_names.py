"""The rule every test's function symbols follow (``conftest.function_symbols_cannot_collide``
applies it to each function a test starts): eKuiper's function socket is
``/tmp/func_<symbol>.ipc`` whatever the plugin, so a symbol must carry the test's ``unique``
token, and no two tests may start the same symbol."""
from __future__ import annotations

from plugins import function_symbol_problem


def test_a_fixed_function_name_is_refused_whatever_the_plugin_is_called(unique):
    problem = function_symbol_problem("revert", "test_a", {})
    assert problem == ("function symbol 'revert' of test_a has no token of the `unique` fixture: its "
                       "socket /tmp/func_revert.ipc is the same in every test and job that uses the name")


def test_two_tests_cannot_start_the_same_function_symbol(unique):
    owners: dict = {}
    assert function_symbol_problem(f"revert_{unique}", "test_a", owners) == ""
    assert function_symbol_problem(f"revert_{unique}", "test_a", owners) == ""  # again: a restart
    assert function_symbol_problem(f"revert_{unique}", "test_b", owners) == (
        f"function symbol 'revert_{unique}' of test_b is also started by test_a")


def test_the_check_is_applied_to_every_function_a_test_starts(tmp_path, unique):
    """Without starting anything: the emulator's start_function is the checked one."""
    from kuiper_pool.tools.emulator import Host

    assert Host.start_function.__qualname__.startswith("function_symbols_cannot_collide")
