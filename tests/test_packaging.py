"""The runtime's dependency set stays torch-free: checked in the package metadata, not by eye.

The consumer image installs ``depois-stream`` without extras, so whatever the base requirements
pull in (transitively) ends up in every pod. These tests read the requirements from
pyproject.toml and from the installed distribution's metadata, walk the installed dependency
graph, import the runtime with the training libraries made unimportable, and read the runtime
Dockerfile's install lines.
"""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "deploy" / "docker" / "Dockerfile.runtime"
# Training-only libraries: extras (train/report/eval), never runtime requirements.
TRAINING_ONLY = {"torch", "onnx", "onnxscript", "scikit-learn", "mlxtend", "tqdm", "matplotlib",
                 "cleanlab", "torchvision"}
TRAINING_MODULES = ("torch", "onnx", "onnxscript", "sklearn", "mlxtend", "tqdm", "matplotlib",
                    "training")

requirements = pytest.importorskip("packaging.requirements", reason="needs `packaging`")
Requirement = requirements.Requirement


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11+")
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _applies(req: "Requirement", extra: str = "") -> bool:
    return req.marker is None or req.marker.evaluate({"extra": extra})


def _installed_base_requirements() -> list["Requirement"]:
    try:
        reqs = metadata.requires("depois-stream") or []
    except metadata.PackageNotFoundError:
        pytest.skip("depois-stream is not installed (pip install -e .)")
    return [r for r in map(Requirement, reqs) if _applies(r)]


def runtime_closure() -> tuple[set[str], set[str]]:
    """(installed distributions the base requirements pull in, requirements not installed)."""
    seen: set[str] = set()
    missing: set[str] = set()
    todo = [r for r in _installed_base_requirements()]
    while todo:
        req = todo.pop()
        name = _norm(req.name)
        if name in seen or name in missing:
            continue
        try:
            reqs = metadata.requires(req.name) or []
        except metadata.PackageNotFoundError:
            missing.add(name)  # e.g. onnxruntime (CPU) on a machine that has onnxruntime-gpu
            continue
        seen.add(name)
        todo += [r for r in map(Requirement, reqs) if _applies(r)]
    return seen, missing


def test_base_dependencies_in_pyproject_are_torch_free() -> None:
    project = _pyproject()
    base = {_norm(Requirement(r).name) for r in project["dependencies"]}
    assert not base & TRAINING_ONLY, f"training libraries in the runtime dependencies: {base & TRAINING_ONLY}"
    extras = project["optional-dependencies"]
    train = {_norm(Requirement(r).name) for r in extras["train"]}
    assert {"torch", "onnx", "onnxscript", "scikit-learn", "mlxtend", "tqdm", "matplotlib"} <= train
    signing = {_norm(Requirement(r).name) for r in extras["signing"]}
    assert signing == {"model-signing", "pyopenssl"} and not signing & base


def test_installed_metadata_matches_pyproject() -> None:
    """Otherwise the closure test below would judge a stale install."""
    installed = sorted(str(r) for r in _installed_base_requirements())
    declared = sorted(str(Requirement(r)) for r in _pyproject()["dependencies"]
                      if _applies(Requirement(r)))
    assert installed == declared, "stale install: run pip install -e '.[dev]' again"


def test_runtime_dependency_closure_has_no_training_library() -> None:
    closure, missing = runtime_closure()
    assert "onnxruntime-gpu" in closure or "onnxruntime" in closure
    assert {"numpy", "kafka-python", "pydantic", "prometheus-client"} <= closure
    assert not closure & TRAINING_ONLY, f"pulled in by the runtime: {closure & TRAINING_ONLY}"
    # Only platform alternatives may be absent (the walk is otherwise complete).
    assert missing <= {"onnxruntime", "onnxruntime-gpu"}, missing


def test_runtime_imports_with_training_libraries_blocked() -> None:
    """The consumer, scorer, CLI and signing modules import without torch, onnx or sklearn."""
    block = "; ".join(f"sys.modules[{m!r}] = None" for m in TRAINING_MODULES)
    code = (f"import sys; {block}\n"
            "import depois_stream.cli, depois_stream.filter.app, depois_stream.filter.detector\n"
            "import depois_stream.contract.signing, depois_stream.audit.replay\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_signing_module_imports_without_model_signing_and_says_what_to_install(tmp_path: Path) -> None:
    code = ("import sys; sys.modules['model_signing'] = None\n"
            "from depois_stream.contract.signing import SignatureError, verify_model, sign_model\n"
            "for call in (lambda: verify_model('m.onnx', 'k.pub'), lambda: sign_model('m.onnx', 'k.pem')):\n"
            "    try:\n"
            "        call()\n"
            "    except SignatureError as e:\n"
            "        print(e.kind, e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=tmp_path)
    lines = out.stdout.splitlines()
    assert out.returncode == 0 and len(lines) == 2, out.stderr[-2000:]
    assert all(l.startswith("unavailable ") and "pip install 'depois-stream[signing]'" in l
               for l in lines)


def _stages(text: str) -> dict[str, str]:
    """Dockerfile text per stage name (``FROM ... AS name``), continuation lines joined."""
    text = re.sub(r"\\\n", " ", text)
    stages: dict[str, str] = {}
    name = None
    for line in text.splitlines():
        m = re.match(r"\s*FROM\s+\S+(?:\s+AS\s+(\S+))?", line, re.IGNORECASE)
        if m:
            name = m.group(1) or f"stage{len(stages)}"
            stages[name] = ""
        if name is not None:
            stages[name] += line + "\n"
    return stages


def test_runtime_image_installs_no_training_extra() -> None:
    stages = _stages(DOCKERFILE.read_text())
    assert {"runtime", "demo"} <= stages.keys()
    for name, body in stages.items():
        installs = " ".join(re.findall(r"pip install ([^\n&]+)", body))
        assert installs, f"stage {name} installs nothing?"
        assert not re.search(r"\[[^\]]*\b(train|eval)\b", installs), f"{name}: {installs}"
        assert "torch" not in installs.replace("find_spec('torch')", ""), f"{name}: {installs}"
        # Every stage proves at build time that no training library got in.
        assert "find_spec" in body and "torch" in body
    runtime = stages["runtime"]
    assert "COPY training" not in runtime, "the training package has no place in the runtime image"
    extras = re.search(r"pip install \"?\.\[([a-z,-]+)\]", runtime)
    assert extras and "signing" in extras.group(1).split(","), \
        "the runtime image must be able to verify signed models"
    assert "fast" in extras.group(1).split(",") and "DEPOIS_CLIENT=confluent-kafka" in runtime, \
        "the runtime image runs the librdkafka client"


def _make_prerequisites(target: str) -> list[str]:
    """The prerequisites of ``target`` in the Makefile (the line ``target: a b``)."""
    for line in (REPO / "Makefile").read_text().splitlines():
        if line.startswith(f"{target}:"):
            return line.split(":", 1)[1].split()
    raise AssertionError(f"Makefile has no target {target}")


def test_every_make_target_that_runs_the_venv_installs_it_first() -> None:
    """A fresh clone has no .venv: `make test-fast` (or any target that runs $(BIN)/...) must
    install it, as `make test` and `make demo` do, instead of failing with 'No such file'."""
    for target in ("demo", "test", "test-fast", "bench"):
        assert "install" in _make_prerequisites(target), target


def test_training_image_can_sign_the_models_production_requires() -> None:
    """Production overlays refuse unsigned models, and `export-onnx --sign-key` needs the
    `signing` extra: the training image installed only `.[train,eval]`, so the documented path
    to a servable model failed inside the image."""
    text = (REPO / "deploy" / "docker" / "Dockerfile.train").read_text()
    installs = " ".join(re.findall(r"pip install ([^\n&]+)", re.sub(r"\\\n", " ", text)))
    extras = set(re.findall(r"\.\[([^\]]*)\]", installs)[0].split(","))
    assert {"train", "signing"} <= extras, installs


def test_every_command_the_runtime_image_keeps_has_its_package_in_the_image() -> None:
    """The image copies only depois_stream/, but the wheel's entry points name every script
    of pyproject.toml: `depois-train` was in the image's PATH and failed with a
    ModuleNotFoundError traceback. A script whose package the image lacks must be removed."""
    runtime = _stages(DOCKERFILE.read_text())["runtime"]
    copied = set(re.findall(r"^COPY\s+(\w+)\s", runtime, re.MULTILINE))
    removed = set(re.findall(r'rm\s+(?:-f\s+)?"\$\(command -v ([\w-]+)\)"', runtime))
    scripts = _pyproject()["scripts"]
    kept = {name: target for name, target in scripts.items() if name not in removed}
    assert "depois-stream" in kept
    missing = {name: target for name, target in kept.items()
               if target.split(".")[0] not in copied}
    assert not missing, f"commands in the runtime image whose package it lacks: {missing}"
