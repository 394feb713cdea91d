"""The house rules that keep methods in their rooms (DESIGN §1): checked on the source, so a change that breaks one
fails here rather than in review."""

import ast
import re
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parents[1] / "fastdiff"
METHOD_NAME = re.compile(r"""(==|!=)\s*["'](agd|dmd2|sid|tscd|lcm|msd|boot|tadsr|uni|yonos)["']""")


def _sources(folder: Path = LIB):
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of the fastdiff modules ``path`` imports (relative imports resolved)."""
    package = ".".join(path.relative_to(LIB.parent).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package.rsplit(".", 1)[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return {n for n in names if n.startswith("fastdiff")}


def test_no_code_outside_methods_compares_against_a_method_name():
    found = [
        f"{p.relative_to(LIB.parent)}:{i}: {line.strip()}"
        for p in _sources()
        if "methods" not in p.relative_to(LIB).parts
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if METHOD_NAME.search(line)
    ]
    assert not found, "\n".join(found)


@pytest.mark.parametrize(
    "module, forbidden",
    [
        ("trainer.py", r"fastdiff\.methods\.(?!base\b)"),  # the trainer knows the method interface only
        (
            "recipe.py",
            r"fastdiff\.(trainer|methods|run|data|eval)\b",
        ),  # the inference side imports no training
        ("data.py", r"fastdiff\.eval\b"),  # training code never imports the benchmarks
        ("schedule.py", r"fastdiff\."),
        ("methods/losses.py", r"fastdiff\."),
    ],
)
def test_import_directions(module, forbidden):
    bad = sorted(n for n in _imports(LIB / module) if re.match(forbidden, n))
    assert not bad, f"{module} imports {bad}"


def test_methods_import_neither_the_trainer_nor_the_benchmarks():
    for path in _sources(LIB / "methods"):
        bad = sorted(n for n in _imports(path) if re.match(r"fastdiff\.(trainer|eval|run|cli)\b", n))
        assert not bad, f"{path.relative_to(LIB)} imports {bad}"


def test_gmm_harnesses_share_a_set_up_instead_of_importing_each_other():
    harnesses = {"bench_gmm", "sid_gmm", "agd_gmm"}
    for name in harnesses - {"bench_gmm"}:  # the bench may run the others; they never import each other
        imported = {
            n.split(".")[2] for n in _imports(LIB / "eval" / f"{name}.py") if n.startswith("fastdiff.eval.")
        }
        assert not imported & harnesses, f"{name} imports {imported & harnesses}"


def test_every_builtin_method_is_registered_with_its_section():
    import dataclasses

    from fastdiff.methods import registry

    rooms = {p.stem if p.is_file() else p.name for p in (LIB / "methods").iterdir()}
    assert {"dmd2", "sid", "tscd", "agd"} <= set(registry.names())
    homes = {}
    for name in registry.names():
        cls = registry.get(name)
        home = cls.__module__.split(".")[2]  # fastdiff.methods.<room>[.module]
        assert cls.__module__.startswith("fastdiff.methods.") and home in rooms, (name, cls.__module__)
        assert homes.setdefault(home, name) == name, f"room {home} holds {homes[home]} and {name}"
        assert cls.name == name and dataclasses.is_dataclass(cls.config)
        section = cls.config()  # the optimizer settings: its own optim, or those of the method it builds on
        nested = [getattr(section, f.name) for f in dataclasses.fields(section)]
        assert hasattr(section, "optim") or any(
            hasattr(v, "optim") for v in nested if dataclasses.is_dataclass(v)
        )
