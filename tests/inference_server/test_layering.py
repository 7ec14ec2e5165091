"""The shared package only shares: nothing in inference_server/ imports another project package.

Every service imports inference_server; were it to import a service back (even inside a
function, where no import-time cycle shows it), the layers would knot and a service would drag
the others in. Read from the source with `ast`, so imports never run are checked too.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_PACKAGE = "inference_server"


def _project_packages() -> set[str]:
    """Every top-level package of the repository, so a package added later is covered too."""
    return {init.parent.name for init in REPO_ROOT.glob("*/__init__.py")}


def _imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every absolute import, and of `importlib.import_module("...")` calls."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id)
            in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return found


def _relative_imports_leaving(tree: ast.AST, depth: int) -> list[int]:
    """Lines of relative imports that climb above inference_server/ (`depth` = folders below it)."""
    return [
        node.lineno for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level > depth + 1
    ]


def test_the_shared_package_imports_no_other_project_package() -> None:
    others = _project_packages() - {SHARED_PACKAGE}
    assert {"private_api", "public_api", "job_consumer", "models_examples"} <= others  # sanity
    modules = sorted((REPO_ROOT / SHARED_PACKAGE).rglob("*.py"))
    assert modules, "no modules found: the test looks in the wrong place"
    offences = []
    for module in modules:
        tree = ast.parse(module.read_text(encoding="utf-8"), filename=str(module))
        where = module.relative_to(REPO_ROOT)
        offences += [
            f"{where}:{line} imports {name}"
            for line, name in _imported_modules(tree)
            if name.split(".")[0] in others
        ]
        depth = len(module.relative_to(REPO_ROOT / SHARED_PACKAGE).parts) - 1
        climbing = _relative_imports_leaving(tree, depth)
        offences += [f"{where}:{line} imports from above inference_server/" for line in climbing]
    assert not offences, "inference_server/ must import only itself and libraries:\n" + "\n".join(offences)


def test_the_check_sees_imports_hidden_in_functions() -> None:
    source = (
        "def f():\n    from private_api.db import make_engine\n"
        "def g():\n    import job_consumer.runner\n"
        "import importlib\nimportlib.import_module('public_api.main')\n"
    )
    names = {name for _line, name in _imported_modules(ast.parse(source))}
    assert names == {"private_api.db", "job_consumer.runner", "importlib", "public_api.main"}
