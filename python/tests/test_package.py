"""The package's surface: the type stubs match the code, the report of the packer."""

import ast
import inspect
from pathlib import Path

import convnets

STUBS = Path(convnets.__file__).with_name("__init__.pyi")


def stub_functions():
    """{qualified name: [parameter names]} of the stubs' functions and methods."""
    tree = ast.parse(STUBS.read_text())
    found = {}
    for node in tree.body:
        members = node.body if isinstance(node, ast.ClassDef) else [node]
        for f in members:
            if isinstance(f, ast.FunctionDef):
                name = f"{node.name}.{f.name}" if isinstance(node, ast.ClassDef) else f.name
                args = f.args
                found[name] = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
    return found


def test_stubs_name_every_parameter_of_the_code():
    stubs = stub_functions()
    assert STUBS.with_name("py.typed").exists()
    for name, params in stubs.items():
        owner, _, attr = name.rpartition(".")
        obj = getattr(getattr(convnets, owner), attr) if owner else getattr(convnets, attr)
        if isinstance(obj, property):
            obj = obj.fget
        code = [p for p in inspect.signature(obj).parameters
                if inspect.signature(obj).parameters[p].kind not in (inspect.Parameter.VAR_POSITIONAL,)]
        assert [p for p in params if p != "exc"] == [p for p in code if p != "exc"], name
    for public in convnets.__all__:
        assert public in STUBS.read_text(), public


def test_pack_imagenet_reports_what_it_did(textured_dataset):
    report = __import__("json").loads((textured_dataset / "pack-report.json").read_text())
    assert report["splits"]["train"]["records"] == 36 and report["splits"]["train"]["shards"] == 3
    assert report["splits"]["val"]["records"] == 6 and report["files"] == []
