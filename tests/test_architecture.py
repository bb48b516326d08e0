"""The shape of the library: shallow trainer hierarchies, plain classes, no import cycles, and one registry of
algorithms that the API, the CLI and the docs agree with."""

from __future__ import annotations

import abc
import ast
import inspect
import re
from pathlib import Path

import pytest
from transformers import Trainer

import llm_trainer
from llm_trainer import GRPOTrainer, get_algorithm, list_algorithms
from llm_trainer.registry import ALGORITHMS
from llm_trainer.scripts import _training
from llm_trainer.trainer.base_trainer import BaseTrainer

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "llm_trainer"


def own_depth(trainer_class: type) -> list[str]:
    """The llm_trainer classes in the MRO from `trainer_class` up to `transformers.Trainer` (mixins included)."""
    mro = trainer_class.__mro__
    return [klass.__name__ for klass in mro[: mro.index(Trainer)] if klass.__module__.startswith("llm_trainer.")]


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_trainer_hierarchy_is_at_most_three_of_our_classes_deep(name):
    classes = own_depth(get_algorithm(name))
    assert len(classes) <= 3, f"{name}: {' -> '.join(classes)} -> Trainer"


def test_trainers_are_plain_classes_whose_signature_is_the_constructors():
    for trainer_class in [BaseTrainer, *map(get_algorithm, ALGORITHMS)]:
        assert type(trainer_class) is type, f"{trainer_class.__name__} has a metaclass"
        assert not any("__signature__" in vars(klass) for klass in trainer_class.__mro__)
        expected = list(inspect.signature(trainer_class.__init__).parameters)[1:]
        assert list(inspect.signature(trainer_class).parameters) == expected


def test_a_user_trainer_can_mix_in_an_abc():
    class Describes(abc.ABC):
        @abc.abstractmethod
        def describe(self) -> str: ...

    class MyTrainer(GRPOTrainer, Describes):
        def describe(self) -> str:
            return "mine"

    trainer = MyTrainer.from_pretrained("some/model")
    assert isinstance(trainer, Describes) and trainer.describe() == "mine" and trainer.config.num_generations == 16
    pending = MyTrainer({"policy": {"model_name_or_path": "some/model"}, "grpo": {"beta": 0.2}})
    assert type(pending) is MyTrainer and pending.config.beta == 0.2

    class Incomplete(GRPOTrainer, Describes):
        pass

    with pytest.raises(TypeError, match="abstract"):
        Incomplete.from_pretrained("some/model")


def test_the_dict_forms_section_is_the_registered_name():
    teacher = get_algorithm("teacher_grpo")
    pending = teacher({"policy": {"model_name_or_path": "some/model"}, "teacher_grpo": {"beta": 0.0}})
    assert type(pending) is teacher and pending.config.beta == 0.0
    ppo = get_algorithm("ppo").from_dict({"policy": {"model": "some/model"}, "ppo": {"total_episodes": 8}})
    assert type(ppo) is get_algorithm("ppo") and ppo.config.total_episodes == 8 and ppo.current_step == 0


# ----------------------------------------------------------------------------------------------- imports
def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_level_imports(path: Path, name: str, modules: set[str]) -> set[str]:
    """The llm_trainer modules `path` imports when it is imported (not inside functions or `TYPE_CHECKING`)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.If):
                if "TYPE_CHECKING" not in ast.unparse(node.test):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body])
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names if alias.name in modules)
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    submodule = f"{target}.{alias.name}"
                    found.add(submodule if submodule in modules else target)

    visit(ast.parse(path.read_text()).body)
    return (found & modules) - {name}


def test_no_module_level_import_cycle():
    paths = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {name: _module_level_imports(path, name, set(paths)) for name, path in paths.items()}
    done: set[str] = set()

    def visit(name: str, trail: list[str]) -> None:
        if name in trail:
            raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(name) :] + [name]))
        if name not in done:
            for imported in sorted(graph[name]):
                visit(imported, [*trail, name])
            done.add(name)

    for name in sorted(graph):
        visit(name, [])


# ----------------------------------------------------------------------------------------------- one registry
def test_registry_api_cli_and_docs_agree():
    names = sorted(ALGORITHMS)
    assert list_algorithms() == names and "distillation" in names
    assert _training.TRAINERS == [name for name in names if ALGORITHMS[name].cli]
    for name in names:
        trainer_class = get_algorithm(name)
        assert getattr(llm_trainer, trainer_class.__name__) is trainer_class
        assert getattr(llm_trainer, trainer_class.config_class.__name__) is trainer_class.config_class
    doc = (ROOT / "docs" / "simple_api.md").read_text()
    rows = re.findall(r"^\| `(\w+)` \| `(\w+)` \| (.+) \|$", doc, re.M)
    assert [(name, trainer) for name, trainer, _ in rows] == [(name, ALGORITHMS[name].trainer) for name in names]
    assert all(cli.startswith("yes") == ALGORITHMS[name].cli for name, _, cli in rows)
