"""The wheel holds every file the package needs at run time, and fused=True works from it; a build that cannot
happen says what to install."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from lightning_ext.optimizers import _fused_cpu

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(ROOT)], check=True, capture_output=True, text=True, timeout=300)
    (path,) = out.glob("lightning_ext-*.whl")
    return path


def test_the_wheel_contains_every_package_file(wheel):
    """Every source file under lightning_ext/ (Python and the C++ kernels) is in the wheel, and nothing else
    of the repository (tests, configs) is installed as a package."""
    names = set(zipfile.ZipFile(wheel).namelist())
    package = {p.relative_to(ROOT).as_posix() for p in (ROOT / "lightning_ext").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}
    assert "lightning_ext/optimizers/csrc/fused_cpu.cpp" in package
    assert package <= names, sorted(package - names)
    top = {n.split("/")[0] for n in names}
    assert top == {"lightning_ext", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}


@pytest.mark.slow
def test_fused_works_from_the_wheel_installed_outside_the_source_tree(wheel, tmp_path):
    """Installed from the wheel into another folder (no source tree on the path), fused=True compiles its
    kernels (into a fresh extension folder) and steps as the eager path does."""
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, text=True, timeout=300)
    script = """
import torch, lightning_ext
from lightning_ext.optimizers import AdamP
print(lightning_ext.__file__)
torch.manual_seed(0)
w = [torch.randn(16, 8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)]
ps = {f: [torch.nn.Parameter(t.clone()) for t in w] for f in (False, True)}
for fused, params in ps.items():
    opt = AdamP(params, lr=1e-2, weight_decay=1e-2, fused=fused)
    for step in range(3):
        for p in params:
            p.grad = torch.sin(p.detach() * (step + 1))
        opt.step()
print(max((a - b).abs().max().item() for a, b in zip(ps[False], ps[True])))
"""
    env = {**os.environ, "PYTHONPATH": str(site), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    where, diff = done.stdout.split()[-2:]
    assert Path(where).is_relative_to(site)
    assert float(diff) <= 1e-12


def test_a_build_that_cannot_happen_says_what_to_install(monkeypatch, tmp_path, caplog):
    build = _fused_cpu.extension.__wrapped__  # not the cached, already-built one
    monkeypatch.setattr(_fused_cpu, "SOURCE", tmp_path / "fused_cpu.cpp")
    with pytest.raises(RuntimeError, match=r"C\+\+ source .* is missing from this installation.*fused=False"):
        build()
    monkeypatch.setattr(_fused_cpu, "SOURCE", ROOT / "lightning_ext/optimizers/csrc/fused_cpu.cpp")
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(RuntimeError, match=r"no C\+\+ compiler .*apt-get install g\+\+"):
        build()
    monkeypatch.delenv("CXX")
    monkeypatch.setattr("torch.utils.cpp_extension.is_ninja_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"pip install ninja"):
        build()
    assert _fused_cpu.missing_build_requirement() is not None
    # the selection kernel is optional: where it cannot be built, kth_smallest uses ATen, said once in the log
    from lightning_ext import _cpp_build

    select = _cpp_build.select_extension.__wrapped__
    with caplog.at_level("WARNING", logger="lightning_ext._cpp_build"):
        assert select() is None
    assert "pip install ninja" in caplog.text and "uses ATen's kernels instead" in caplog.text
