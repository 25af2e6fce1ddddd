"""Packaging facts (DEVELOPERS.md): robustbench intact, importable only through the zoo adapter."""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import subprocess
import sys
from pathlib import Path


def _record_hash(path: Path) -> str:
    """A file's hash as wheel RECORD files write it: sha256, urlsafe base64, no padding."""
    digest = hashlib.sha256(path.read_bytes()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _mismatching_files(dist_name: str) -> tuple[int, list[str]]:
    dist = importlib.metadata.distribution(dist_name)
    checked, bad = 0, []
    for entry in dist.files or []:
        # RECORD lists itself and some generated files without a hash; bytecode is rebuilt.
        if entry.hash is None or "__pycache__" in entry.parts:
            continue
        assert entry.hash.mode == "sha256", entry
        path = Path(entry.locate())
        checked += 1
        if not path.is_file() or _record_hash(path) != entry.hash.value:
            bad.append(str(entry))
    return checked, bad


def test_record_hash_matches_wheel_format(tmp_path):
    # Known value: sha256 of b"" is e3b0c442...; in RECORD form it reads as below.
    (tmp_path / "empty").write_bytes(b"")
    assert _record_hash(tmp_path / "empty") == "47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU"


def test_robustbench_files_match_record():
    """torchattacks' wheel overwrites robustbench/ files; the Makefile reinstalls robustbench
    last with --no-deps. Fix: pip install --force-reinstall --no-deps robustbench==1.1.1."""
    checked, bad = _mismatching_files("robustbench")
    assert checked > 20  # robustbench 1.1.1 ships about 60 hashed files
    assert not bad, f"robustbench files differ from its RECORD: {bad[:10]}"


def test_zoo_adapter_imports_robustbench():
    from robustkit.models.zoo import _import_robustbench

    module = _import_robustbench()
    assert module.__name__ == "robustbench"
    assert callable(module.utils.load_model)
    assert sys.modules["autoattack"].AutoAttack is not None  # the alias robustbench needs


def test_import_does_not_import_robustbench():
    """One fresh interpreter (torch imports are slow): robustkit and its models package, even
    the zoo module itself, import neither robustbench nor its ``autoattack`` alias nor timm."""
    code = (
        "import sys\n"
        "def leaked():\n"
        "    return sorted(m for m in sys.modules\n"
        "                  if m.split('.')[0] in {'robustbench', 'autoattack', 'timm'})\n"
        "for name in ('robustkit', 'robustkit.models', 'robustkit.models.zoo'):\n"
        "    __import__(name)\n"
        "    assert not leaked(), (name, leaked())\n"
        "    assert name in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
