"""The `trl` import alias (`llm_trainer.trl_alias`) and `llm_trainer.run`, in process."""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys

import pytest

import llm_trainer
from llm_trainer import trl_alias
from llm_trainer.run import run
from llm_trainer.trl_alias import MissingTwinError


@pytest.fixture
def alias(monkeypatch):
    """Install the alias for one test, then remove it and give back any real `trl` modules imported before."""
    saved = {name: module for name, module in sys.modules.items() if name == "trl" or name.startswith("trl.")}
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(sys, "path", list(sys.path))
    trl_alias.install()
    yield
    trl_alias.uninstall()
    sys.modules.update(saved)


def test_trl_modules_are_the_llm_trainer_modules(alias):
    import trl
    import trl.trainer.utils
    from trl import SFTConfig
    from trl.trainer.utils import pad

    assert trl is llm_trainer
    assert trl.trainer.utils is sys.modules["llm_trainer.trainer.utils"] is sys.modules["trl.trainer.utils"]
    assert SFTConfig is llm_trainer.SFTConfig and pad is llm_trainer.trainer.utils.pad
    assert llm_trainer.__spec__.name == "llm_trainer"  # the twin keeps its own identity
    assert importlib.import_module("trl.data_utils") is importlib.import_module("llm_trainer.data_utils")


def test_install_is_idempotent_and_replaces_an_earlier_trl(alias, monkeypatch):
    trl_alias.uninstall()
    monkeypatch.setitem(sys.modules, "trl", type(sys)("trl"))  # a real trl imported before the alias
    trl_alias.install()
    trl_alias.install()
    assert sum(isinstance(finder, trl_alias.TrlAliasFinder) for finder in sys.meta_path) == 1
    assert importlib.import_module("trl") is llm_trainer


def test_a_module_without_a_twin_raises_missing_twin_error(alias):
    with pytest.raises(MissingTwinError, match=r"`trl\.no_such_module` has no llm_trainer twin yet") as error:
        importlib.import_module("trl.no_such_module")
    assert isinstance(error.value, ImportError) and error.value.name == "trl.no_such_module"


def test_a_twin_failing_on_its_own_import_is_not_called_missing(alias, tmp_path, monkeypatch):
    package = tmp_path / "fake_twin"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "broken.py").write_text("import not_an_installed_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(trl_alias, "TARGET", "fake_twin")
    with pytest.raises(ModuleNotFoundError) as error:
        importlib.import_module("trl.broken")
    assert not isinstance(error.value, MissingTwinError) and error.value.name == "not_an_installed_dependency"
    for name in ("fake_twin", "fake_twin.broken"):
        sys.modules.pop(name, None)


def test_uninstall_removes_the_hook_and_the_trl_names(alias):
    import trl.trainer  # noqa: F401

    trl_alias.uninstall()
    assert not trl_alias.is_installed()
    assert not any(name == "trl" or name.startswith("trl.") for name in sys.modules)
    spec = importlib.util.find_spec("trl")
    assert spec is None or "llm_trainer" not in (spec.origin or "")  # back to the real package, if any


def test_pytest_plugin_installs_the_alias(alias):
    trl_alias.uninstall()
    trl_alias.pytest_configure(config=None)
    assert trl_alias.is_installed()


def test_run_executes_the_script_as_main_with_its_arguments(alias, tmp_path):
    (tmp_path / "helper.py").write_text("VALUE = 3\n")  # importable from the script's folder, as `python script.py`
    (tmp_path / "script.py").write_text(
        "import json, sys\nimport trl, llm_trainer\nimport helper\n"
        "if __name__ == '__main__':\n"
        "    json.dump({'argv': sys.argv, 'same': trl.SFTConfig is llm_trainer.SFTConfig, 'helper': helper.VALUE},"
        " open(sys.argv[2], 'w'))\n"
    )
    out = tmp_path / "seen.json"
    run([str(tmp_path / "script.py"), "--flag", str(out)])
    assert json.loads(out.read_text()) == {
        "argv": [str(tmp_path / "script.py"), "--flag", str(out)],
        "same": True,
        "helper": 3,
    }


def test_run_a_module(alias, tmp_path, monkeypatch):
    (tmp_path / "my_train.py").write_text(
        "import sys, trl\nif __name__ == '__main__':\n    open(sys.argv[1], 'w').write(trl.__name__)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    run(["-m", "my_train", str(tmp_path / "seen.txt")])
    assert (tmp_path / "seen.txt").read_text() == "llm_trainer"
    with pytest.raises(MissingTwinError, match=r"`trl\.scripts\.no_such_script` has no llm_trainer twin"):
        run(["-m", "trl.scripts.no_such_script"])


def test_a_missing_name_is_named_as_trl_s(alias, tmp_path):
    (tmp_path / "script.py").write_text("from trl.trainer.utils import (\n    pad,\n    no_such_helper,\n)\n")
    with pytest.raises(MissingTwinError) as error:
        run([str(tmp_path / "script.py")])
    message = str(error.value)
    assert "`trl.trainer.utils.no_such_helper` has no llm_trainer twin yet" in message
    assert "`llm_trainer.trainer.utils` has no `no_such_helper`" in message
    assert error.value.__traceback__ is not None
    import trl

    assert not hasattr(trl, "NoSuchTrainer")  # attribute lookups stay plain AttributeErrors


def test_a_missing_name_imported_from_llm_trainer_keeps_python_s_error(alias, tmp_path):
    (tmp_path / "script.py").write_text("from llm_trainer import NoSuchTrainer\n")
    with pytest.raises(ImportError, match="cannot import name 'NoSuchTrainer' from 'llm_trainer'") as error:
        run([str(tmp_path / "script.py")])
    assert not isinstance(error.value, MissingTwinError)


def test_run_usage_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run([])
    assert exit_info.value.code == 2 and "usage: llm-trainer run SCRIPT.py" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no script at"):
        run([str(tmp_path / "absent.py")])
    with pytest.raises(SystemExit, match="-m needs a module name"):
        run(["-m"])
