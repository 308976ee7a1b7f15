"""A PEP 517 build backend for the one-module aeterna-client package, stdlib only.

pip builds packages in an isolated environment and fetches the backend named in
pyproject.toml from a package index; this backend lives in the source tree
(backend-path), so `pip install clients/python` works offline. It reads the few
[project] keys pyproject.toml sets and writes a py3-none-any wheel holding
aeterna_client.py, or an sdist of this directory.
"""

import base64
import hashlib
import io
import os
import re
import tarfile
import zipfile

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE = "aeterna_client.py"
# Zip and tar entries get this fixed time: the same sources build the same bytes.
EPOCH = (1980, 1, 1, 0, 0, 0)


def _project():
    """The [project] table's string values (the only kind pyproject.toml uses here)."""
    with open(os.path.join(HERE, "pyproject.toml"), encoding="utf-8") as f:
        text = f.read()
    table = re.search(r"^\[project\]\n(.*?)(?=^\[|\Z)", text, re.S | re.M)
    if table is None:
        raise RuntimeError("pyproject.toml has no [project] table")
    return dict(re.findall(r'^([a-z-]+)\s*=\s*"([^"]*)"\s*$', table.group(1), re.M))


def _read(name):
    with open(os.path.join(HERE, name), "rb") as f:
        return f.read()


def _metadata(project):
    head = [
        "Metadata-Version: 2.1",
        "Name: %s" % project["name"],
        "Version: %s" % project["version"],
        "Summary: %s" % project["description"],
        "License: %s" % project["license"],
        "Requires-Python: %s" % project["requires-python"],
        "Classifier: License :: OSI Approved :: Apache Software License",
        "Classifier: Operating System :: POSIX :: Linux",
        "Classifier: Programming Language :: Python :: 3",
        "Description-Content-Type: text/markdown",
    ]
    return ("\n".join(head) + "\n\n").encode() + _read(project["readme"])


def _dist_info(project):
    return "%s-%s.dist-info" % (project["name"].replace("-", "_"), project["version"])


def _wheel_name(project):
    return "%s-%s-py3-none-any.whl" % (project["name"].replace("-", "_"), project["version"])


def _write_wheel(directory, project, files):
    """files: (path in the wheel, bytes); the dist-info and its RECORD are added."""
    info = _dist_info(project)
    files = list(files) + [
        (info + "/METADATA", _metadata(project)),
        (info + "/WHEEL", b"Wheel-Version: 1.0\nGenerator: aeterna_build\nRoot-Is-Purelib: true\nTag: py3-none-any\n"),
        (info + "/licenses/LICENSE", _read("LICENSE")),
    ]
    record = io.StringIO()
    for path, data in files:
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.write("%s,sha256=%s,%d\n" % (path, digest, len(data)))
    record.write("%s/RECORD,,\n" % info)
    files.append((info + "/RECORD", record.getvalue().encode()))
    name = _wheel_name(project)
    with zipfile.ZipFile(os.path.join(directory, name), "w", zipfile.ZIP_DEFLATED) as wheel:
        for path, data in files:
            entry = zipfile.ZipInfo(path, EPOCH)
            entry.external_attr = 0o644 << 16
            entry.compress_type = zipfile.ZIP_DEFLATED
            wheel.writestr(entry, data)
    return name


def get_requires_for_build_wheel(config_settings=None):
    return []


def get_requires_for_build_sdist(config_settings=None):
    return []


def get_requires_for_build_editable(config_settings=None):
    return []


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    return _write_wheel(wheel_directory, _project(), [(MODULE, _read(MODULE))])


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    # `pip install -e`: a .pth file puts this directory on sys.path.
    return _write_wheel(wheel_directory, _project(), [("aeterna_client.pth", (HERE + "\n").encode())])


def build_sdist(sdist_directory, config_settings=None):
    project = _project()
    base = "%s-%s" % (project["name"].replace("-", "_"), project["version"])
    name = base + ".tar.gz"
    members = ["pyproject.toml", "README.md", "LICENSE", MODULE, "build_backend/aeterna_build.py"]
    with tarfile.open(os.path.join(sdist_directory, name), "w:gz", format=tarfile.PAX_FORMAT) as sdist:
        for member, data in [(m, _read(m)) for m in members] + [("PKG-INFO", _metadata(project))]:
            entry = tarfile.TarInfo("%s/%s" % (base, member))
            entry.size = len(data)
            entry.mode = 0o644
            sdist.addfile(entry, io.BytesIO(data))
    return name
