"""``docker/Dockerfile`` agrees with ``pyproject.toml`` without building the image.

The base image's torch (the version in its ``pytorch/pytorch:<torch>-cuda...`` tag) must satisfy
pyproject's torch range and transformers' torch floor, pyproject's transformers floor must accept
the ``dtype=`` keyword the code passes to ``from_pretrained``, every ``==`` pin in the
Dockerfile's ``pip install`` lines must satisfy pyproject, and the image must COPY every package
and module that pyproject ships.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# First transformers release whose from_pretrained takes ``dtype=`` (renamed from torch_dtype by
# huggingface/transformers#39782); pipelines/smollm2.py calls from_pretrained(..., dtype=...).
TRANSFORMERS_DTYPE_KWARG = Version("4.56")
# transformers 5 disables torch below this version (transformers.utils.import_utils).
TRANSFORMERS_5_TORCH_FLOOR = Version("2.6")


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per Dockerfile instruction, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = (line.strip() for line in text.splitlines())
    return [
        (parts[0].upper(), parts[1] if len(parts) > 1 else "")
        for parts in (line.split(None, 1) for line in lines if line and not line.startswith("#"))
    ]


def _image_torch() -> Version:
    tags = [
        re.fullmatch(r"pytorch/pytorch:(\d+(?:\.\d+)+)-cuda\S+", args.split()[0])
        for name, args in _instructions()
        if name == "FROM"
    ]
    assert len(tags) == 1 and tags[0], (
        "docker/Dockerfile must have one FROM pytorch/pytorch:<torch>-cuda... line; "
        "update tests/test_docker.py if the base image changes kind"
    )
    return Version(tags[0].group(1))


def _deps() -> dict[str, Requirement]:
    reqs = (Requirement(dep) for dep in PYPROJECT["project"]["dependencies"])
    return {canonicalize_name(req.name): req for req in reqs}


def _lower_bound(req: Requirement) -> Version | None:
    bounds = [Version(s.version) for s in req.specifier if s.operator in (">=", ">", "==", "~=")]
    return max(bounds, default=None)


def _pip_pins() -> list[Requirement]:
    pins = []
    for name, args in _instructions():
        if name != "RUN" or "pip install" not in args:
            continue
        for token in shlex.split(args.replace("&&", " ")):
            try:
                req = Requirement(token)
            except InvalidRequirement:
                continue
            if any(s.operator == "==" for s in req.specifier):
                pins.append(req)
    return pins


def test_image_torch_satisfies_pyproject() -> None:
    torch, spec = _image_torch(), _deps()["torch"].specifier
    assert spec.contains(torch), (
        f"the base image's torch {torch} is outside pyproject's torch{spec}: move "
        "docker/Dockerfile's FROM to a pytorch/pytorch tag whose torch pyproject admits"
    )


def test_transformers_floor_accepts_dtype_kwarg() -> None:
    req = _deps()["transformers"]
    low = _lower_bound(req)
    assert low is not None and low >= TRANSFORMERS_DTYPE_KWARG, (
        f"pyproject's {req} admits transformers without from_pretrained(dtype=...): raise it "
        f"to transformers>={TRANSFORMERS_DTYPE_KWARG}"
    )


def test_torch_meets_transformers_5_floor() -> None:
    deps = _deps()
    if not any(deps["transformers"].specifier.contains(v) for v in ("5.0.0", "99")):
        return
    torch, low = _image_torch(), _lower_bound(deps["torch"])
    assert torch >= TRANSFORMERS_5_TORCH_FLOOR, (
        f"pyproject admits transformers 5, which disables torch below "
        f"{TRANSFORMERS_5_TORCH_FLOOR}, but the base image has torch {torch}: move "
        "docker/Dockerfile's FROM to a newer pytorch/pytorch tag"
    )
    assert low is not None and low >= TRANSFORMERS_5_TORCH_FLOOR, (
        f"pyproject admits transformers 5 and {deps['torch']}: raise it to "
        f"torch>={TRANSFORMERS_5_TORCH_FLOOR}"
    )


def test_dockerfile_pins_satisfy_pyproject() -> None:
    deps = _deps()
    for pin in _pip_pins():
        want = deps.get(canonicalize_name(pin.name))
        pinned = next(Version(s.version) for s in pin.specifier if s.operator == "==")
        assert want is None or want.specifier.contains(pinned, prereleases=True), (
            f"docker/Dockerfile pins {pin} but pyproject wants {want}: change the pin or "
            "pyproject's range so they agree"
        )


def test_dockerfile_copies_every_package() -> None:
    setuptools = PYPROJECT["tool"]["setuptools"]
    wanted = {f"{module}.py" for module in setuptools.get("py-modules", [])}
    wanted |= {
        pattern.rstrip("*").split(".")[0] for pattern in setuptools["packages"]["find"]["include"]
    }
    copied = set()
    for name, args in _instructions():
        if name == "COPY":
            sources = [s for s in shlex.split(args) if not s.startswith("--")][:-1]
            copied |= {s.rstrip("/") for s in sources}
    missing = set() if "." in copied else wanted - copied
    assert not missing, (
        f"docker/Dockerfile does not COPY {sorted(missing)}, which pyproject.toml packages: "
        "add a COPY line for each so the image installs them"
    )
