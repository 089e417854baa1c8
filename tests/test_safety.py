"""Loading never executes what a file brings: no pickle (but for the restricted unpickler that reads DCP's
checkpoint index, which admits only its metadata classes), torch.load only with weights_only=True, no eval/exec,
and every HF from_pretrained states trust_remote_code (the recipe's value, off by default)."""

import ast
from pathlib import Path

import eagle_trainer

PACKAGE = Path(eagle_trainer.__file__).parent
UNSAFE_MODULES = ("pickle", "dill", "marshal", "shelve")
# the one module that may import pickle: for an Unpickler subclass whose find_class admits only DCP's metadata
RESTRICTED_UNPICKLER = "checkpoint.py"


def scan(source: str, label: str) -> list[str]:
    """Every unsafe pattern in one Python source, as 'label:line: what'."""
    problems = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            unsafe = {n.split(".")[0] for n in names} & set(UNSAFE_MODULES)
            if unsafe - ({"pickle"} if label == RESTRICTED_UNPICKLER else set()):
                problems.append(f"{label}:{node.lineno}: imports {names}")
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        keywords = {k.arg: k.value for k in node.keywords}
        if name.split(".")[0] in UNSAFE_MODULES and name.split(".")[-1] in ("load", "loads"):
            problems.append(f"{label}:{node.lineno}: {name}()")
        if name in ("eval", "exec"):
            problems.append(f"{label}:{node.lineno}: {name}()")
        if name.endswith("torch.load"):
            flag = keywords.get("weights_only")
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                problems.append(f"{label}:{node.lineno}: torch.load without weights_only=True")
        if name.endswith("from_pretrained") and "trust_remote_code" not in keywords:
            problems.append(f"{label}:{node.lineno}: {name} without an explicit trust_remote_code")
    return problems


def test_no_unsafe_deserialisation_in_the_package():
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        problems += scan(path.read_text(), str(path.relative_to(PACKAGE)))
    assert not problems, "\n".join(problems)


def test_the_scan_flags_each_pattern():
    bad = ("import pickle\nimport torch\ntorch.load('x')\ntorch.load('x', weights_only=False)\n"
           "AutoModel.from_pretrained('p')\neval('1')\ntorch.load('x', weights_only=True)\n"
           "AutoModel.from_pretrained('p', trust_remote_code=cfg.trust_remote_code)\n")
    assert [p.split(":")[1] for p in scan(bad, "f")] == ["1", "3", "4", "5", "6"]


def test_the_restricted_unpickler_restricts():
    """The module allowed to import pickle uses it only for Unpickler subclasses that override find_class."""
    tree = ast.parse((PACKAGE / RESTRICTED_UNPICKLER).read_text())
    unpicklers = [node for node in ast.walk(tree) if isinstance(node, ast.ClassDef)
                  and any(ast.unparse(base) == "pickle.Unpickler" for base in node.bases)]
    assert unpicklers
    for cls in unpicklers:
        assert any(isinstance(f, ast.FunctionDef) and f.name == "find_class" for f in cls.body), cls.name
    uses = {ast.unparse(node) for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and ast.unparse(node.value) == "pickle"}
    assert uses <= {"pickle.Unpickler", "pickle.UnpicklingError"}, uses


def test_the_scan_flags_pickle_loads_even_where_pickle_may_be_imported():
    assert [p.split(":")[1] for p in scan("import pickle\npickle.loads(b'')\n", RESTRICTED_UNPICKLER)] == ["2"]
