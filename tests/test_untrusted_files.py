"""Files from elsewhere: what loading them may execute.

* A quantized model's `.keras` file loads in Keras' safe mode, without
  custom_objects: nothing in it needs Python bytecode to come back.
* A `.keras` file holding a `Lambda` layer (Python bytecode) is refused in
  safe mode, by Keras and by the export CLI, which loads in safe mode unless
  given `--unsafe`.
* No module of the package calls eval/exec/compile or unpickles anything
  (a static check with `ast`, itself tested on small sources).
"""

import ast
import json
import pathlib
import textwrap
import zipfile

import keras
import numpy as np
import pytest

import mq_keras as mqk
from mq_keras import export

PACKAGE = pathlib.Path(mqk.__file__).resolve().parent
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _cnn(with_lambda=False):
    inp = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, name="c1")(inp)
    if with_lambda:
        x = keras.layers.Lambda(lambda t: 2.0 * t, name="double")(x)
    x = keras.layers.Flatten(name="flat")(x)
    return keras.Model(inp, keras.layers.Dense(3, name="fc")(x), name="cnn")


def _data(n=4):
    rng = np.random.default_rng(0)
    return (rng.normal(size=(n, 8, 8, 1)).astype("float32"),
            rng.integers(0, 3, size=n))


def _trained(float_model):
    """Quantizes, compiles with a meta optimizer and fits one tiny batch."""
    q = mqk.quantize_model(float_model, verbose=False)
    q.compile(optimizer=keras.optimizers.SGD(0.01),
              meta_optimizer=mqk.PaperAdam(1e-3), loss=LOSS)
    x, y = _data()
    q.fit(x, y, batch_size=4, epochs=1, verbose=0)
    return q


def _saved_config(path):
    with zipfile.ZipFile(path) as archive:
        return archive.read("config.json").decode()


@pytest.fixture(scope="module")
def lambda_file(tmp_path_factory):
    """A saved MetaQuantModel whose graph holds a Lambda layer, and the model."""
    q = _trained(_cnn(with_lambda=True))
    path = tmp_path_factory.mktemp("lambda") / "lambda.keras"
    q.save(path)
    return path, q


# ------------------------------------------------------- (a) safe files load
def test_quantized_model_file_loads_in_safe_mode(tmp_path):
    q = _trained(_cnn())
    path = tmp_path / "q.keras"
    q.save(path)
    assert "__lambda__" not in _saved_config(path)
    x, _ = _data()
    for loaded in (keras.models.load_model(path),  # default: safe_mode=True
                   keras.models.load_model(path, safe_mode=True)):
        assert isinstance(loaded, mqk.MetaQuantModel)
        assert loaded.meta_optimizer is not None
        np.testing.assert_array_equal(loaded.predict(x, verbose=0),
                                      q.predict(x, verbose=0))


# ------------------------------------------ (b) bytecode is refused by default
def test_lambda_layer_passes_through_quantize_and_strip(lambda_file):
    _, q = lambda_file
    assert [w.layer.name for w in q.wrappers] == ["c1", "fc"]
    assert isinstance(q.quantized_model.get_layer("double"), keras.layers.Lambda)
    x, _ = _data()
    np.testing.assert_allclose(mqk.strip_model(q).predict(x, verbose=0),
                               q.predict(x, verbose=0), atol=1e-5)


def test_lambda_file_is_refused_in_safe_mode(lambda_file):
    path, q = lambda_file
    assert "__lambda__" in _saved_config(path)
    for kwargs in ({}, {"safe_mode": True}):
        with pytest.raises(ValueError, match=r"deserialization of a `Lambda` layer.*"
                           r"passing `safe_mode=False`"):
            keras.models.load_model(path, **kwargs)
    # Our own file: explicitly unsafe loading works.
    loaded = keras.models.load_model(path, safe_mode=False)
    x, _ = _data()
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), q.predict(x, verbose=0))


def test_export_cli_refuses_lambda_file_by_default(lambda_file, tmp_path):
    path, _ = lambda_file
    out = tmp_path / "m.tflite"
    with pytest.raises(ValueError, match=r"(?s)deserialization of a `Lambda` layer.*"
                       r"loads '.*lambda\.keras' in safe mode; if you made or "
                       r"trust this file, rerun with --unsafe"):
        export._main([str(path), str(out), "--mode", "float"])
    assert not out.exists()


def test_export_cli_unsafe_flag_loads_lambda_file(lambda_file, tmp_path, capsys):
    path, q = lambda_file
    out = tmp_path / "m.tflite"
    assert export._main([str(path), str(out), "--mode", "float", "--unsafe"]) == 0
    assert "wrote" in capsys.readouterr().out
    x, _ = _data()
    report = mqk.verify_tflite(q, out.read_bytes(), x)
    assert report["top1_agreement"] == 1.0


@pytest.mark.parametrize("flags,safe_mode", [([], True), (["--unsafe"], False)])
def test_export_cli_passes_safe_mode_explicitly(tmp_path, monkeypatch, flags, safe_mode):
    path = tmp_path / "m.keras"
    path.write_bytes(b"")
    seen = {}

    class Stop(Exception):
        pass

    def fake_load_model(filepath, **kwargs):
        seen.update(kwargs, filepath=str(filepath))
        raise Stop

    monkeypatch.setattr(keras.saving, "load_model", fake_load_model)
    with pytest.raises(Stop):
        export._main([str(path), str(tmp_path / "m.tflite")] + flags)
    assert seen == {"filepath": str(path), "safe_mode": safe_mode}


def test_export_cli_help_explains_unsafe(capsys):
    with pytest.raises(SystemExit) as info:
        export._main(["--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--unsafe" in text and "safe_mode=False" in text
    assert "arbitrary code" in text and "only for files you made or trust" in text


# ------------------------------------------- (c) static check of the package
BANNED_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "joblib",
                  "marshal", "shelve"}
BUILTINS = {"eval", "exec", "compile"}
BANNED_ATTRIBUTES = {"read_pickle", "enable_unsafe_deserialization", "unsafe_load",
                     "func_load"}


def _dotted(node, aliases):
    """`a.b.c` of a Name/Attribute chain (aliases resolved), or None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    root = aliases.get(node.id, node.id)
    return ".".join([root] + parts[::-1])


def _keywords(call):
    """(name, value) of a call's keywords, `**{"literal": ...}` dicts included."""
    for kw in call.keywords:
        if kw.arg is not None:
            yield kw.arg, kw.value
        elif isinstance(kw.value, ast.Dict):
            for key, value in zip(kw.value.keys, kw.value.values):
                if isinstance(key, ast.Constant) and isinstance(key.value, str):
                    yield key.value, value


def _is_const(node, value):
    return isinstance(node, ast.Constant) and node.value is value


def find_unsafe_calls(source, filename="<string>"):
    """Returns `["file:line: what", ...]` for every unsafe construct in `source`.

    Flags: calls of the builtins eval/exec/compile (also through `builtins`,
    `getattr(builtins, ...)` or an alias such as `run = eval`); imports of
    pickle-like modules, marshal or shelve, and any use of them through an
    attribute chain (`np.compat.pickle.loads`) or a dynamic import;
    `allow_pickle=` anything but the constant False (np.load); `safe_mode=False`
    and `enable_unsafe_deserialization` (Keras), pandas' `read_pickle`, yaml's
    `unsafe_load`.
    """
    tree = ast.parse(source, filename)
    findings = []

    def flag(node, what):
        findings.append(f"{filename}:{node.lineno}: {what}")

    aliases = {}  # local name -> dotted origin, from imports
    bound = set()  # names the module binds itself (they shadow builtins)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name.split(".")[0]] = (
                    a.name if a.asname else a.name.split(".")[0])
                if a.name.split(".")[0] in BANNED_MODULES:
                    flag(node, f"import {a.name}")
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            for a in node.names:
                aliases[a.asname or a.name] = f"{module}.{a.name}"
                if module.split(".")[0] in BANNED_MODULES or a.name in BANNED_MODULES:
                    flag(node, f"from {module} import {a.name}")
                if module == "builtins" and a.name in BUILTINS:
                    flag(node, f"from builtins import {a.name}")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if node.col_offset == 0:
                bound.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            bound.add(node.id)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)

    def builtin_name(node):
        """The builtin eval/exec/compile that `node` refers to, or None."""
        if isinstance(node, ast.Name) and node.id in BUILTINS:
            if node.id not in aliases and node.id not in bound:
                return node.id
        name = _dotted(node, aliases) or ""
        for prefix in ("builtins.", "__builtins__."):
            if name.startswith(prefix) and name[len(prefix):] in BUILTINS:
                return name[len(prefix):]
        return None

    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and builtin_name(node.value):
            flag(node, f"alias of the builtin {builtin_name(node.value)}")
        if isinstance(node, (ast.Name, ast.Attribute)) and isinstance(node.ctx, ast.Load):
            name = _dotted(node, aliases) or ""
            if isinstance(node, ast.Attribute) and BANNED_MODULES & set(name.split(".")):
                flag(node, f"use of {name}")
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = _dotted(func, aliases) or ""
        last = name.rsplit(".", 1)[-1]
        if builtin_name(func):
            flag(node, f"call of the builtin {builtin_name(func)}")
        if last in BANNED_ATTRIBUTES:
            flag(node, f"call of {name}")
        if last in ("getattr", "__getattribute__") and len(node.args) >= 2:
            target = _dotted(node.args[0], aliases) or ""
            attr = node.args[1]
            if (isinstance(attr, ast.Constant) and attr.value in BUILTINS
                    and target in ("builtins", "__builtins__")):
                flag(node, f"getattr of the builtin {attr.value}")
        if last in ("__import__", "import_module") and node.args:
            arg = node.args[0]
            if not isinstance(arg, ast.Constant):
                flag(node, f"{last} of a computed module name")
            elif str(arg.value).split(".")[0] in BANNED_MODULES:
                flag(node, f"{last}({arg.value!r})")
        for key, value in _keywords(node):
            if key == "allow_pickle" and not _is_const(value, False):
                flag(node, f"{name or 'call'}(allow_pickle=...)")
            if key == "safe_mode" and _is_const(value, False):
                flag(node, f"{name or 'call'}(safe_mode=False)")
    return sorted(set(findings))


def _scan(directory):
    files = sorted(pathlib.Path(directory).rglob("*.py"))
    findings = []
    for path in files:
        findings += find_unsafe_calls(path.read_text(), str(path))
    return files, findings


def test_package_has_no_unsafe_calls():
    files, findings = _scan(PACKAGE)
    assert len(files) >= 10, files  # the scan really saw the package
    assert findings == []


UNSAFE = [
    "eval('1 + 1')",
    "exec('x = 1')",
    "code = compile('1', '<s>', 'eval')",
    "run = eval",
    "import builtins\nbuiltins.exec('x = 1')",
    "__builtins__.eval('1')",
    "from builtins import compile as c",
    "import builtins\nf = getattr(builtins, 'eval')",
    "import pickle",
    "import pickle as p\np.loads(b'')",
    "from pickle import loads",
    "from _pickle import loads",
    "import marshal",
    "from marshal import loads as l",
    "import shelve",
    "import dill",
    "import cloudpickle",
    "from cloudpickle import cloudpickle_fast",
    "import numpy as np\nnp.compat.pickle.loads(b'')",
    "__import__('pickle')",
    "import importlib\nimportlib.import_module('marshal')",
    "import importlib\nimportlib.import_module(name)",
    "import numpy as np\nnp.load('a.npy', allow_pickle=True)",
    "import numpy\nnumpy.load(f, allow_pickle=flag)",
    "from numpy import load\nload(f, allow_pickle=True)",
    "import numpy as np\nnp.load(f, **{'allow_pickle': True})",
    "import pandas as pd\npd.read_pickle('a.pkl')",
    "import keras\nkeras.models.load_model('m.keras', safe_mode=False)",
    "import keras\nkeras.config.enable_unsafe_deserialization()",
    "import yaml\nyaml.unsafe_load(text)",
    "def f(x):\n    return eval(x)",
]

SAFE = [
    "import re\nre.compile('x+')",
    "from re import compile\ncompile('x+')",
    "model.compile(optimizer='sgd')",
    "class M:\n    def compile(self):\n        return super().compile()",
    "import numpy as np\nnp.load('a.npy')",
    "import numpy as np\nnp.load('a.npy', allow_pickle=False)",
    "import ast\nast.literal_eval('[1]')",
    "model.evaluate(x)",
    "text = 'eval(exec(compile))'  # pickle.loads",
    "import keras\nkeras.saving.load_model(p, safe_mode=not unsafe)",
    "import keras\nkeras.saving.load_model(p, safe_mode=True)",
    "def f(compile=True):\n    return compile",
]


@pytest.mark.parametrize("source", UNSAFE)
def test_checker_flags_unsafe_source(source):
    assert find_unsafe_calls(source), source


@pytest.mark.parametrize("source", SAFE)
def test_checker_accepts_safe_source(source):
    assert find_unsafe_calls(source) == [], source


def test_checker_fails_on_a_file_that_unpickles(tmp_path):
    (tmp_path / "ok.py").write_text("import json\njson.loads('{}')\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "bad.py").write_text(textwrap.dedent("""\
        import json


        def load(path):
            import pickle
            with open(path, "rb") as f:
                return pickle.load(f)
    """))
    files, findings = _scan(tmp_path)
    assert len(files) == 2
    bad = str(tmp_path / "sub" / "bad.py")
    assert f"{bad}:5: import pickle" in findings
    assert f"{bad}:7: use of pickle.load" in findings
    assert json.dumps(findings)  # plain strings, printable in the assert above
