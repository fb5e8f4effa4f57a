"""The package's layers: every import, lazy ones included, points down.

From the bottom (docs/design.md, "Layers"): errors and constants → the input checks and
atomic files → checksummed checkpoints → the potentials and the integrator → the System
and its terms → the structured derivatives with the plain-MD gradient, the new
functional forms and the Verlet lists → io, the backends, the package data and the checks
of a starting structure → sensitivities → fitting → the main jobs (the NMR fit, the MD run) → the
command line and the benchmarks → ``python -m timemachine``. A module may import from its
own package and from any lower layer; packages of one layer do not import each other. Only
the main jobs and the layers above them may import the root facade (``import timemachine
as tm``), which re-exports the public API.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "timemachine"

LAYERS = [
    ["errors", "constants"],
    ["checks", "files", "precision"],
    ["checkpoints"],
    ["potentials", "integrator"],
    ["system"],
    ["structured", "forms", "neighbours"],
    ["io", "backends", "data", "start_checks"],
    ["sensitivity"],
    ["fitting"],
    ["config"],
    ["fit_job"],
    ["nmr_fit", "md_run", "sensitivity_jobs"],
    ["cli", "bench"],
    ["__main__"],
]
RANK = {unit: level for level, units in enumerate(LAYERS) for unit in units}
TOP = RANK["nmr_fit"]  # the main jobs and above may use the facade


def _module_name(path):
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _unit(module):
    """The layer unit of a module name: its sub-package or top-level module under
    ``timemachine``, or None for the root package itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def imports(path):
    """(line, imported module) of every timemachine import in ``path``, at any depth."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # ``from timemachine import fitting`` imports the submodule, not the facade
            names = [f"{base}.{a.name}" for a in node.names] if base == "timemachine" else [base]
        else:
            continue
        out += [(node.lineno, n) for n in names if n.split(".")[0] == "timemachine"]
    return out


def _is_submodule(name):
    parts = name.split(".")
    return len(parts) == 2 and ((ROOT / parts[1]).is_dir() or (ROOT / f"{parts[1]}.py").is_file())


MODULES = sorted(p for p in ROOT.rglob("*.py") if p != ROOT / "__init__.py")


def test_every_module_has_a_layer():
    units = {_unit(_module_name(p)) for p in MODULES}
    assert units <= set(RANK), f"modules with no layer: {sorted(units - set(RANK))}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: _module_name(p))
def test_imports_point_down(path):
    me = _unit(_module_name(path))
    bad = []
    for line, name in imports(path):
        target = _unit(name) if _is_submodule(name) or "." in name else None
        if name == "timemachine" or (target is None):
            if RANK[me] < TOP:
                bad.append(f"line {line}: {name} (the root facade; import the submodule)")
            continue
        if target == me:
            continue
        if target not in RANK:
            bad.append(f"line {line}: {name} (no layer)")
        elif RANK[target] >= RANK[me]:
            how = "up" if RANK[target] > RANK[me] else "sideways"
            bad.append(f"line {line}: {name} ({how}: {me} is layer {RANK[me]}, "
                       f"{target} layer {RANK[target]})")  # fmt: skip
    assert not bad, f"{_module_name(path)} imports against the layers:\n" + "\n".join(bad)


def test_the_scan_sees_lazy_and_relative_imports(tmp_path):
    """The checker itself: imports inside functions and relative imports are found."""
    pkg = tmp_path / "timemachine" / "io"
    pkg.mkdir(parents=True)
    f = pkg / "mod.py"
    f.write_text(
        "def f():\n    from timemachine.fitting import fit\n    from ..sensitivity import zeta\n"
    )
    global ROOT
    saved, ROOT = ROOT, tmp_path / "timemachine"
    try:
        found = [name for _, name in imports(f)]
    finally:
        ROOT = saved
    assert found == ["timemachine.fitting", "timemachine.sensitivity"]
