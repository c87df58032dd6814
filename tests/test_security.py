"""Security properties checked on the source tree: nothing read is unpickled or evaluated, Ray
keeps token authentication and its dashboard on loopback, storage passwords never reach a
message, and file names derived from GPU models stay inside their folder."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tuner import cli

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [path for folder in ("tuner", "kernels", "benchmarks", "search_spaces", "tests")
           for path in sorted((ROOT / folder).rglob("*")) if path.suffix in (".py", ".yaml", ".sh")
           and path.name != Path(__file__).name]
# Ways to turn read bytes into code or objects: pickle and its users, eval/exec, unsafe YAML.
UNSAFE = re.compile(r"\bpickle\b|\bcloudpickle\b|\bmarshal\b|\bshelve\b|torch\.load\b|"
                    r"(?<![\w.])eval\(|(?<![\w.])exec\(|yaml\.(unsafe_)?load\(|yaml\.full_load|"
                    r"yaml\.Loader|yaml\.UnsafeLoader")


def test_nothing_read_is_unpickled_or_evaluated():
    assert len(SOURCES) > 20
    found = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}" for path in SOURCES
             for number, line in enumerate(path.read_text().splitlines(), 1) if UNSAFE.search(line)]
    assert not found, "\n".join(found)


def test_ray_keeps_token_auth_and_a_loopback_dashboard():
    text = "\n".join(path.read_text() for path in SOURCES) + (ROOT / "cluster.yaml").read_text()
    assert "RAY_AUTH_MODE=disabled" not in text and "RAY_AUTH_MODE=token" in text
    assert not re.search(r"dashboard[-_]host[= :]+['\"]?0\.0\.0\.0", text)
    assert "include_dashboard=False" in (ROOT / "tuner" / "runner.py").read_text()


@pytest.mark.parametrize("device", ["../../etc/x", "/etc/passwd", "..", ".", "", "\x00\n",
                                    "a/../../b", "C:\\Windows\\x", "x" * 1000, "💥 GPU"])
def test_device_file_names_stay_in_their_folder(device, tmp_path):
    name = cli.device_file_name(device)
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]{0,99}\.json", name), name
    assert (tmp_path / name).resolve().parent == tmp_path.resolve()


def test_storage_password_never_printed(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["export", "--storage", "postgresql://tuner:s3cr3t@127.0.0.1:1/tuner",
                  "--out", str(tmp_path / "x.json")])
    err = capsys.readouterr().err
    assert "s3cr3t" not in err and "tuner:***@127.0.0.1" in err
