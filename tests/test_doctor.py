"""`lorakit doctor` reports this machine truthfully and names a fix for each problem."""

from importlib import metadata

from lorakit import doctor


def test_checks_cover_the_documented_areas():
    checks = doctor.run_checks()
    names = {c.name for c in checks}
    assert {"python", "torch", "transformers", "peft", "bitsandbytes", "llama.cpp", "embedded model"} <= names
    assert any(n.startswith("disk ") for n in names)
    assert all(c.fix for c in checks if c.status != doctor.OK), "every problem comes with its fix"


def test_versions_are_checked_against_the_installed_ranges(monkeypatch):
    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "4.0.0" if name == "transformers" else real(name))
    bad = [c for c in doctor.check_libraries() if c.name == "transformers"]
    assert bad and bad[0].status == doctor.FAIL
    assert "outside the supported range" in bad[0].detail and "pip install 'transformers" in bad[0].fix


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
