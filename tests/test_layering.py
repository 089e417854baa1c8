"""The package's layering (docs/design.md, Layers): no module imports a layer above its own, and nothing outside
drafts/ and the export formats names a draft kind."""

import ast
import re
from pathlib import Path

import eagle_trainer

PACKAGE = Path(eagle_trainer.__file__).parent

# bottom to top; a unit may import its own layer's modules only within itself, and any lower layer
LAYERS = [
    {"kernels", "types", "config"},
    {"registry"},
    {"drafts", "data", "parallel"},
    {"targets"},
    {"checkpoint", "flops", "metrics"},
    {"evaluate", "export", "trainer"},
    {"app"},
    {"train", "__init__"},  # entry points: `python -m eagle_trainer.train`, the package
]
LAYER = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(path: Path) -> set[str]:
    """The eagle_trainer units a file imports (at module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "eagle_trainer":
            if node.module == "eagle_trainer":
                found |= {alias.name for alias in node.names}
            else:
                found.add(unit_of(node.module))
        elif isinstance(node, ast.Import):
            found |= {unit_of(a.name) for a in node.names if a.name.startswith("eagle_trainer.")}
    return found


def test_every_unit_has_a_layer():
    units = {unit_of(".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts)) for p in PACKAGE.rglob("*.py")}
    assert units <= set(LAYER), f"units without a layer: {sorted(units - set(LAYER))}"


def test_no_module_imports_a_layer_above_it():
    upward = []
    for path in PACKAGE.rglob("*.py"):
        unit = unit_of(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))
        for other in imports(path) - {unit}:
            if LAYER[other] >= LAYER[unit]:
                upward.append(f"{path.relative_to(PACKAGE.parent)} imports {other}")
    assert not upward, upward


def test_kernels_import_torch_and_triton_only():
    for path in (PACKAGE / "kernels").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("eagle_trainer"):
                assert node.module.startswith("eagle_trainer.kernels"), (path, node.module)


def test_only_drafts_and_export_formats_name_a_draft_kind():
    """The trainer, the evaluator, IO and the app look a kind up in the registry; they never test for one."""
    kind = re.compile(r"Eagle[13](Draft|Config)|\bisinstance\([^)]*Draft|algorithm\s*==|['\"]eagle[123]['\"]")
    allowed = {PACKAGE / "drafts", PACKAGE / "export"}
    named = []
    for path in PACKAGE.rglob("*.py"):
        if any(parent in allowed for parent in path.parents) or path.name == "config.py":
            continue  # config.py: the recipe default, draft.algorithm = "eagle3"
        named += [f"{path.relative_to(PACKAGE.parent)}:{i + 1}: {line.strip()}"
                  for i, line in enumerate(path.read_text().splitlines()) if kind.search(line)]
    assert not named, named


def test_parallel_names_no_concrete_model():
    for path in (PACKAGE / "parallel").rglob("*.py"):
        assert not re.search(r"Qwen|Llama", path.read_text()), path
